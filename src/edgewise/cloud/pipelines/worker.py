"""The cloud pipelines' worker: a thread of its own with its own event loop and store.

The control plane's event loop serves sessions and ingest; the operators of cloud pipelines
(windows over many nodes' records, numpy work) run here instead, so a heavy pipeline delays
the loop that acknowledges batches only by what it costs in CPU, never by holding the loop.
The worker reads the ``cloud_pipelines`` table every `POLL` seconds: it starts a `PipelineRun`
for each pipeline, restarts one whose text changed and stops one deleted. A run that fails is
logged, its error kept for `status`, and started again after `RETRY` seconds (from its last
commit, so nothing is lost or repeated).

``ship`` is how results reach the store: in the control plane it hands them to the app's group
commit on the app's loop (`app_ship`), so data out forwards them like any ingested chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgewise.cloud.pipelines.runner import PipelineRun, Ship, direct_ship
from edgewise.cloud.pipelines.spec import parse_cloud_pipeline
from edgewise.cloud.store import ChunkWrite, MarkWrite, Store
from edgewise.errors import EdgewiseError

log = logging.getLogger(__name__)

POLL = 1.0  # s between reads of the pipeline table
RETRY = 5.0  # s before a failed run starts again
STOP_TIMEOUT = 30.0  # s `stop` waits for the runs to commit and ship what they hold


@dataclass
class _Running:
    version: int
    digest: str
    run: PipelineRun | None
    task: asyncio.Task[None] | None
    error: str | None = None
    failed_at: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)


class CloudPipelineWorker:
    """Start with `start`, end with `stop` (both from any thread); `status` is thread-safe."""

    def __init__(self, db_url: str, data_dir: Path, *,
                 ship: Callable[[Store], Ship] = direct_ship, poll: float = POLL) -> None:
        self.db_url = db_url
        self.data_dir = Path(data_dir)
        self.make_ship = ship
        self.poll = poll
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
            ship = self.make_ship(store)
            self._ready.set()
            try:
                while not self._stop.is_set():
                    try:
                        await self._reconcile(store, ship)
                    except EdgewiseError as exc:
                        log.warning("cloud pipelines: cannot read the pipeline table: %s", exc)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), self.poll)
            finally:
                await self._stop_all(list(self._runs))

    async def _reconcile(self, store: Store, ship: Ship) -> None:
        wanted = {p.name: p for p in await store.list_cloud_pipelines()}
        gone = [n for n in self._runs if n not in wanted]
        changed = [n for n, r in self._runs.items()
                   if n in wanted and wanted[n].digest != r.digest]
        await self._stop_all(gone + changed)
        loop = asyncio.get_running_loop()
        for name, p in wanted.items():
            r = self._runs.get(name)
            if r is not None and r.task is not None and not r.task.done():
                continue
            if r is not None and r.error and loop.time() - r.failed_at < RETRY:
                continue
            try:
                spec = parse_cloud_pipeline(p.text, name)
                run = PipelineRun(spec, self.data_dir, store, ship)
            except EdgewiseError as exc:
                self._set(name, _Running(p.version, p.digest, None, None, str(exc),
                                         loop.time()))
                continue
            entry = _Running(p.version, p.digest, run, None)
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
            log.error("cloud pipeline %s failed (restarts from its last commit in %.0f s): %s",
                      name, RETRY, err)
            entry.error = str(err) or type(err).__name__
            entry.failed_at = asyncio.get_running_loop().time()

    async def _stop_all(self, names: Sequence[str]) -> None:
        for name in names:
            with self._lock:
                entry = self._runs.pop(name, None)
            if entry is None or entry.run is None or entry.task is None:
                continue
            entry.run.stop()
            try:
                await asyncio.wait_for(asyncio.shield(entry.task), STOP_TIMEOUT)
            except TimeoutError:
                entry.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await entry.task

    def _set(self, name: str, entry: _Running) -> None:
        with self._lock:
            self._runs[name] = entry


def app_ship(loop: asyncio.AbstractEventLoop,
             submit: Callable[[Sequence[ChunkWrite], Sequence[MarkWrite]], Any]
             ) -> Callable[[Store], Ship]:
    """A `Ship` that hands the writes to ``submit`` (the app's group commit) on ``loop`` and
    waits for the durable commit."""

    def make(_store: Store) -> Ship:
        async def ship(chunks: Sequence[ChunkWrite], marks: Sequence[MarkWrite]) -> None:
            async def on_app_loop() -> None:
                await submit(chunks, marks)

            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(on_app_loop(), loop))

        return ship

    return make
