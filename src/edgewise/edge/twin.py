"""The node's side of the twin: desired state down, reported state up.

**Desired state.** The cloud pokes (``welcome.desired_version``, ``desired`` messages); the twin
pulls ``GET /v1/device/desired`` (after a random wait within the poke's ``jitter_s`` hint, if it
carries one: a push to many nodes; a poke may carry a small state inline instead, no fetch) and
decides with `sync.twin_state.choose_newest` (the newest version only, never an expired one,
never backwards). A version it will apply is validated first: every pipeline YAML with
`edgewise.pipeline.spec.parse_pipeline` (and this agent runs exactly one pipeline, see
docs/agent.md), its files confined to ``DATA/pipelines`` and the folders allowed with
``--allow-path`` (`edgewise.pipeline.paths`), setpoints in ``config.setpoints`` as an LWW map.
Then its setpoints are merged, it is persisted atomically (``DATA/twin/desired.msgpack``) and
applied (the agent restarts the engine when the pipeline to run changed), and a report tells the
cloud the applied version. A version that fails validation is remembered as refused (with the
reason, in the reported status) and not pulled again.

A version whose setpoints this node's clock refuses (stamped more than the HLC's drift bound
ahead of it, `sync.hlc.ClockDriftError`) is *held*: nothing of it is applied or persisted, the
reported status and ``agent status`` say why, and it is tried again (``retry`` seconds apart)
until the clock is right, the cloud offers a newer version, or it expires.

Which pipeline runs: the one the desired state names; none if it names an empty set; the
node's own ``--pipeline FILE`` when there is no desired state or it names no pipelines at all
(``DesiredState.pipelines`` None: the cloud only set config, setpoints or labels). A node
started with no network runs from the persisted state by the same rule.

**Reported state.** `ReportedState`: applied version, a one-line status, counters, and the
setpoints both sides may write, an `LwwMap` stamped by this node's hybrid logical clock. The
map, the clock's last timestamp and an audit trail of overwritten values (the newest 1,000) are
persisted in ``DATA/twin/reported.msgpack``, so timestamps keep growing across restarts.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import msgpack

from edgewise.common.files import write_atomic
from edgewise.edge import twin_files
from edgewise.edge.damaged import reason, set_aside
from edgewise.edge.status_model import TwinStatus
from edgewise.edge.twin_files import DESIRED_FILE, REPORTED_FILE, REPORTED_FORMAT
from edgewise.edge.twin_files import damaged_files as damaged_files  # `agent status`
from edgewise.errors import ConfigError, PeerError, StorageError, TransportError
from edgewise.pipeline.paths import Confinement
from edgewise.pipeline.spec import PipelineSpec, load_pipeline, parse_pipeline
from edgewise.security.payload import PayloadCipher
from edgewise.sync.hlc import HLC, Clock, ClockDriftError, system_ms
from edgewise.sync.merge import AuditRecord, LwwMap
from edgewise.sync.protocol import MAX_JITTER_S
from edgewise.sync.twin_state import DesiredState, ReportedState, choose_newest

log = logging.getLogger(__name__)

MAX_AUDIT = 1000

Fetch = Callable[[], Awaitable[dict[str, Any]]]
Apply = Callable[[PipelineSpec | None, DesiredState], Awaitable[str | None]]


class DesiredRefused(ConfigError):
    """A desired state that cannot be applied on this node (invalid pipeline, too many...)."""


LOCAL = "--pipeline"
"""`pipeline_key` of a node running its own ``--pipeline`` (or nothing, without one)."""


def pipeline_key(state: DesiredState | None) -> object:
    """What decides the pipeline a state runs: `LOCAL` when it names no pipelines (or there is
    no state), else its pipelines. The engine restarts only when this changes."""
    if state is None or state.pipelines is None:
        return LOCAL
    return tuple(sorted(state.pipelines.items()))


def build_spec(state: DesiredState, base_dir: Path,
               allowed: Sequence[Path] = ()) -> PipelineSpec | None:
    """Validate the pipelines of ``state``; the one pipeline it names, or None when it names
    none (``{}``) or no pipelines at all (None: the caller runs ``--pipeline``). Their files
    must lie in ``base_dir`` (relative paths are taken from it) or in ``allowed``
    (`edgewise.pipeline.paths`).

    Raises `DesiredRefused` naming the version and the problem (with file:line of the YAML).
    """
    pipelines = state.pipelines or {}
    if len(pipelines) > 1:
        names = ", ".join(sorted(pipelines))
        raise DesiredRefused(
            f"desired v{state.version} assigns {len(pipelines)} pipelines ({names}); "
            "this agent runs one pipeline per node"
        )
    setpoints = state.config.get("setpoints")
    if setpoints is not None:
        try:
            LwwMap.from_wire(setpoints)
        except PeerError as exc:
            raise DesiredRefused(f"desired v{state.version}: config.setpoints: {exc}") from None
    for name, text in pipelines.items():
        try:
            return parse_pipeline(text, f"desired-v{state.version}-{name}.yaml",
                                  confinement=Confinement(base_dir, tuple(allowed)))
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
        allowed_roots: Sequence[Path] = (),
        now: Callable[[], float] = time.time,
        now_ms: Callable[[], int] = system_ms,
        cipher: PayloadCipher | None = None,
    ) -> None:
        self.dir = Path(state_dir)
        self.cipher = cipher  # the files encrypted at rest (`twin_files`; --tpm)
        self.base_dir = Path(base_dir)
        self.allowed_roots = tuple(Path(p) for p in allowed_roots)  # --allow-path
        self.node = node
        self.now = now  # Unix s: expiry of desired states
        self.now_ms = now_ms  # Unix ms: the physical clock under the HLC
        self.desired: DesiredState | None = None
        self.refused: dict[int, str] = {}  # version -> why (this process)
        self.held: DesiredState | None = None  # valid, but its setpoints wait for the clock
        self.held_why = ""
        self.held_tries = 0
        self.skipped: list[int] = []
        self.local_file: Path | None = None  # --pipeline
        self.local_spec: PipelineSpec | None = None
        self.running: object = None  # pipeline_key of what the engine was given
        self.setpoints = LwwMap()
        self.audit: list[AuditRecord] = []
        self.clock = Clock(node, now_ms)
        self.status_text = "starting"
        self.counters: Callable[[], dict[str, int]] = dict
        self.on_applied: Callable[[], None] = lambda: None
        self.release_text: Callable[[], str] | None = None  # the updater's line, reported
        self.pulls = 0
        self._wanted = 0
        self._jitter = 0.0  # s: the cloud's fetch jitter hint of the pending poke
        self._inline: dict[str, Any] | None = None  # the pending poke's state, as fetched
        self.jitter_waited = 0.0  # s waited before fetches, in all
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        self.uniform: Callable[[float, float], float] = random.uniform
        self._poked: asyncio.Event | None = None

    @property
    def desired_path(self) -> Path:
        return self.dir / DESIRED_FILE

    @property
    def reported_path(self) -> Path:
        return self.dir / REPORTED_FILE

    # -- start ------------------------------------------------------------------------------
    def load(self) -> None:
        """Read the persisted desired state, setpoints and clock. Raises `StorageError`, and
        `DamagedFile` for a damaged reported state; a damaged desired state is moved aside
        (logged): the control plane sends it again."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {self.dir}: {exc.strerror or exc}") from exc
        try:
            self.desired = twin_files.load_desired(self.desired_path, self.cipher)
        except StorageError as exc:
            if isinstance(exc.__cause__, OSError):
                raise
            # the control plane's intent, sent again when the node connects: safe to drop
            why = reason(exc.__cause__, twin_files.peek(self.desired_path))
            moved = set_aside(self.desired_path)
            log.warning("%s is damaged (%s); %s, running --pipeline (or nothing) until the "
                        "desired state is pulled again from the control plane",
                        self.desired_path, why, f"moved to {moved.name}" if moved else "ignored")
        last: HLC | None = None
        raw = twin_files.read(self.reported_path, self.cipher)
        if raw is not None:
            self.setpoints, last, self.audit = twin_files.read_reported(self.reported_path, raw)
        newest = self.setpoints.max_hlc()
        if newest is not None and (last is None or newest > last):
            last = newest
        if last is not None:
            last = HLC(last.wall_ms, last.logical, self.node)
        self.clock = Clock(self.node, self.now_ms, last=last)

    def startup_spec(self, pipeline_file: Path | None) -> PipelineSpec | None:
        """What to run before hearing from the cloud: the pipeline the persisted desired state
        names (none if it names an empty set), else ``--pipeline``, else nothing. A persisted
        state that no longer validates (an upgrade changed the rules) is an error the operator
        must see."""
        self.local_file = pipeline_file
        desired = self.desired
        self.running = pipeline_key(desired)
        if desired is not None:
            spec = build_spec(desired, self.base_dir, self.allowed_roots)
            if desired.names_pipelines:
                if pipeline_file is not None:
                    log.info("running desired v%d from the control plane; --pipeline %s is "
                             "not used", desired.version, pipeline_file)
                self.status_text = "running" if spec else "idle: no pipeline assigned"
                return spec
        if pipeline_file is not None:
            self.local_spec = load_pipeline(pipeline_file)
            self.status_text = self._local_text(desired)
            return self.local_spec
        self.status_text = "idle: no pipeline assigned"
        return None

    def _local_text(self, desired: DesiredState | None) -> str:
        if desired is None:
            return f"no desired state yet: running --pipeline {self.local_file}"
        return f"running --pipeline {self.local_file} (desired v{desired.version} names no " \
               "pipeline)"

    # -- desired ----------------------------------------------------------------------------
    def applied_version(self) -> int:
        return self.desired.version if self.desired is not None else 0

    def on_desired(self, version: int, jitter: float = 0.0,
                   state: dict[str, Any] | None = None) -> None:
        """The cloud has ``version``: pull it unless we have it or refused it. With ``jitter``
        (s; a push to many nodes) the pull waits a uniformly random part of it first, so the
        fleet's fetches spread out; with ``state`` (inline in the poke) it waits for nothing."""
        if version <= self.applied_version() or version in self.refused:
            return
        if version >= self._wanted:
            self._inline = {"version": version, "desired": state} if state is not None else None
        self._wanted = max(self._wanted, version)
        self._jitter = max(self._jitter, min(max(jitter, 0.0), MAX_JITTER_S))
        if self._poked is not None:
            self._poked.set()

    async def run(
        self, fetch: Fetch, apply: Apply, retry: Callable[[int], float] = lambda n: 1.0
    ) -> None:
        """Pull and apply whenever poked, forever. Network failures are retried with
        ``retry(attempt)`` seconds between tries while a newer version is wanted; a held
        version (`retry_held`) is tried again ``retry(tries)`` seconds apart."""
        self._poked = asyncio.Event()
        if self._wanted > self.applied_version():
            self._poked.set()
        failures = 0
        while True:
            if self.held is not None and not self._poked.is_set():
                try:
                    await asyncio.wait_for(self._poked.wait(), retry(self.held_tries + 1))
                except TimeoutError:
                    try:
                        await self.retry_held(apply)
                    except (PeerError, StorageError) as exc:
                        log.warning("cannot apply held desired state: %s", exc)
                    continue
            await self._poked.wait()
            self._poked.clear()
            if self._wanted <= self.applied_version() or self._wanted in self.refused:
                continue
            inline, self._inline = self._inline, None  # a poke's state: no wait, no fetch
            if self._jitter > 0:
                wait, self._jitter = (self.uniform(0.0, self._jitter) if inline is None else 0), 0.0
                self.jitter_waited += wait
                await self.sleep(wait)
            try:
                await self.pull(fetch, apply, inline)
                failures = 0
            except (TransportError, PeerError, StorageError) as exc:
                failures += 1
                delay = retry(failures)
                log.warning("cannot fetch desired v%d: %s; retrying in %.1f s",
                            self._wanted, exc, delay)
                await asyncio.sleep(delay)
                self._poked.set()

    async def pull(self, fetch: Fetch, apply: Apply, answer: dict[str, Any] | None = None) -> bool:
        """Fetch the cloud's desired state (unless a poke brought it: ``answer``) and apply it
        if `choose_newest` says so. Returns True if a new version was applied."""
        self.pulls += 1
        answer = answer if answer is not None else await fetch()
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
        if self.held is not None and state.version > self.held.version:
            self._unhold()  # superseded: never fall back to it (docs/architecture.md, 8)
        return await self._consider(state, apply)

    async def retry_held(self, apply: Apply) -> bool:
        """Try the held version again (its setpoints may merge now that the clock moved).
        Returns True if it was applied."""
        if self.held is None:
            return False
        self.held_tries += 1
        return await self._consider(self.held, apply)

    async def _consider(self, state: DesiredState, apply: Apply) -> bool:
        decision = choose_newest(self.desired, [state], now=self.now())
        self.skipped.extend(decision.skipped)
        for v, why in decision.refused:
            self._unhold()
            self._refuse(v, why)
        if decision.apply is None:
            log.info("desired state: %s", decision.reason)
            return False
        new = decision.apply
        try:
            spec = build_spec(new, self.base_dir, self.allowed_roots)
        except DesiredRefused as exc:
            self._refuse(new.version, str(exc))
            return False
        if not new.names_pipelines:
            spec = self.local_spec
        # setpoints first: a version this node's clock cannot take is held, nothing of it applied
        try:
            self._merge_setpoints(new)
        except ClockDriftError as exc:
            self._hold(new, exc)
            return False
        self._unhold()
        await asyncio.to_thread(twin_files.save_desired, self.desired_path, new, self.cipher)
        self.desired = new
        log.info("desired state: %s", decision.reason)
        key = pipeline_key(new)
        error = None
        if key != self.running:
            error = await apply(spec, new)
            self.running = key
        else:
            log.info("desired v%d leaves the pipeline as it is: the engine is not restarted",
                     new.version)
        if error:
            self.status_text = f"desired v{new.version} applied, engine failed: {error}"
        elif not new.names_pipelines and self.local_spec is not None:
            self.status_text = self._local_text(new)
        else:
            self.status_text = (f"running desired v{new.version}" if spec
                                else f"idle: desired v{new.version} has no pipeline")
        self.on_applied()
        return True

    def _hold(self, state: DesiredState, exc: ClockDriftError) -> None:
        why = (f"its setpoints are stamped {exc.ahead_ms / 1000:.1f} s ahead of this node's "
               f"clock (allowed: {exc.max_drift_ms / 1000:.1f} s); retrying until the clock "
               "is right (check NTP/chrony)")
        again = self.held is not None and self.held.version == state.version
        self.held, self.held_why = state, why
        self.status_text = f"desired v{state.version} not applied: {why}"
        if again:
            log.debug("desired v%d still held: %s", state.version, why)
            return
        self.held_tries = 0
        log.error("not applying desired v%d yet: %s", state.version, exc)
        self.on_applied()

    def _unhold(self) -> None:
        self.held, self.held_why, self.held_tries = None, "", 0

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
        """Merge the setpoints of ``state`` (validated by `build_spec`). Raises
        `ClockDriftError`, changing nothing, if this node's clock cannot take them."""
        wire = state.config.get("setpoints")
        if wire is not None:
            self.merge_setpoints(LwwMap.from_wire(wire))

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
        write_atomic(self.reported_path, twin_files.seal(
            msgpack.packb(body, use_bin_type=True), self.cipher, self.reported_path), mode=0o600)

    # -- reported ---------------------------------------------------------------------------
    def reported(self) -> ReportedState:
        applied = self.desired.version if self.desired is not None else None
        counters = {k: v for k, v in self.counters().items()
                    if isinstance(v, int) and not isinstance(v, bool) and v >= 0}
        status = self.status_text or "running"
        release = self.release_text() if self.release_text is not None else ""
        if release:
            status = f"{status}; {release}"
        return ReportedState(applied, status, counters, self.setpoints)

    def report(self) -> dict[str, Any]:
        """The reported state in wire form (the body of a ``report`` message)."""
        return self.reported().to_wire()

    def status(self) -> TwinStatus:
        return TwinStatus(
            applied_version=self.applied_version(),
            wanted_version=max(self._wanted, self.applied_version()),
            status=self.status_text,
            refused={str(v): why for v, why in self.refused.items()},
            held={str(self.held.version): self.held_why} if self.held is not None else {},
            skipped_versions=self.skipped[-20:],
            setpoints=self.setpoints.to_dict(),
            audit_records=len(self.audit),
            pulls=self.pulls,
        )
