"""The edge agent: engine, uplink, certificate renewal, twin and status under one lifecycle.

``await Agent(config).run()`` prepares the identity (reading or creating the node key),
recovers the release slots (`edgewise.edge.updater`: a release on trial whose attempts are used
up is rolled back before anything else runs), loads the twin, then runs in one
`asyncio.TaskGroup`:

* the **engine supervisor**: runs the pipeline (the persisted desired state's; while the cloud
  has named none, ``--pipeline``); restarts it when the twin applies a new one or when it fails;
* the **uplink** (`edgewise.edge.uplink`), the **renewal loop** (`edgewise.edge.identity`),
  the **twin** (`edgewise.edge.twin`), the **status writer** (``DATA/status.json`` every
  second) and the **updater** (`edgewise.edge.updater.updater`: the health gate of a release
  on trial, staging the assigned release; while a release is assigned and has a pipeline, that
  pipeline runs instead of the desired state's). A slot switch or a rollback ends `run` with
  ``restart_reason`` set: the CLI starts the agent again (docs/updates.md).

The agent opens the outbox (`edgewise.outbox.Outbox`) once for its lifetime and lends it to
each engine it starts; the uplink reads and acknowledges through the same object, also while no
engine runs. Nothing on the engine's path waits for the network: the uplink reads the outbox in
worker threads and only ever meets the engine at the outbox's lock. A cloud that cannot be
reached leaves the pipeline and its local alarms running.

`stop()` (SIGINT/SIGTERM in the CLI) ends it gracefully: network tasks are cancelled, the
engine commits what it has and closes its sinks, the last status is written, and no task is
left running. `Revoked` (and a refused enrolment token) stop the agent with that error; a
decommissioned node also writes its marker and, if told to, wipes its data (`decommission`);
`ReenrolRequired` only stops the uplink: the pipeline keeps running and the status says what
the operator must do.

Data directory::

    DATA/identity/   node key, certificate, CA, node id      (identity.py)
    DATA/engine/     outbox.db: records, checkpoint           (edgewise.outbox)
    DATA/twin/       desired.msgpack, reported.msgpack        (twin.py)
    DATA/uplink/     refused.json, ledger.msgpack              (uplink_store.py)
    DATA/pipelines/  base folder for relative paths in pipelines from the cloud, whose files
                     must lie in it or in a folder allowed with --allow-path (twin.py)
    DATA/status.json                                          (status.py)
    DATA/releases/   state.json, slots a/ and b/, tmp/, tuf/   (edgewise.edge.updater)
    DATA/decommissioned.json  only once the node was decommissioned (decommission.py)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from edgewise.common.backoff import Backoff, Retry
from edgewise.edge import decommission, tpm_node
from edgewise.edge.health import HealthProbe
from edgewise.edge.identity import NodeIdentity, Revoked
from edgewise.edge.release_fetcher import ReleaseFetcher
from edgewise.edge.status import ENGINE_DIR, outbox_path, write_status
from edgewise.edge.status_model import (
    STATUS_FORMAT,
    AgentStatus,
    CertificateStatus,
    EngineStatus,
    OutboxStatus,
    ReleaseStatus,
)
from edgewise.edge.twin import Twin
from edgewise.edge.updater.source import DirectorySource
from edgewise.edge.updater.updater import SupervisorHooks, Updater, UpdaterConfig
from edgewise.edge.uplink import Uplink, UplinkConfig, first_error
from edgewise.errors import EdgewiseError, StorageError
from edgewise.outbox import Outbox, OutboxDamaged
from edgewise.outbox.numbering import BEHIND
from edgewise.outbox.quarantine import Quarantined, open_outbox
from edgewise.outbox.view import OutboxView
from edgewise.pipeline.engine import Engine
from edgewise.pipeline.paths import check_allowed_roots
from edgewise.pipeline.spec import PipelineSpec
from edgewise.pipeline.summary import EngineSummary
from edgewise.sync.twin_state import DesiredState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentConfig:
    """Everything `edgewise agent run` takes; read from flags and environment by the CLI."""

    data_dir: Path
    cloud: str | None = None  # https://HOST:PORT; remembered after the first run
    ca: Path | None = None  # the control plane's CA; remembered after the first run
    token: SecretStr | None = None  # enrolment token, first run only
    pipeline: Path | None = None  # run this while the cloud's desired state names no pipelines
    allowed_paths: tuple[Path, ...] = ()  # --allow-path: more folders for cloud pipelines' files
    uplink: UplinkConfig = field(default_factory=UplinkConfig)
    status_interval_s: float = 1.0
    engine_restart: Backoff = field(default_factory=lambda: Backoff(1.0, 30.0))
    renew_retry: Backoff = field(default_factory=lambda: Backoff(1.0, 300.0))
    updater: UpdaterConfig = field(default_factory=UpdaterConfig)  # releases (edge/updater)
    release_dir: Path | None = None  # releases from this folder, not the control plane
    tpm: str | None = None  # --tpm TCTI: identity, measured launch, attestation (tpm_node)


class EngineSupervisor:
    """Runs at most one engine at a time, each on the agent's one outbox."""

    def __init__(self, data_dir: Path, outbox: Outbox, restart: Backoff,
                 healthy_s: float = 30.0) -> None:
        self.dir = data_dir / ENGINE_DIR
        self.outbox = outbox
        self.restart = restart
        self.healthy_s = healthy_s  # an engine running this long forgets earlier failures
        self.engine: Engine | None = None
        self.state = "starting"
        self.error: str | None = None  # cleared when an engine runs again
        self.last_error: str | None = None  # the last failure of this process, kept
        self.starts = 0
        self._spec: PipelineSpec | None = None
        self._changed: asyncio.Event | None = None
        self._stopping = False
        self._waiter: asyncio.Future[str | None] | None = None
        self.last_summary: EngineSummary | None = None  # of the last engine that ended
        self._failed = False  # a failure was logged and no engine has run since

    def status(self) -> EngineStatus:
        eng = self.engine
        # the live engine's figures, else those of the last engine that ended (a finished
        # pipeline keeps showing what it did); left out before any engine reported
        s = eng.summary() if eng is not None and eng.running else self.last_summary
        figures: dict[str, Any] = {}
        if s is not None:
            figures.update(readings_in=s["readings_in"], alarms=s["alarms"], late=s["late"],
                           dead_lettered=s["dead_lettered"], elapsed_s=s["elapsed_s"])
            figures["sinks"] = {sid: st["latency"] for sid, st in s["sinks"].items()
                                if st.get("latency")}  # accept-to-action, per local sink
        return EngineStatus(state=self.state, pipeline=self._spec.name if self._spec else None,
                            error=self.error, starts=self.starts, **figures)

    def counters(self) -> dict[str, int]:
        eng = self.engine
        if eng is None:
            return {}
        c = eng.counters
        return {"readings_in": sum(c.readings_in.values()), "alarms": c.alarms,
                "late": c.late, "dead_lettered": c.dead_lettered}

    async def apply(self, spec: PipelineSpec | None) -> str | None:
        """Switch to ``spec`` (None: no pipeline); returns once it runs, or the error that
        kept it from starting."""
        assert self._changed is not None
        waiter = asyncio.get_running_loop().create_future()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)  # superseded before it started
        self._waiter = waiter
        self._spec = spec
        self._changed.set()
        return await waiter

    def stop(self) -> None:
        self._stopping = True
        if self._changed is not None:
            self._changed.set()

    @staticmethod
    def _resolve(waiter: asyncio.Future[str | None] | None, error: str | None) -> None:
        if waiter is not None and not waiter.done():
            waiter.set_result(error)

    async def run(self, spec: PipelineSpec | None) -> None:
        self._spec = spec
        self._changed = asyncio.Event()
        self.dir.mkdir(parents=True, exist_ok=True)
        retry = Retry(self.restart, reset_after=self.healthy_s)
        try:
            while not self._stopping:
                self._changed.clear()
                spec, waiter, self._waiter = self._spec, self._waiter, None
                if spec is None:
                    self.state = "idle"
                    self._resolve(waiter, None)
                    await self._idle()
                    continue
                outcome = await self._run_engine(spec, waiter, retry)
                if outcome == "changed" or self._stopping:
                    retry.reset()
                    continue
                if outcome == "finished":
                    self.state = "finished"
                    await self._idle()
                    continue
                delay = retry.failed()
                self.state, self._failed, self.last_error = "restarting", True, self.error
                log.error("pipeline %s failed: %s; restarting in %.1f s", spec.name, self.error,
                          delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), delay)
        finally:
            self._resolve(self._waiter, "the agent is stopping")
        self.state = "stopped"

    async def _idle(self) -> None:
        """No engine: wait until the spec changes (the uplink keeps draining the outbox)."""
        assert self._changed is not None
        await self._changed.wait()

    async def _run_engine(
        self, spec: PipelineSpec, waiter: asyncio.Future[str | None] | None, retry: Retry
    ) -> str:
        """Run one engine until it ends or the spec changes: 'changed', 'finished', 'failed'.
        ``waiter`` learns when it runs (None) or why it could not start."""
        assert self._changed is not None
        try:
            engine = Engine(spec, self.dir, outbox=self.outbox)
        except EdgewiseError as exc:
            self.error = str(exc)
            self._resolve(waiter, self.error)
            return "failed"
        self.engine = engine
        self.starts += 1
        self.state = "starting"
        task = asyncio.create_task(engine.run(), name=f"engine-{spec.name}")
        changed = asyncio.create_task(self._changed.wait())
        started = asyncio.create_task(engine.started.wait())
        try:
            await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
            if engine.started.is_set() and not task.done():
                retry.connected()  # a run this long forgets earlier failures (healthy_s)
                self.state, self.error = "running", None
                self._resolve(waiter, None)
                log.log(logging.ERROR if self._failed else logging.INFO,  # as its failure was
                        "pipeline %s running%s", spec.name, " again" * self._failed)
                self._failed = False
            await asyncio.wait({task, changed}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                engine.stop()
            try:
                self.last_summary = await task
            except OutboxDamaged as exc:  # every engine would fail on it: no restart loop
                self.error = str(exc)
                raise OutboxDamaged(
                    f"{exc}; the agent stops: start it again and it moves the damaged file "
                    "aside and goes on in a new outbox (what that held is reported as lost)"
                ) from None
            except EdgewiseError as exc:
                self.error = str(exc)
                return "failed"
            except Exception as exc:  # a bug in a component must not kill the agent
                log.exception("pipeline %s crashed", spec.name)
                self.error = f"{type(exc).__name__}: {exc}"
                return "failed"
            return "changed" if changed.done() else "finished"
        finally:
            self._resolve(waiter, self.error)  # ended before it ever ran
            changed.cancel()
            started.cancel()
            if not task.done():  # cancelled from outside: stop gracefully, then re-raise
                engine.stop()
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(asyncio.shield(task), 10.0)
            for helper in (changed, started):
                with contextlib.suppress(asyncio.CancelledError):
                    await helper


class Agent:
    """One edge node. ``await Agent(config).run()``; `stop()` from a signal handler."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        data = Path(config.data_dir)
        self.data_dir = data
        self.identity = NodeIdentity(data, config.cloud, config.ca, config.token)
        self.outbox = Outbox(outbox_path(data))  # opened by run(), for the agent's lifetime
        self.view = OutboxView(outbox_path(data))
        self.supervisor = EngineSupervisor(data, self.outbox, config.engine_restart)
        self.twin: Twin | None = None
        self.uplink: Uplink | None = None
        self.quarantined: Quarantined | None = None  # the damaged outbox moved aside at start
        self.updater = Updater(data, config.updater, source=self._release_source)
        self.restart_reason: str | None = None  # run() ended to start again (another slot)
        self.state = "starting"
        self.error: BaseException | None = None
        self.started_at = time.time()
        self._stop: asyncio.Event | None = None
        self._pending_stop = False

    def stop(self) -> None:
        """Ask for a graceful stop (safe to call from a signal handler, before or during run)."""
        self._pending_stop = True
        if self._stop is not None:
            self._stop.set()

    # -- status -----------------------------------------------------------------------------
    def status(self) -> AgentStatus:
        """What `write_status` puts in ``DATA/status.json``."""
        ident = self.identity
        extra: dict[str, Any] = {}  # written only when there is something to say
        if self.error is not None:
            extra["error"] = str(self.error)
        if self.uplink is not None:
            up = self.uplink.status()
            extra.update(link=up.link, bytes=up.bytes, window=up.window, uplink=up.uplink)
        if self.updater.reportable():
            extra["release"] = ReleaseStatus(**self.updater.status())
        if self.outbox.meta:  # opened
            extra["outbox"] = OutboxStatus(**vars(self.outbox.health()))
        return AgentStatus(
            format=STATUS_FORMAT,
            updated_at=time.time(),
            pid=os.getpid(),
            state=self.state,
            started_at=self.started_at,
            node_id=ident.node_id,
            cloud=ident.cloud or None,
            certificate=CertificateStatus(**ident.cert.to_json()) if ident.cert else None,
            renewals=ident.renewals,
            reauths=ident.reauths,
            engine=self.supervisor.status(),
            twin=self.twin.status() if self.twin else None,
            problem=ident.problem or (self.uplink.problem if self.uplink else None)
            or self._outbox_problem(extra.get("outbox")),
            **extra,
        )

    def counters(self) -> dict[str, int]:
        """The counters of the reported state."""
        out = dict(self.supervisor.counters())
        for name, st in self.outbox.stats().items():
            out[f"{name}.produced"] = st.produced
            out[f"{name}.acked"] = st.acked
            out[f"{name}.pending"] = st.pending_records
            out[f"{name}.dropped"] = st.dropped
        if self.outbox.meta:
            h = self.outbox.health_state
            out["outbox_disk_full"] = int(h.state == "disk full")
            out["outbox_held_records"] = h.held_records
        if self.uplink is not None:
            out["chunks_refused"] = len(self.uplink.refused)
            if self.uplink.meter.available:
                out["wire_bytes_sent"] = self.uplink.meter.sent
                out["wire_bytes_received"] = self.uplink.meter.received
        return out

    def _outbox_problem(self, h: OutboxStatus | None) -> str | None:
        """A full disk (while it lasts), else a damaged outbox moved aside (this run)."""
        if h is not None and h.state == "disk full":
            free = f"{h.free_bytes:,} bytes free" if h.free_bytes is not None else "no room"
            return (f"the disk of {self.outbox.path.parent} is full ({free}): the outbox stopped "
                    "growing and drops its lowest priorities to store new records, "
                    f"{h.held_records:,} records wait in memory; local alarms go on. Free "
                    "space on that disk")
        return self.quarantined.describe() if self.quarantined is not None else None

    def _open_outbox(self, uplink: Uplink) -> None:
        """Open the outbox (a damaged file is quarantined, `open_outbox`) and continue its
        numbers above what the uplink ledger says the cloud may have heard of."""
        self.quarantined = open_outbox(self.outbox)
        ledger = uplink.store.ledger
        numbered = self.outbox.numbered_for
        if ledger.high and (ledger.node is None or numbered is None or ledger.node == numbered):
            for stream, (first, count) in self.outbox.continue_from(
                    ledger.floors(), ledger.marks, BEHIND).items():
                note = f"stream {stream}: seq {first}..{first + count - 1} {BEHIND}"
                self.outbox.health_state.notes.append(note)
        for note in self.outbox.health_state.notes:
            log.error("outbox: %s", note)

    async def _write_status(self) -> None:
        try:
            await asyncio.to_thread(write_status, self.data_dir, self.status())
        except (OSError, StorageError) as exc:
            log.warning("cannot write %s: %s", self.data_dir / "status.json", exc)

    async def _status_loop(self) -> None:
        while True:
            await self._write_status()
            await asyncio.sleep(self.config.status_interval_s)

    # -- lifecycle --------------------------------------------------------------------------
    async def run(self) -> None:
        """Run until `stop()` or a fatal error (raised: `Revoked`, `EnrolmentRefused`...).

        Raises `ConfigError` before starting anything when the flags or files are wrong."""
        cfg = self.config
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {self.data_dir}: {exc.strerror or exc}") from exc
        decommission.check_start(self.data_dir, cfg.token is not None)  # docs/agent.md
        check_allowed_roots(self.data_dir, cfg.allowed_paths)
        self.identity.prepare()
        self.updater.prepare()  # a release on trial with its attempts used up rolls back here
        tpm = tpm_node.start(cfg.tpm, self) if cfg.tpm else None  # measures the launch
        twin = self.twin = Twin(self.data_dir / "twin", self.identity.label,
                                base_dir=self.data_dir / "pipelines",
                                allowed_roots=cfg.allowed_paths, cipher=self.outbox.cipher)
        twin.load()
        for key, value in self.updater.setpoint_defaults().items():
            if key not in twin.setpoints:  # a default: what the cloud or the site set stays
                twin.set_setpoint(key, value)
        spec = twin.startup_spec(cfg.pipeline)
        governed, release_spec = self.updater.pipeline(twin.desired)
        if governed:  # the assigned release's pipeline replaces the desired state's
            spec = release_spec
        uplink = self.uplink = Uplink(self.identity, self.outbox, self.view, twin,
                                      self.data_dir / "uplink", cfg.uplink)
        twin.counters = self.counters
        uplink.health = HealthProbe(self).sample  # each heartbeat carries the node's health
        twin.release_text = self.updater.status_text

        def applied() -> None:
            uplink.request_report()
            self.updater.notice()  # the release assignment may have changed

        twin.on_applied = applied
        hooks = SupervisorHooks(self.supervisor, lambda: twin.desired, self._restart,
                                uplink.request_report, lambda: twin.startup_spec(cfg.pipeline))
        self._stop = asyncio.Event()
        if self._pending_stop:
            self._stop.set()
        self.state = "running"
        try:
            self._open_outbox(uplink)  # one outbox for the agent's lifetime, lent to every engine
            with contextlib.closing(self.outbox), tpm or contextlib.nullcontext():
                async with asyncio.TaskGroup() as tg:
                    engine_task = tg.create_task(self.supervisor.run(spec), name="engine")
                    others = [
                        tg.create_task(self._guard(uplink.run()), name="uplink"),
                        tg.create_task(self._guard(self.identity.renewal_loop(
                            cfg.renew_retry.delay)), name="renewal"),
                        tg.create_task(self._guard(twin.run(self._fetch_desired, self._apply,
                                                            cfg.engine_restart.delay)),
                                       name="twin"),
                        tg.create_task(self._status_loop(), name="status"),
                        tg.create_task(self._guard(self.updater.run(hooks)), name="updater"),
                        *[tg.create_task(self._guard(c)) for c in tpm_node.attestation(tpm, self)],
                    ]
                    await self._stop.wait()
                    self.state = "stopping"
                    for t in others:
                        t.cancel()
                    self.supervisor.stop()
                    await engine_task
        except BaseExceptionGroup as group:  # the supervisor failed (a storage error, say)
            self.error = self.error or first_error(group)
        except StorageError as exc:  # the outbox cannot be opened
            self.error = self.error or exc
        finally:
            self.view.close()
            self.state = "failed" if self.error is not None else "stopped"
            with contextlib.suppress(BaseException):
                await asyncio.shield(self._write_status())
        if isinstance(self.error, Revoked) and self.error.decommissioned:  # wipe if told to
            raise decommission.finish(self.data_dir, self.identity.node_id, self.error.reason,
                                      self.error.wipe)
        if self.error is not None:
            raise self.error

    async def _guard(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a network task; a fatal error from it stops the whole agent gracefully."""
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not isinstance(exc, EdgewiseError):
                log.exception("agent task crashed")
            if self.error is None:
                self.error = exc
            self.stop()

    async def _fetch_desired(self) -> dict[str, Any]:
        return await self.identity.request("GET", "/v1/device/desired")

    def _restart(self, reason: str) -> None:
        """Stop, to be started again (`edgewise agent launch`, or `agent run` itself)."""
        log.info("restarting: %s", reason)
        self.restart_reason = reason
        self.stop()

    def _release_source(self) -> Any:
        """Where releases come from: ``release_dir``, else the control plane (TUF)."""
        if self.config.release_dir is not None:
            return DirectorySource(self.config.release_dir)
        root = self.identity.files.tuf_root_path
        return ReleaseFetcher(self.data_dir / "releases" / "tuf", self.identity.cloud,
                              self.identity.ssl_context(),
                              root.read_bytes() if root.exists() else None)

    async def _apply(self, spec: PipelineSpec | None, state: DesiredState) -> str | None:
        if self.updater.governs(state):
            log.info("desired v%d: the assigned release's pipeline keeps running", state.version)
            return None
        log.info("applying desired v%d (%s)", state.version,
                 f"pipeline {spec.name}" if spec else "no pipeline")
        return await self.supervisor.apply(spec)
