"""The node's side of the twin: desired state down, reported state up.

**Desired state.** The cloud pokes (``welcome.desired_version``, ``desired`` messages); the twin
pulls ``GET /v1/device/desired`` and decides with `sync.twin_state.choose_newest` (the newest
version only, never an expired one, never backwards). A version it will apply is validated
first: every pipeline YAML with `edgewise.pipeline.spec.parse_pipeline` (and this agent runs
exactly one pipeline, see docs/agent.md), setpoints in ``config.setpoints`` as an LWW map.
Then it is persisted atomically (``DATA/twin/desired.msgpack``) and applied (the agent restarts
the engine), and a report tells the cloud the applied version. A version that fails validation
is remembered as refused (with the reason, in the reported status) and not pulled again.

A node started with no network runs from the persisted state, or from ``--pipeline FILE``
while it has none.

**Reported state.** `ReportedState`: applied version, a one-line status, counters, and the
setpoints both sides may write, an `LwwMap` stamped by this node's hybrid logical clock. The
map, the clock's last timestamp and an audit trail of overwritten values (the newest 1,000) are
persisted in ``DATA/twin/reported.msgpack``, so timestamps keep growing across restarts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack

from edgewise.errors import ConfigError, PeerError, StorageError, TransportError
from edgewise.pipeline.spec import PipelineSpec, load_pipeline, parse_pipeline
from edgewise.sync import twin_state
from edgewise.sync.hlc import HLC, Clock, ClockDriftError
from edgewise.sync.merge import AuditRecord, LwwMap
from edgewise.sync.twin_state import DesiredState, ReportedState, choose_newest

log = logging.getLogger(__name__)

DESIRED_FILE = "desired.msgpack"
REPORTED_FILE = "reported.msgpack"
MAX_AUDIT = 1000
REPORTED_FORMAT = 1

Fetch = Callable[[], Awaitable[dict[str, Any]]]
Apply = Callable[[PipelineSpec | None, DesiredState], Awaitable[str | None]]


class DesiredRefused(ConfigError):
    """A desired state that cannot be applied on this node (invalid pipeline, too many...)."""


def build_spec(state: DesiredState, base_dir: Path) -> PipelineSpec | None:
    """Validate the pipelines of ``state``; the one pipeline to run, or None for none.

    Raises `DesiredRefused` naming the version and the problem (with file:line of the YAML).
    """
    if len(state.pipelines) > 1:
        names = ", ".join(sorted(state.pipelines))
        raise DesiredRefused(
            f"desired v{state.version} assigns {len(state.pipelines)} pipelines ({names}); "
            "this agent runs one pipeline per node"
        )
    setpoints = state.config.get("setpoints")
    if setpoints is not None:
        try:
            LwwMap.from_wire(setpoints)
        except PeerError as exc:
            raise DesiredRefused(f"desired v{state.version}: config.setpoints: {exc}") from None
    for name, text in state.pipelines.items():
        try:
            return parse_pipeline(text, f"desired-v{state.version}-{name}.yaml",
                                  base_dir=base_dir)
        except ConfigError as exc:
            raise DesiredRefused(
                f"desired v{state.version} pipeline {name!r} is invalid:\n{exc}"
            ) from None
    return None


class Twin:
    """See the module docstring. ``fetch``/``apply`` are given to `run`; the agent wires them."""

    def __init__(
        self,
        state_dir: str | Path,
        node: str,
        *,
        base_dir: str | Path,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.dir = Path(state_dir)
        self.base_dir = Path(base_dir)
        self.node = node
        self.now = now
        self.desired: DesiredState | None = None
        self.refused: dict[int, str] = {}  # version -> why (this process)
        self.skipped: list[int] = []
        self.setpoints = LwwMap()
        self.audit: list[AuditRecord] = []
        self.clock = Clock(node)
        self.status_text = "starting"
        self.counters: Callable[[], dict[str, int]] = dict
        self.on_applied: Callable[[], None] = lambda: None
        self.pulls = 0
        self._wanted = 0
        self._poked: asyncio.Event | None = None

    @property
    def desired_path(self) -> Path:
        return self.dir / DESIRED_FILE

    @property
    def reported_path(self) -> Path:
        return self.dir / REPORTED_FILE

    # -- start ------------------------------------------------------------------------------
    def load(self) -> None:
        """Read the persisted desired state, setpoints and clock. Raises `StorageError`."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {self.dir}: {exc.strerror or exc}") from exc
        self.desired = twin_state.load_desired(self.desired_path)
        raw = twin_state.load(self.reported_path)
        last: HLC | None = None
        if raw is not None:
            try:
                data = msgpack.unpackb(raw, raw=False, strict_map_key=False)
                if not isinstance(data, dict) or data.get("format") != REPORTED_FORMAT:
                    raise PeerError("not a reported-state file")
                self.setpoints = LwwMap.from_wire(data["setpoints"])
                last = HLC.from_tuple(data["clock"])
                self.audit = [AuditRecord.from_wire(a) for a in data.get("audit", [])]
            except (PeerError, KeyError, TypeError, ValueError, msgpack.UnpackException) as exc:
                raise StorageError(
                    f"{self.reported_path} is unreadable ({exc}); move it away to start with "
                    "empty setpoints"
                ) from None
        newest = self.setpoints.max_hlc()
        if newest is not None and (last is None or newest > last):
            last = newest
        if last is not None:
            last = HLC(last.wall_ms, last.logical, self.node)
        self.clock = Clock(self.node, last=last)

    def startup_spec(self, pipeline_file: Path | None) -> PipelineSpec | None:
        """What to run before hearing from the cloud: the persisted desired state, else
        ``--pipeline``, else nothing. A persisted state that no longer validates (an
        upgrade changed the rules) is an error the operator must see."""
        if self.desired is not None:
            if pipeline_file is not None:
                log.info("running desired v%d from the control plane; --pipeline %s is not "
                         "used", self.desired.version, pipeline_file)
            spec = build_spec(self.desired, self.base_dir)
            self.status_text = "running" if spec else "idle: no pipeline assigned"
            return spec
        if pipeline_file is not None:
            self.status_text = f"no desired state yet: running --pipeline {pipeline_file}"
            return load_pipeline(pipeline_file)
        self.status_text = "idle: no pipeline assigned"
        return None

    # -- desired ----------------------------------------------------------------------------
    def applied_version(self) -> int:
        return self.desired.version if self.desired is not None else 0

    def on_desired(self, version: int) -> None:
        """The cloud has ``version``: pull it unless we have it or refused it."""
        if version <= self.applied_version() or version in self.refused:
            return
        self._wanted = max(self._wanted, version)
        if self._poked is not None:
            self._poked.set()

    async def run(
        self, fetch: Fetch, apply: Apply, retry: Callable[[int], float] = lambda n: 1.0
    ) -> None:
        """Pull and apply whenever poked, forever. Network failures are retried with
        ``retry(attempt)`` seconds between tries while a newer version is wanted."""
        self._poked = asyncio.Event()
        if self._wanted > self.applied_version():
            self._poked.set()
        failures = 0
        while True:
            await self._poked.wait()
            self._poked.clear()
            if self._wanted <= self.applied_version() or self._wanted in self.refused:
                continue
            try:
                await self.pull(fetch, apply)
                failures = 0
            except (TransportError, PeerError, StorageError) as exc:
                failures += 1
                delay = retry(failures)
                log.warning("cannot fetch desired v%d: %s; retrying in %.1f s",
                            self._wanted, exc, delay)
                await asyncio.sleep(delay)
                self._poked.set()

    async def pull(self, fetch: Fetch, apply: Apply) -> bool:
        """Fetch the cloud's desired state and apply it if `choose_newest` says so.
        Returns True if a new version was applied."""
        self.pulls += 1
        answer = await fetch()
        raw, version = answer.get("desired"), answer.get("version")
        if raw is None or not version:
            self._wanted = self.applied_version()
            return False
        try:
            state = DesiredState.from_wire(raw)
        except PeerError as exc:
            if isinstance(version, int) and not isinstance(version, bool):
                self._refuse(version, f"desired v{version} is malformed: {exc}")
            raise
        if state.version != version:
            raise PeerError(f"desired answer says version {version!r} but holds "
                            f"v{state.version}")
        self._wanted = state.version  # what the cloud has now; an older poke is moot
        decision = choose_newest(self.desired, [state], now=self.now())
        self.skipped.extend(decision.skipped)
        for v, why in decision.refused:
            self._refuse(v, why)
        if decision.apply is None:
            log.info("desired state: %s", decision.reason)
            return False
        try:
            spec = build_spec(decision.apply, self.base_dir)
        except DesiredRefused as exc:
            self._refuse(decision.apply.version, str(exc))
            return False
        await asyncio.to_thread(twin_state.save_desired, self.desired_path, decision.apply)
        self.desired = decision.apply
        self._merge_setpoints(decision.apply)
        log.info("desired state: %s", decision.reason)
        error = await apply(spec, decision.apply)
        if error:
            self.status_text = f"desired v{decision.apply.version} applied, engine failed: {error}"
        else:
            self.status_text = (f"running desired v{decision.apply.version}" if spec
                                else f"idle: desired v{decision.apply.version} has no pipeline")
        self.on_applied()
        return True

    def _refuse(self, version: int, why: str) -> None:
        self.refused[version] = why
        self.status_text = f"desired v{version} refused: {why.splitlines()[0]}"
        log.error("not applying desired v%d: %s", version, why)
        self.on_applied()

    # -- setpoints --------------------------------------------------------------------------
    def set_setpoint(self, key: str, value: Any) -> AuditRecord | None:
        """A local write (e.g. on site during an outage), stamped by this node's clock."""
        hlc = self.clock.now()
        lost = self.setpoints.set(key, value, hlc, at=hlc)
        if lost is not None:
            self._audit([lost])
        self._save_reported()
        return lost

    def merge_setpoints(self, remote: LwwMap) -> list[AuditRecord]:
        """Merge the cloud's view of the setpoints; returns (and keeps) the overwritten ones.

        A remote timestamp too far ahead of our clock is refused (`ClockDriftError`)."""
        newest = remote.max_hlc()
        if newest is not None:
            self.clock.update(newest)
        merged, lost = self.setpoints.merge(remote, at=self.clock.now())
        self.setpoints = merged
        self._audit(lost)
        self._save_reported()
        return lost

    def _merge_setpoints(self, state: DesiredState) -> None:
        wire = state.config.get("setpoints")
        if wire is None:
            return
        try:
            self.merge_setpoints(LwwMap.from_wire(wire))
        except (PeerError, ClockDriftError) as exc:
            log.error("setpoints of desired v%d not merged: %s", state.version, exc)

    def _audit(self, records: list[AuditRecord]) -> None:
        for r in records:
            log.info("setpoint %s: value %r (by %s) overwritten by a later write", r.key,
                     r.lost_value, r.lost_origin or r.lost_hlc.node)
        self.audit = (self.audit + records)[-MAX_AUDIT:]

    def _save_reported(self) -> None:
        body = {
            "format": REPORTED_FORMAT,
            "setpoints": self.setpoints.to_wire(),
            "clock": list(self.clock.last.to_tuple()),
            "audit": [a.to_wire() for a in self.audit],
        }
        twin_state.save_atomic(self.reported_path, msgpack.packb(body, use_bin_type=True))

    # -- reported ---------------------------------------------------------------------------
    def reported(self) -> ReportedState:
        applied = self.desired.version if self.desired is not None else None
        counters = {k: v for k, v in self.counters().items()
                    if isinstance(v, int) and not isinstance(v, bool) and v >= 0}
        return ReportedState(applied, self.status_text or "running", counters, self.setpoints)

    def report(self) -> dict[str, Any]:
        """The reported state in wire form (the body of a ``report`` message)."""
        return self.reported().to_wire()

    def status(self) -> dict[str, Any]:
        return {
            "applied_version": self.applied_version(),
            "wanted_version": max(self._wanted, self.applied_version()),
            "status": self.status_text,
            "refused": {str(v): why for v, why in self.refused.items()},
            "skipped_versions": self.skipped[-20:],
            "setpoints": self.setpoints.to_dict(),
            "audit_records": len(self.audit),
            "pulls": self.pulls,
        }
