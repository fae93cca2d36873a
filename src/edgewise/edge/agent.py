"""The edge agent: engine, uplink, certificate renewal, twin and status under one lifecycle.

``await Agent(config).run()`` prepares the identity (reading or creating the node key), loads
the twin, then runs in one `asyncio.TaskGroup`:

* the **engine supervisor**: runs the pipeline (persisted desired state, else ``--pipeline``);
  restarts it when the twin applies a new one, restarts it with backoff when it fails, and
  keeps the outbox open itself while no engine runs, so the uplink can still drain it;
* the **uplink** (`edgewise.edge.uplink`), the **renewal loop** (`edgewise.edge.identity`),
  the **twin** (`edgewise.edge.twin`) and the **status writer** (``DATA/status.json`` every
  second).

Nothing on the engine's path waits for the network: the uplink reads the outbox in worker
threads and only ever talks to the engine through the outbox's lock. A cloud that cannot be
reached leaves the pipeline and its local alarms running.

`stop()` (SIGINT/SIGTERM in the CLI) ends it gracefully: network tasks are cancelled, the
engine commits what it has and closes its sinks, the last status is written, and no task is
left running. `Revoked` (and a refused enrolment token) stop the agent with that error;
`ReenrolRequired` only stops the uplink: the pipeline keeps running and the status says what
the operator must do.

Data directory::

    DATA/identity/   node key, certificate, CA, node id      (identity.py)
    DATA/engine/     outbox.db: records, checkpoint           (the engine's data_dir)
    DATA/twin/       desired.msgpack, reported.msgpack        (twin.py)
    DATA/uplink/     refused.json                              (uplink.py)
    DATA/pipelines/  base folder for relative paths in pipelines from the cloud
    DATA/status.json                                          (status.py)
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

from edgewise.edge.backoff import Backoff
from edgewise.edge.identity import NodeIdentity
from edgewise.edge.outbox import Outbox
from edgewise.edge.outbox_access import OutboxAccess
from edgewise.edge.status import ENGINE_DIR, OutboxView, outbox_path, write_status
from edgewise.edge.twin import Twin
from edgewise.edge.uplink import Uplink, UplinkConfig, first_error
from edgewise.errors import EdgewiseError, StorageError
from edgewise.pipeline.engine import Engine
from edgewise.pipeline.spec import PipelineSpec
from edgewise.sync.twin_state import DesiredState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentConfig:
    """Everything `edgewise agent run` takes; read from flags and environment by the CLI."""

    data_dir: Path
    cloud: str | None = None  # https://HOST:PORT; remembered after the first run
    ca: Path | None = None  # the control plane's CA; remembered after the first run
    token: SecretStr | None = None  # enrolment token, first run only
    pipeline: Path | None = None  # run this while no desired state has arrived
    uplink: UplinkConfig = field(default_factory=UplinkConfig)
    status_interval_s: float = 1.0
    engine_restart: Backoff = field(default_factory=lambda: Backoff(1.0, 30.0))
    renew_retry: Backoff = field(default_factory=lambda: Backoff(1.0, 300.0))


class EngineSupervisor:
    """Runs at most one engine at a time and publishes the outbox the uplink may use."""

    def __init__(self, data_dir: Path, access: OutboxAccess, restart: Backoff) -> None:
        self.dir = data_dir / ENGINE_DIR
        self.access = access
        self.restart = restart
        self.engine: Engine | None = None
        self.state = "starting"
        self.error: str | None = None
        self.starts = 0
        self._spec: PipelineSpec | None = None
        self._changed: asyncio.Event | None = None
        self._stopping = False
        self._waiter: asyncio.Future[str | None] | None = None
        self.last_summary: dict[str, Any] | None = None  # of the last engine that ended

    def status(self) -> dict[str, Any]:
        eng = self.engine
        out: dict[str, Any] = {
            "state": self.state,
            "pipeline": self._spec.name if self._spec else None,
            "error": self.error,
            "starts": self.starts,
        }
        # the live engine's figures, else those of the last engine that ended (a finished
        # pipeline keeps showing what it did)
        s = eng.summary() if eng is not None and eng.running else self.last_summary
        if s is not None:
            out.update(readings_in=s["readings_in"], alarms=s["alarms"], late=s["late"],
                       dead_lettered=s["dead_lettered"], elapsed_s=s["elapsed_s"])
            out["sinks"] = {sid: st["latency"] for sid, st in s["sinks"].items()
                            if st.get("latency")}  # accept-to-action, per local sink
        return out

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
        failures = 0
        try:
            while not self._stopping:
                self._changed.clear()
                spec, waiter, self._waiter = self._spec, self._waiter, None
                if spec is None:
                    self.state = "idle"
                    self._resolve(waiter, None)
                    await self._idle()
                    continue
                outcome = await self._run_engine(spec, waiter)
                if outcome == "changed" or self._stopping:
                    failures = 0
                    continue
                if outcome == "finished":
                    self.state = "finished"
                    await self._idle()
                    continue
                failures += 1
                delay = self.restart.delay(failures)
                self.state = "restarting"
                log.error("pipeline %s failed: %s; restarting in %.1f s", spec.name, self.error,
                          delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), delay)
        finally:
            self._resolve(self._waiter, "the agent is stopping")
        self.state = "stopped"

    async def _idle(self) -> None:
        """No engine: keep the outbox open for the uplink until the spec changes."""
        assert self._changed is not None
        with Outbox(outbox_path(self.dir.parent)) as ob:
            await self.access.publish(ob)
            try:
                await self._changed.wait()
            finally:
                await self.access.withdraw()

    async def _run_engine(
        self, spec: PipelineSpec, waiter: asyncio.Future[str | None] | None
    ) -> str:
        """Run one engine until it ends or the spec changes: 'changed', 'finished', 'failed'.
        ``waiter`` learns when it runs (None) or why it could not start."""
        assert self._changed is not None
        try:
            engine = Engine(spec, self.dir)
        except EdgewiseError as exc:
            self.error = str(exc)
            self._resolve(waiter, self.error)
            return "failed"
        self.engine = engine
        self.starts += 1
        self.state = "starting"
        task = asyncio.create_task(engine.run(), name=f"engine-{spec.name}")
        changed = asyncio.create_task(self._changed.wait())
        try:
            while not engine.running and not task.done():
                await asyncio.sleep(0.01)
            if engine.running:
                await self.access.publish(engine.outbox)
                self.state, self.error = "running", None
                self._resolve(waiter, None)
                log.info("pipeline %s running", spec.name)
            await asyncio.wait({task, changed}, return_when=asyncio.FIRST_COMPLETED)
            await self.access.withdraw()
            if not task.done():
                engine.stop()
            try:
                self.last_summary = await task
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
            if not task.done():  # cancelled from outside: stop gracefully, then re-raise
                engine.stop()
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(asyncio.shield(task), 10.0)
            with contextlib.suppress(asyncio.CancelledError):
                await changed
            with contextlib.suppress(BaseException):
                await self.access.withdraw()


class Agent:
    """One edge node. ``await Agent(config).run()``; `stop()` from a signal handler."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        data = Path(config.data_dir)
        self.data_dir = data
        self.identity = NodeIdentity(data, config.cloud, config.ca, config.token)
        self.access = OutboxAccess()
        self.view = OutboxView(outbox_path(data))
        self.supervisor = EngineSupervisor(data, self.access, config.engine_restart)
        self.twin: Twin | None = None
        self.uplink: Uplink | None = None
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
    def status(self) -> dict[str, Any]:
        ident = self.identity
        out: dict[str, Any] = {
            "format": 1,
            "updated_at": time.time(),
            "pid": os.getpid(),
            "state": self.state,
            "started_at": self.started_at,
            "node_id": ident.node_id,
            "cloud": ident.cloud or None,
            "certificate": ident.cert.to_json() if ident.cert else None,
            "renewals": ident.renewals,
            "reauths": ident.reauths,
            "engine": self.supervisor.status(),
            "twin": self.twin.status() if self.twin else {},
            "problem": ident.problem or (self.uplink.problem if self.uplink else None),
        }
        if self.error is not None:
            out["error"] = str(self.error)
        if self.uplink is not None:
            out.update(self.uplink.status())
        return out

    def counters(self) -> dict[str, int]:
        """The counters of the reported state."""
        out = dict(self.supervisor.counters())
        ob = self.access.current()
        if ob is not None:
            for name, st in ob.stats().items():
                out[f"{name}.produced"] = st.produced
                out[f"{name}.acked"] = st.acked
                out[f"{name}.pending"] = st.pending_records
                out[f"{name}.dropped"] = st.dropped
        if self.uplink is not None:
            out["chunks_refused"] = len(self.uplink.refused)
            if self.uplink.meter.available:
                out["wire_bytes_sent"] = self.uplink.meter.sent
                out["wire_bytes_received"] = self.uplink.meter.received
        return out

    async def _write_status(self) -> None:
        try:
            await asyncio.to_thread(write_status, self.data_dir, self.status())
        except OSError as exc:
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
        self.identity.prepare()
        twin = self.twin = Twin(self.data_dir / "twin", self.identity.label,
                                base_dir=self.data_dir / "pipelines")
        twin.load()
        spec = twin.startup_spec(cfg.pipeline)
        uplink = self.uplink = Uplink(self.identity, self.access, self.view, twin,
                                      self.data_dir / "uplink", cfg.uplink)
        twin.counters = self.counters
        twin.on_applied = uplink.request_report
        self._stop = asyncio.Event()
        if self._pending_stop:
            self._stop.set()
        self.state = "running"
        try:
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
                ]
                await self._stop.wait()
                self.state = "stopping"
                for t in others:
                    t.cancel()
                self.supervisor.stop()
                await engine_task
        except BaseExceptionGroup as group:  # the supervisor failed (its outbox, say)
            self.error = self.error or first_error(group)
        finally:
            self.view.close()
            self.state = "failed" if self.error is not None else "stopped"
            with contextlib.suppress(BaseException):
                await asyncio.shield(self._write_status())
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

    async def _apply(self, spec: PipelineSpec | None, state: DesiredState) -> str | None:
        log.info("applying desired v%d (%s)", state.version,
                 f"pipeline {spec.name}" if spec else "no pipeline")
        return await self.supervisor.apply(spec)
