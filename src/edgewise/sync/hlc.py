"""Hybrid logical clock (Kulkarni et al., 2014): timestamps that order events across nodes.

A timestamp is ``HLC(wall_ms, logical, node)``: the largest physical time (Unix milliseconds)
seen so far, a counter for events within that millisecond, and the id of the node that made it.
Timestamps are totally ordered by ``(wall_ms, logical, node)``; the node id is the deterministic
tie-break, so two different nodes never produce equal timestamps.

`Clock` is the per-node clock: ``now()`` for a local or send event, ``update(remote)`` when a
timestamp arrives from another node. It follows the standard algorithm, and refuses a remote
timestamp whose wall time is more than ``max_drift_ms`` (default 60 s) ahead of this node's
physical clock, so one node with a runaway clock cannot drag every replica into the future.

Encodings, each sorting exactly like the timestamps themselves:
* ``encode()`` / ``HLC.parse``: ``"<wall: 12 hex>-<logical: 8 hex>-<node>"``, lowercase;
* ``to_bytes()`` / ``HLC.from_bytes``: 6 bytes wall + 4 bytes logical (big-endian) + UTF-8 node;
* ``to_tuple()`` / ``HLC.from_tuple``: ``(wall_ms, logical, node)`` for msgpack.

Malformed input on the decoding side raises `PeerError`; building an `HLC` from bad values in
code raises `ValueError`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgewise.errors import EdgewiseError, PeerError

WALL_BITS = 48  # ms since 1970: good until the year 10889
LOGICAL_BITS = 32
MAX_WALL = 2**WALL_BITS - 1
MAX_LOGICAL = 2**LOGICAL_BITS - 1
MAX_NODE_CHARS = 128
DEFAULT_MAX_DRIFT_MS = 60_000  # ms a remote clock may be ahead of ours

_WALL_HEX = WALL_BITS // 4
_LOGICAL_HEX = LOGICAL_BITS // 4
_NODE_AT = _WALL_HEX + 1 + _LOGICAL_HEX + 1  # where the node starts in the text form
_FIXED_BYTES = (WALL_BITS + LOGICAL_BITS) // 8
_HEX = frozenset("0123456789abcdef")


class ClockError(EdgewiseError):
    """This node's clock cannot produce a timestamp (logical counter exhausted)."""


class ClockDriftError(PeerError):
    """A remote timestamp is further ahead of our physical clock than allowed."""

    def __init__(self, remote: HLC, local_ms: int, max_drift_ms: int, node: str) -> None:
        self.remote = remote
        self.ahead_ms = remote.wall_ms - local_ms
        self.max_drift_ms = max_drift_ms
        super().__init__(
            f"timestamp from node {remote.node!r} is {self.ahead_ms} ms ahead of the clock of "
            f"node {node!r} (allowed: {max_drift_ms} ms); refusing it so one bad clock cannot "
            "push every replica into the future. Check time synchronisation (NTP/chrony) on "
            "both nodes."
        )


def _check_node(node: Any) -> str | None:
    if not isinstance(node, str) or not node:
        return "node id must be a non-empty string"
    if len(node) > MAX_NODE_CHARS:
        return f"node id longer than {MAX_NODE_CHARS} characters"
    if not node.isprintable():
        return "node id has non-printable characters"
    try:
        node.encode("utf-8")
    except UnicodeEncodeError:
        return "node id is not valid Unicode text"
    return None


def _check(wall_ms: Any, logical: Any, node: Any) -> str | None:
    for name, v, top in (("wall_ms", wall_ms, MAX_WALL), ("logical", logical, MAX_LOGICAL)):
        if type(v) is not int:
            return f"{name} must be an integer, got {type(v).__name__}"
        if not 0 <= v <= top:
            return f"{name} {v} out of range 0..{top}"
    return _check_node(node)


@dataclass(frozen=True, order=True, slots=True)
class HLC:
    """One hybrid-logical-clock timestamp; compares as ``(wall_ms, logical, node)``."""

    wall_ms: int
    logical: int
    node: str

    def __post_init__(self) -> None:
        problem = _check(self.wall_ms, self.logical, self.node)
        if problem:
            raise ValueError(f"invalid HLC: {problem}")

    # -- text ---------------------------------------------------------------------------------
    def encode(self) -> str:
        """Fixed-width text form; string order equals timestamp order."""
        return f"{self.wall_ms:0{_WALL_HEX}x}-{self.logical:0{_LOGICAL_HEX}x}-{self.node}"

    def __str__(self) -> str:
        return self.encode()

    @classmethod
    def parse(cls, text: Any) -> HLC:
        """Inverse of `encode`. Raises `PeerError` on anything else."""
        if not isinstance(text, str):
            raise PeerError(f"HLC text must be a string, got {type(text).__name__}")
        wall, logical = text[:_WALL_HEX], text[_WALL_HEX + 1 : _NODE_AT - 1]
        if (
            len(text) <= _NODE_AT
            or text[_WALL_HEX] != "-"
            or text[_NODE_AT - 1] != "-"
            or not _HEX.issuperset(wall)
            or not _HEX.issuperset(logical)
        ):
            raise PeerError(
                f"malformed HLC {text[:80]!r}: expected 12 lowercase hex digits, '-', "
                "8 lowercase hex digits, '-', node id"
            )
        return cls._from_parts(int(wall, 16), int(logical, 16), text[_NODE_AT:])

    # -- bytes --------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """Compact binary form (10 bytes + node); byte order equals timestamp order."""
        fixed = (self.wall_ms << LOGICAL_BITS | self.logical).to_bytes(_FIXED_BYTES, "big")
        return fixed + self.node.encode("utf-8")

    @classmethod
    def from_bytes(cls, data: Any) -> HLC:
        """Inverse of `to_bytes`. Raises `PeerError` on anything else."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise PeerError(f"HLC bytes must be bytes, got {type(data).__name__}")
        data = bytes(data)
        if len(data) <= _FIXED_BYTES:
            raise PeerError(f"malformed HLC bytes: {len(data)} bytes, need more than 10")
        fixed = int.from_bytes(data[:_FIXED_BYTES], "big")
        try:
            node = data[_FIXED_BYTES:].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PeerError(f"malformed HLC bytes: node id is not UTF-8 ({exc})") from exc
        return cls._from_parts(fixed >> LOGICAL_BITS, fixed & MAX_LOGICAL, node)

    # -- tuple (msgpack) ----------------------------------------------------------------------
    def to_tuple(self) -> tuple[int, int, str]:
        return (self.wall_ms, self.logical, self.node)

    @classmethod
    def from_tuple(cls, value: Any) -> HLC:
        """From ``(wall_ms, logical, node)`` or the list msgpack turns it into."""
        if not isinstance(value, list | tuple) or len(value) != 3:
            raise PeerError(f"malformed HLC {value!r:.80}: expected [wall_ms, logical, node]")
        return cls._from_parts(*value)

    @classmethod
    def _from_parts(cls, wall_ms: Any, logical: Any, node: Any) -> HLC:
        problem = _check(wall_ms, logical, node)
        if problem:
            raise PeerError(f"malformed HLC: {problem}")
        return cls(wall_ms, logical, node)


def system_ms() -> int:
    """Physical time: Unix milliseconds from the system clock."""
    return time.time_ns() // 1_000_000


class Clock:
    """The hybrid logical clock of one node.

    ``now_ms`` is the physical clock (Unix ms, injectable for tests). ``last`` restores the
    last timestamp this node issued (persist it), so timestamps keep increasing across a
    restart even if the physical clock went backwards. Thread-safe.
    """

    def __init__(
        self,
        node: str,
        now_ms: Callable[[], int] = system_ms,
        *,
        max_drift_ms: int = DEFAULT_MAX_DRIFT_MS,
        last: HLC | None = None,
    ) -> None:
        problem = _check_node(node)
        if problem:
            raise ValueError(f"invalid clock: {problem}")
        if type(max_drift_ms) is not int or max_drift_ms <= 0:
            raise ValueError(f"max_drift_ms must be a positive integer, got {max_drift_ms!r}")
        self.node = node
        self.max_drift_ms = max_drift_ms
        self._now_ms = now_ms
        self._wall = last.wall_ms if last else 0
        self._logical = last.logical if last else 0
        self._lock = threading.Lock()

    @property
    def last(self) -> HLC:
        """The latest timestamp issued or observed (what to persist)."""
        with self._lock:
            return HLC(self._wall, self._logical, self.node)

    def _physical(self) -> int:
        pt = int(self._now_ms())
        return min(max(pt, 0), MAX_WALL)

    def now(self) -> HLC:
        """Timestamp a local or send event; strictly greater than every earlier one."""
        with self._lock:
            pt = self._physical()
            if pt > self._wall:
                self._wall, self._logical = pt, 0
            else:
                self._logical = self._next(self._logical)
            return HLC(self._wall, self._logical, self.node)

    def update(self, remote: HLC) -> HLC:
        """Timestamp the receipt of ``remote``; the result is greater than both ``remote`` and
        every timestamp this clock issued before.

        Raises `ClockDriftError` (a `PeerError`) and leaves the clock unchanged if
        ``remote.wall_ms`` is more than ``max_drift_ms`` ahead of the physical clock.
        """
        with self._lock:
            pt = self._physical()
            if remote.wall_ms - pt > self.max_drift_ms:
                raise ClockDriftError(remote, pt, self.max_drift_ms, self.node)
            wall = max(self._wall, remote.wall_ms, pt)
            if wall == self._wall == remote.wall_ms:
                logical = self._next(max(self._logical, remote.logical))
            elif wall == self._wall:
                logical = self._next(self._logical)
            elif wall == remote.wall_ms:
                logical = self._next(remote.logical)
            else:
                logical = 0
            self._wall, self._logical = wall, logical
            return HLC(wall, logical, self.node)

    @staticmethod
    def _next(logical: int) -> int:
        if logical >= MAX_LOGICAL:
            raise ClockError(
                f"hybrid logical clock counter exhausted ({MAX_LOGICAL} events within one "
                "millisecond of wall time): the physical clock is stalled far behind"
            )
        return logical + 1

