"""The twin as pure data: versioned desired state down, reported state up.

Principles 3 and 8 of docs/architecture.md: the cloud owns intent, the node owns what happened;
intent survives absence, but not forever.

The cloud owns intent: a `DesiredState` (pipelines by name as YAML text, config, labels) with a
version that only grows and an optional expiry. ``pipelines`` is None when the cloud has never
named pipelines for the node (only config, setpoints or labels): the node then keeps running
its own pipeline (``edgewise agent run --pipeline``). An empty map is an explicit "no
pipeline": the node runs none. A node keeps the newest version it has validated and applied,
and persists it so it can start with no network. When it hears of new versions,
`choose_newest` decides what to do: apply only the newest one (a node back after days skips
every intermediate version), never an expired one, never go backwards. Expiry gates *applying*
an intent, not running it: a node keeps running what it applied.

``release`` names the release (`edgewise.sync.release`) the node should run, or None (no
release assigned: the pipelines above run as they are). It is sent only when set, so an agent
from before releases still reads every state that assigns none.

The edge owns what happened: a `ReportedState` (applied version, status, counters, and the
setpoints both sides may write, as an `LwwMap`).

Both convert to and from msgpack-able dicts (``to_wire`` / ``from_wire``; the latter raises
`PeerError` on malformed input and rejects unknown fields, so an agent too old for a new kind
of intent says so instead of ignoring it: an agent from before ``pipelines`` could be None
refuses such a state as malformed). `edgewise.common.files.write_atomic` and `load`
are the persistence helpers the agent uses for every file it must never find half-written.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgpack

from edgewise.common.files import write_atomic
from edgewise.errors import PeerError, StorageError
from edgewise.sync.merge import LwwMap, canonical_bytes
from edgewise.sync.release import check_version

MAX_VERSION = 2**63 - 1
PERSIST_FORMAT = 1

_DESIRED_FIELDS = ("version", "pipelines", "config", "labels", "expires_at")
_REPORTED_FIELDS = ("applied_version", "status", "counters", "setpoints")


def _version(name: str, v: Any, *, optional: bool = False) -> str | None:
    if v is None and optional:
        return None
    if type(v) is not int or not 1 <= v <= MAX_VERSION:
        return f"{name} must be an integer from 1 to {MAX_VERSION}, got {v!r:.40}"
    return None


def _str_map(name: str, d: Any, *, values: type | None = str) -> str | None:
    if not isinstance(d, dict):
        return f"{name} must be a map, got {type(d).__name__}"
    for k, v in d.items():
        if not isinstance(k, str) or not k:
            return f"{name} keys must be non-empty strings, got {k!r:.40}"
        if values is not None and not isinstance(v, values):
            return f"{name}[{k!r}] must be {values.__name__}, got {type(v).__name__}"
    return None


def _fields(kind: str, data: Any, names: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise PeerError(f"{kind} must be a map, got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in names)
    if unknown:
        raise PeerError(
            f"{kind} has unknown field(s) {', '.join(unknown)}: sent by a newer peer? "
            "Upgrade this agent before applying it"
        )
    missing = [n for n in names if n not in data]
    if missing:
        raise PeerError(f"{kind} is missing field(s) {', '.join(missing)}")
    return data


@dataclass(frozen=True)
class DesiredState:
    """What the cloud wants a node to run. ``expires_at`` is Unix seconds, or None.

    ``pipelines`` None: none named, the node runs its own ``--pipeline``; ``{}``: none to run.
    """

    version: int
    pipelines: dict[str, str] | None = None  # name -> pipeline YAML text; None: none named
    config: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    expires_at: float | None = None
    release: str | None = None  # the release version to run; None: none assigned

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem:
            raise ValueError(f"invalid desired state: {problem}")

    def _problem(self) -> str | None:
        problem = (
            _version("version", self.version)
            or (None if self.pipelines is None else _str_map("pipelines", self.pipelines))
            or _str_map("config", self.config, values=None)
            or _str_map("labels", self.labels)
        )
        if problem:
            return problem
        try:
            canonical_bytes(self.config)
        except ValueError as exc:
            return f"config: {exc}"
        e = self.expires_at
        if e is not None and (
            isinstance(e, bool) or not isinstance(e, int | float) or not math.isfinite(e)
        ):
            return f"expires_at must be a finite number of Unix seconds or null, got {e!r:.40}"
        if self.release is not None:
            try:
                check_version(self.release)
            except ValueError as exc:
                return f"release: {exc}"
        return None

    @property
    def names_pipelines(self) -> bool:
        """True if the cloud has said which pipelines to run (maybe none); False leaves the
        node's own ``--pipeline`` running."""
        return self.pipelines is not None

    def expired(self, now: float) -> bool:
        """True once ``now`` (Unix seconds) has reached ``expires_at``."""
        return self.expires_at is not None and now >= self.expires_at

    def to_wire(self) -> dict[str, Any]:
        wire = {
            "version": self.version,
            "pipelines": None if self.pipelines is None else dict(self.pipelines),
            "config": dict(self.config),
            "labels": dict(self.labels),
            "expires_at": self.expires_at,
        }
        if self.release is not None:  # only when set: older agents read the rest as before
            wire["release"] = self.release
        return wire

    @classmethod
    def from_wire(cls, data: Any) -> DesiredState:
        """Inverse of `to_wire`. Raises `PeerError` naming the bad field."""
        release = data.get("release") if isinstance(data, dict) else None
        if isinstance(data, dict) and "release" in data:
            data = {k: v for k, v in data.items() if k != "release"}
        d = _fields("desired state", data, _DESIRED_FIELDS)
        try:
            return cls(**{n: d[n] for n in _DESIRED_FIELDS}, release=release)
        except ValueError as exc:
            raise PeerError(str(exc)) from exc


@dataclass(frozen=True)
class Decision:
    """The outcome of `choose_newest`.

    ``apply`` is the state to validate, persist and apply, or None to keep the current one;
    ``reason`` says why in one line; ``skipped`` lists intermediate versions passed over;
    ``refused`` lists ``(version, why)`` for versions that must not be applied.
    """

    apply: DesiredState | None
    reason: str
    skipped: tuple[int, ...] = ()
    refused: tuple[tuple[int, str], ...] = ()


def _when(ts: float) -> str:
    try:
        return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return f"{ts} (Unix s)"


def choose_newest(
    current: DesiredState | None, offered: Iterable[DesiredState], *, now: float
) -> Decision:
    """Pick what to apply from ``offered``, given the ``current`` applied state.

    Only the newest offered version above the current one is a candidate; the versions between
    are skipped. If that newest version has expired at ``now`` (Unix seconds) it is refused and
    nothing is applied: an older intermediate version was superseded by it, so falling back to
    one would apply an intent the cloud has already replaced. Raises `PeerError` if two
    different states claim the same version.
    """
    by_version: dict[int, DesiredState] = {}
    for state in offered:
        seen = by_version.setdefault(state.version, state)
        if seen != state:
            raise PeerError(
                f"two different desired states claim version {state.version}; versions must "
                "identify one state"
            )
    have = current.version if current is not None else 0
    have_text = f"v{have}" if current is not None else "no desired state"
    if not by_version:
        return Decision(None, f"no desired state offered; keeping {have_text}")
    newer = sorted(v for v in by_version if v > have)
    if not newer:
        return Decision(
            None, f"already at {have_text}; offered v{max(by_version)} is not newer"
        )
    newest = by_version[newer[-1]]
    skipped = tuple(newer[:-1])
    expires = newest.expires_at
    if expires is not None and now >= expires:
        why = f"v{newest.version} expired at {_when(expires)} ({now - expires:.0f} s ago)"
        return Decision(None, f"{why}; keeping {have_text}", skipped, ((newest.version, why),))
    reason = f"apply v{newest.version} (was {have_text})"
    if skipped:
        reason += f", skipping {len(skipped)} intermediate version(s)"
    return Decision(newest, reason, skipped)


@dataclass(frozen=True)
class ReportedState:
    """What a node reports: the version it applied, its status, counters and setpoints."""

    applied_version: int | None
    status: str
    counters: dict[str, int] = field(default_factory=dict)
    setpoints: LwwMap = field(default_factory=LwwMap)

    def __post_init__(self) -> None:
        problem = _version("applied_version", self.applied_version, optional=True)
        if not problem and (not isinstance(self.status, str) or not self.status):
            problem = f"status must be a non-empty string, got {self.status!r:.40}"
        problem = problem or _str_map("counters", self.counters, values=int)
        if not problem:
            bad = [k for k, v in self.counters.items() if isinstance(v, bool) or v < 0]
            if bad:
                problem = f"counters[{bad[0]!r}] must be a non-negative integer"
        if not problem and not isinstance(self.setpoints, LwwMap):
            problem = f"setpoints must be an LwwMap, got {type(self.setpoints).__name__}"
        if problem:
            raise ValueError(f"invalid reported state: {problem}")

    def to_wire(self) -> dict[str, Any]:
        return {
            "applied_version": self.applied_version,
            "status": self.status,
            "counters": dict(self.counters),
            "setpoints": self.setpoints.to_wire(),
        }

    @classmethod
    def from_wire(cls, data: Any) -> ReportedState:
        """Inverse of `to_wire`. Raises `PeerError` naming the bad field."""
        d = _fields("reported state", data, _REPORTED_FIELDS)
        setpoints = LwwMap.from_wire(d["setpoints"])
        try:
            return cls(d["applied_version"], d["status"], d["counters"], setpoints)
        except ValueError as exc:
            raise PeerError(str(exc)) from exc


# -- persistence ------------------------------------------------------------------------------


def load(path: str | os.PathLike[str]) -> bytes | None:
    """The bytes of ``path``, or None if it does not exist. Raises `StorageError`."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from exc


def desired_bytes(state: DesiredState) -> bytes:
    """What `save_desired` writes (msgpack)."""
    return msgpack.packb({"format": PERSIST_FORMAT, "desired": state.to_wire()},
                         use_bin_type=True)


def save_desired(path: str | os.PathLike[str], state: DesiredState) -> None:
    """Persist the applied desired state atomically (msgpack)."""
    write_atomic(path, desired_bytes(state), mode=0o600)


def load_desired(path: str | os.PathLike[str]) -> DesiredState | None:
    """The desired state persisted at ``path``, or None if there is none yet.

    Raises `StorageError` if the file cannot be read or does not hold a desired state.
    """
    data = load(path)
    return None if data is None else parse_desired(data, path)


def parse_desired(data: bytes, path: str | os.PathLike[str]) -> DesiredState:
    """The desired state in a persisted file's bytes (`load_desired`); `StorageError`."""
    try:
        envelope = msgpack.unpackb(data, raw=False, strict_map_key=False)
        if not isinstance(envelope, dict) or envelope.get("format") != PERSIST_FORMAT:
            raise PeerError(f"expected a format-{PERSIST_FORMAT} desired-state file")
        return DesiredState.from_wire(envelope.get("desired"))
    except (PeerError, ValueError, TypeError, msgpack.UnpackException) as exc:
        raise StorageError(
            f"persisted desired state {path} is unreadable ({exc}); remove it to start from "
            "the cloud's state at the next connection"
        ) from exc
