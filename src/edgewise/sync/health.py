"""A node's health as its heartbeat carries it (``heartbeat.health``; docs/operations.md,
"Health states").

The node sends what only it knows: its agent's CPU share and memory, the free space where its
data lives, its outbox per priority (records waiting, and the age of the oldest waiting chunk),
its pipelines' states and errors, the release it runs (and the last one that failed), and its
certificate's expiry. The control plane adds the clock offset (its receive time minus the
heartbeat's ``ts``) and keeps the newest per node.

The map crosses a trust boundary, so `clean` (and `NodeHealth.from_wire`, built on it) takes
only what it knows, each value checked and bounded (at most `MAX_PRIORITIES` priorities,
`MAX_PIPELINES` pipelines, texts cut to `MAX_TEXT` characters, numbers finite and within
range) and raises `PeerError` for anything malformed. The frame itself was bounded before it
was unpacked (`protocol.decode`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from edgewise.errors import PeerError

MAX_PRIORITIES = 16
MAX_PIPELINES = 16
MAX_TEXT = 256
MAX_BYTES = 2**62  # memory and disk figures
MAX_AGE_S = 10 * 365 * 86400.0


@dataclass(frozen=True)
class OutboxLevel:
    """Records of one priority waiting in the outbox, and the age of the oldest waiting chunk."""

    records: int
    age_s: float


@dataclass(frozen=True)
class PipelineHealth:
    state: str  # the engine supervisor's: starting, running, restarting, finished, idle, ...
    error: str | None = None


@dataclass(frozen=True)
class NodeHealth:
    cpu_percent: float | None = None  # the agent process, since the previous heartbeat
    memory_bytes: int | None = None  # the agent process's resident memory
    disk_free_bytes: int | None = None  # free where the node's data lives
    disk_total_bytes: int | None = None
    outbox: dict[int, OutboxLevel] = field(default_factory=dict)  # by priority (9 alarms)
    pipelines: dict[str, PipelineHealth] = field(default_factory=dict)
    release: str | None = None  # the release running; None: none
    release_failed: str | None = None  # the newest release that failed on this node
    cert_expires: float | None = None  # epoch seconds

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "outbox": {str(p): [o.records, o.age_s] for p, o in sorted(self.outbox.items())},
            "pipelines": {n: [p.state, p.error] for n, p in sorted(self.pipelines.items())},
        }
        for key, value in (("cpu", self.cpu_percent), ("mem", self.memory_bytes),
                           ("disk_free", self.disk_free_bytes),
                           ("disk_total", self.disk_total_bytes), ("release", self.release),
                           ("release_failed", self.release_failed),
                           ("cert_expires", self.cert_expires)):
            if value is not None:
                out[key] = value
        return out

    @classmethod
    def from_wire(cls, raw: object) -> NodeHealth:
        """The health in ``raw`` (a heartbeat's ``health``); `PeerError` if malformed."""
        w = clean(raw)
        return cls(
            cpu_percent=w.get("cpu"), memory_bytes=w.get("mem"),
            disk_free_bytes=w.get("disk_free"), disk_total_bytes=w.get("disk_total"),
            outbox={int(p): OutboxLevel(n, a) for p, (n, a) in w["outbox"].items()},
            pipelines={n: PipelineHealth(st, e) for n, (st, e) in w["pipelines"].items()},
            release=w.get("release"), release_failed=w.get("release_failed"),
            cert_expires=w.get("cert_expires"))


_NUMBERS = (("cpu", 100_000.0), ("cert_expires", 2.0**40))
_INTEGERS = ("mem", "disk_free", "disk_total")
_TEXTS = ("release", "release_failed")


def clean(raw: object) -> dict[str, Any]:
    """``raw`` checked and bounded, in the wire form `NodeHealth.to_wire` gives (numbers as
    floats, texts cut to `MAX_TEXT`, unknown keys left out): what the control plane keeps per
    node, built in one pass without the dataclasses. Raises `PeerError` if malformed."""
    if not isinstance(raw, dict):
        raise PeerError(f"health must be a map, got {type(raw).__name__}")
    outbox_raw = raw.get("outbox", {})
    if not isinstance(outbox_raw, dict) or len(outbox_raw) > MAX_PRIORITIES:
        raise PeerError(f"health.outbox must be a map of at most {MAX_PRIORITIES} priorities")
    outbox: dict[str, list[Any]] = {}
    for key, value in outbox_raw.items():
        if not (isinstance(key, str) and key.isdigit() and len(key) <= 3):
            raise PeerError(f"health.outbox: priority {str(key)[:20]!r} is not a number")
        if not (isinstance(value, list) and len(value) == 2):
            raise PeerError("health.outbox: each priority is [records, age_s]")
        outbox[str(int(key))] = [_int(value[0], "outbox records", MAX_BYTES),
                                 _num(value[1], "outbox age_s", MAX_AGE_S)]
    pipes_raw = raw.get("pipelines", {})
    if not isinstance(pipes_raw, dict) or len(pipes_raw) > MAX_PIPELINES:
        raise PeerError(f"health.pipelines must be a map of at most {MAX_PIPELINES}")
    pipelines: dict[str, list[Any]] = {}
    for name, value in pipes_raw.items():
        if not (isinstance(value, list) and len(value) == 2):
            raise PeerError("health.pipelines: each pipeline is [state, error]")
        pipelines[_text(name, "pipeline name") or "-"] = [
            _text(value[0], "pipeline state") or "-", _text(value[1], "pipeline error")]
    out: dict[str, Any] = {"outbox": outbox, "pipelines": pipelines}
    for key, top in _NUMBERS:
        value = raw.get(key)
        if value is not None:
            out[key] = _num(value, key, top)
    for key in _INTEGERS:
        value = raw.get(key)
        if value is not None:
            out[key] = _int(value, key, MAX_BYTES)
    for key in _TEXTS:
        value = raw.get(key)
        if value is not None:
            out[key] = _text(value, key)
    return out


def _num(value: object, what: str, top: float) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or not 0 <= value <= top:
        raise PeerError(f"health.{what} must be a number from 0 to {top:g}")
    return float(value)


def _int(value: object, what: str, top: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        raise PeerError(f"health.{what} must be an integer from 0 to {top}")
    return value


def _text(value: object, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise PeerError(f"health.{what} must be text")
    return value[:MAX_TEXT]
