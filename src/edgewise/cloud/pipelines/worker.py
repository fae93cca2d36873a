"""The cloud pipelines' worker: a thread of its own with its own event loop and store.

The control plane's event loop serves sessions and ingest; the operators of cloud pipelines
(windows over many nodes' records, numpy work) run here instead, so a heavy pipeline delays
the loop that acknowledges batches only by what it costs in CPU, never by holding the loop.

**One replica runs each pipeline.** Every `POLL` seconds the worker reads the
``cloud_pipelines`` table and, per pipeline, renews the lease of a run it holds or tries to
take the lease of one it does not (`CloudPipelineStore.take_pipeline_lease`: free, expired
after ``lease_s`` without renewal, or held by this same replica before a restart). It starts a
`PipelineRun` under each lease it took, from the state the store holds (so a takeover
continues exactly where the stored results end), restarts one whose text changed, stops one
deleted, and stops at once a run whose lease another replica took (its shipments are fenced
by the lease's term, so it stores nothing more). A run that fails is logged, its error kept
for `status`, and started again after `RETRY` seconds (from the stored state). On `stop` each
run ships what it holds and its lease is released, so another replica takes over at once.

The replica's name (``runner``) is ``<host>/<id>``, the id kept in ``DATA/replica-id``: a
control plane started again with the same data directory is the same replica and takes its
pipelines back at once, with a new term (a process of the old term, if one were still alive,
could store nothing more).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgewise.cloud.pipelines.runner import Forward, PipelineRun
from edgewise.cloud.pipelines.spec import parse_cloud_pipeline
from edgewise.cloud.pipelines.state import RunState
from edgewise.cloud.store import Store
from edgewise.cloud.store.cloud_pipelines import PipelineLease, PipelineLeaseLost
from edgewise.common.files import write_atomic
from edgewise.errors import EdgewiseError

log = logging.getLogger(__name__)

POLL = 1.0  # s between reads of the pipeline table (and lease renewals)
RETRY = 5.0  # s before a failed run starts again
STOP_TIMEOUT = 30.0  # s `stop` waits for the runs to commit and ship what they hold
LEASE = 15.0  # s a replica's hold on a pipeline lasts without renewal (`--limit pipeline_lease`)
REPLICA_FILE = "replica-id"


def replica_name(data_dir: Path) -> str:
    """``<host>/<id>``, the id made once per data directory (`REPLICA_FILE`)."""
    path = Path(data_dir) / REPLICA_FILE
    try:
        rid = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        rid = ""
    if len(rid) != 32 or any(c not in "0123456789abcdef" for c in rid):
        rid = uuid.uuid4().hex
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, rid.encode())
    return f"{socket.gethostname()[:80]}/{rid}"


@dataclass
class _Running:
    version: int
    digest: str
    run: PipelineRun | None
    task: asyncio.Task[None] | None
    lease: PipelineLease | None = None
    error: str | None = None
    failed_at: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)


class CloudPipelineWorker:
    """Start with `start`, end with `stop` (both from any thread); `status` is thread-safe."""

    def __init__(self, db_url: str, data_dir: Path, *, forward: Forward | None = None,
                 poll: float = POLL, lease_s: float = LEASE,
                 runner: str | None = None) -> None:
        self.db_url = db_url
        self.data_dir = Path(data_dir)
        self.forward = forward
        self.poll = poll
        self.lease_s = lease_s
        self.runner = runner or replica_name(self.data_dir)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._runs: dict[str, _Running] = {}
        self.error: BaseException | None = None

    # -- control (any thread) ---------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="edgewise-cloud-pipelines",
                                        daemon=True)
        self._thread.start()
        self._ready.wait(STOP_TIMEOUT)

    def stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop ended already
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT)
            if self._thread.is_alive():
                log.error("cloud pipelines did not stop within %.0f s", STOP_TIMEOUT)
            self._thread = None

    def status(self) -> dict[str, dict[str, Any]]:
        """Per pipeline this worker runs: version, state, error, the run's figures."""
        with self._lock:
            runs = dict(self._runs)
        out: dict[str, dict[str, Any]] = {}
        for name, r in runs.items():
            state = "failed" if r.error else ("running" if r.task and not r.task.done()
                                              else "stopped")
            info: dict[str, Any] = {"version": r.version, "state": state, "error": r.error}
            if r.lease is not None:
                info["term"] = r.lease.term
            if r.run is not None:
                with contextlib.suppress(Exception):  # figures read while it runs
                    info.update(r.run.status())
            out[name] = info
        return out

    # -- the thread --------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # kept for the caller, logged
            self.error = exc
            log.exception("the cloud pipeline worker ended")
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with Store(self.db_url) as store:
            self._ready.set()
            try:
                while not self._stop.is_set():
                    try:
                        await self._reconcile(store)
                    except EdgewiseError as exc:
                        log.warning("cloud pipelines: cannot read the pipeline table: %s", exc)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), self.poll)
            finally:
                await self._stop_all(store, list(self._runs))

    async def _reconcile(self, store: Store) -> None:
        wanted = {p.name: p for p in await store.list_cloud_pipelines()}
        gone = [n for n in self._runs if n not in wanted]
        changed = [n for n, r in self._runs.items()
                   if n in wanted and wanted[n].digest != r.digest]
        await self._stop_all(store, gone + changed)
        lost = [n for n, r in self._runs.items() if r.lease is not None
                and not await store.renew_pipeline_lease(r.lease)]
        for name in lost:
            log.warning("cloud pipeline %s: another replica runs it now; stopping here", name)
        await self._stop_all(store, lost, release=False)
        loop = asyncio.get_running_loop()
        for name, p in wanted.items():
            r = self._runs.get(name)
            if r is not None and r.task is not None and not r.task.done():
                continue
            if r is not None and r.error and loop.time() - r.failed_at < RETRY:
                continue
            lease = r.lease if r is not None and r.lease is not None else (
                await store.take_pipeline_lease(name, self.runner, self.lease_s))
            if lease is None:
                continue  # another replica runs it
            try:
                spec = parse_cloud_pipeline(p.text, name)
                stored = await store.pipeline_state(name)
                start = None if stored is None else RunState.decode(stored)
                run = PipelineRun(spec, self.data_dir, store, lease=lease, start=start,
                                  forward=self.forward)
            except EdgewiseError as exc:
                self._set(name, _Running(p.version, p.digest, None, None, lease, str(exc),
                                         loop.time()))
                continue
            if r is None or r.lease is None:
                log.info("cloud pipeline %s: running it here (term %d)", name, lease.term)
            entry = _Running(p.version, p.digest, run, None, lease)
            entry.task = asyncio.create_task(self._guard(name, entry), name=f"cloud-{name}")
            self._set(name, entry)

    async def _guard(self, name: str, entry: _Running) -> None:
        assert entry.run is not None
        try:
            await entry.run.run()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a failed run must not end the worker
            err = exc.exceptions[0] if isinstance(exc, BaseExceptionGroup) and len(
                exc.exceptions) == 1 else exc
            if isinstance(err, PipelineLeaseLost):
                log.warning("cloud pipeline %s: %s; stopping here", name, err)
                entry.lease = None  # taken again (a new term) only if it is free
            else:
                log.error("cloud pipeline %s failed (restarts from its last shipment in "
                          "%.0f s): %s", name, RETRY, err)
            entry.error = str(err) or type(err).__name__
            entry.failed_at = asyncio.get_running_loop().time()

    async def _stop_all(self, store: Store, names: Sequence[str], *,
                        release: bool = True) -> None:
        for name in names:
            with self._lock:
                entry = self._runs.pop(name, None)
            if entry is None:
                continue
            if entry.run is not None and entry.task is not None:
                entry.run.stop()
                try:
                    await asyncio.wait_for(asyncio.shield(entry.task), STOP_TIMEOUT)
                except TimeoutError:
                    entry.task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await entry.task
            if release and entry.lease is not None:
                try:
                    await store.release_pipeline_lease(entry.lease)
                except EdgewiseError as exc:  # it expires by itself
                    log.warning("cloud pipeline %s: cannot release its lease: %s", name, exc)

    def _set(self, name: str, entry: _Running) -> None:
        with self._lock:
            self._runs[name] = entry
