"""The uplink's gap ledger: which sequence ranges were ever sent or reported as gaps.

Pure bookkeeping plus its msgpack form: `IntervalSet` (merged half-open ranges), `uncovered`,
`find_gaps` (what the node dropped and the cloud has not heard of) and `Ledger` (per stream,
sent ranges and reported gaps; the uplink persists it before sending the frames it
describes). See the "Gaps" paragraph of `edgewise.edge.uplink`.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

import msgpack

from edgewise.edge.status import OutboxSnapshot
from edgewise.errors import StorageError


class IntervalSet:
    """Disjoint half-open integer intervals ``[start, end)``, merged on insert."""

    def __init__(self, intervals: Iterable[tuple[int, int]] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for s, e in intervals:
            self.add(s, e)

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        i = bisect.bisect_left(self._ends, start)  # first interval that ends at/after start
        j = bisect.bisect_right(self._starts, end)  # intervals starting after end stay
        if i < j:
            start = min(start, self._starts[i])
            end = max(end, self._ends[j - 1])
        self._starts[i:j] = [start]
        self._ends[i:j] = [end]

    def covers(self, start: int, end: int) -> bool:
        """True if ``[start, end)`` lies inside one interval."""
        i = bisect.bisect_right(self._starts, start) - 1
        return i >= 0 and self._ends[i] >= end

    def trim_below(self, mark: int) -> None:
        """Drop everything below ``mark``."""
        i = bisect.bisect_right(self._ends, mark)
        del self._starts[:i], self._ends[:i]
        if self._starts and self._starts[0] < mark:
            self._starts[0] = mark

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(zip(self._starts, self._ends, strict=True))

    def __len__(self) -> int:
        return len(self._starts)

    def __repr__(self) -> str:
        return f"IntervalSet({list(self)})"


def uncovered(lo: int, hi: int, covered: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``[lo, hi)`` that no interval of ``covered`` contains, in order."""
    out: list[tuple[int, int]] = []
    pos = lo
    for s, e in sorted(covered):
        if e <= pos:
            continue
        if s >= hi:
            break
        if s > pos:
            out.append((pos, min(s, hi)))
        pos = max(pos, e)
        if pos >= hi:
            break
    if pos < hi:
        out.append((pos, hi))
    return out


def find_gaps(
    snap: OutboxSnapshot,
    marks: dict[str, int],
    covered: dict[str, list[tuple[int, int]]],
) -> list[tuple[str, int, int]]:
    """``(stream, first_seq, count)`` of every sequence range the node dropped and the cloud has
    not heard of: from the cloud's mark to ``next_seq``, minus what is pending in the outbox
    and ``covered`` (sent or reported). Pure."""
    pending: dict[str, list[tuple[int, int]]] = {}
    for c in snap.chunks:
        pending.setdefault(c.stream, []).append((c.seq_first, c.seq_first + c.seq_count))
    gaps = []
    for stream, row in sorted(snap.streams.items()):
        spans = pending.get(stream, []) + covered.get(stream, [])
        for s, e in uncovered(marks.get(stream, 0), row.next_seq, spans):
            gaps.append((stream, s, e - s))
    return gaps


class Ledger:
    """Per stream: sequence ranges ever sent, and the exact ranges reported as gaps.

    Everything the cloud can hold above its contiguous mark is in here, so gaps computed
    against it never overlap stored data. Persisted with `save_atomic`; `trim` forgets what
    lies below the cloud's marks.
    """

    FORMAT = 1

    def __init__(self) -> None:
        self.sent: dict[str, IntervalSet] = {}
        self.gaps: dict[str, list[tuple[int, int]]] = {}  # stream -> [(first, count)]

    def record_sent(self, stream: str, first: int, count: int) -> bool:
        """Add a sent range; True if it was not covered yet (the ledger must be saved)."""
        spans = self.sent.setdefault(stream, IntervalSet())
        if spans.covers(first, first + count):
            return False
        spans.add(first, first + count)
        return True

    def record_gap(self, stream: str, first: int, count: int) -> None:
        self.gaps.setdefault(stream, []).append((first, count))

    def covered(self) -> dict[str, list[tuple[int, int]]]:
        out: dict[str, list[tuple[int, int]]] = {k: list(v) for k, v in self.sent.items()}
        for stream, gaps in self.gaps.items():
            out.setdefault(stream, []).extend((s, s + c) for s, c in gaps)
        return out

    def gaps_above(self, marks: dict[str, int]) -> list[tuple[str, int, int]]:
        return [(stream, s, c) for stream, gaps in sorted(self.gaps.items())
                for s, c in gaps if s + c > marks.get(stream, 0)]

    def trim(self, marks: dict[str, int]) -> None:
        """Forget what lies wholly below the cloud's marks: it is stored there."""
        for stream, mark in marks.items():
            if stream in self.sent:
                self.sent[stream].trim_below(mark)
            if stream in self.gaps:
                self.gaps[stream] = [(s, c) for s, c in self.gaps[stream] if s + c > mark]

    def to_bytes(self) -> bytes:
        return msgpack.packb({
            "format": self.FORMAT,
            "sent": {k: [list(r) for r in v] for k, v in self.sent.items()},
            "gaps": {k: [list(r) for r in v] for k, v in self.gaps.items()},
        }, use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> Ledger:
        """Raises `StorageError` if ``data`` is not a ledger."""
        try:
            raw = msgpack.unpackb(data, raw=False)
            if raw.get("format") != cls.FORMAT:
                raise ValueError(f"format {raw.get('format')!r}")
            ledger = cls()
            for k, spans in raw["sent"].items():
                ledger.sent[k] = IntervalSet((int(s), int(e)) for s, e in spans)
            for k, gaps in raw["gaps"].items():
                ledger.gaps[k] = [(int(s), int(c)) for s, c in gaps]
        except (ValueError, TypeError, KeyError, AttributeError,
                msgpack.UnpackException) as exc:
            raise StorageError(f"the uplink ledger is unreadable: {exc}") from None
        return ledger
