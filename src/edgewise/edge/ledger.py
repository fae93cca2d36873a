"""The uplink's ledger: for each stream the highest sequence number the cloud may have heard of.

Pure bookkeeping plus its msgpack form: `Ledger` (the node id it is about; per stream the end
of the highest range sent or reported as a gap, and the cloud's last contiguous mark), saved by
the uplink *before* it sends the frames it describes. It is the node's memory of the cloud's
sequence space outside the outbox: an outbox that is replaced, quarantined or that lost its
latest commits continues its numbers from here (`edgewise.outbox.numbering`), so a number the
cloud has seen is never given to another record. Gaps themselves come from the outbox's lost
ranges, not from here. `IntervalSet` and `uncovered` are the interval helpers.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

import msgpack

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


class Ledger:
    """What the cloud may have heard of, per stream, for one node id.

    ``high[stream]``: the end (exclusive) of the highest range sent or reported as a gap;
    ``marks[stream]``: the cloud's contiguous mark at the last welcome. Persisted with
    `save_atomic` by `edgewise.edge.uplink_store`; format 1 (sent ranges and gaps) still reads.
    """

    FORMAT = 2

    def __init__(self, node: str | None = None) -> None:
        self.node = node
        self.high: dict[str, int] = {}
        self.marks: dict[str, int] = {}

    def record_sent(self, stream: str, first: int, count: int) -> bool:
        """A range is about to be sent; True if the ledger grew (it must be saved first)."""
        end = first + count
        if end <= self.high.get(stream, 0):
            return False
        self.high[stream] = end
        return True

    def record_gap(self, stream: str, first: int, count: int) -> bool:
        """A range is about to be reported as lost; True if the ledger grew."""
        return self.record_sent(stream, first, count)

    def trim(self, marks: dict[str, int]) -> None:
        """Remember the cloud's marks (they are also what it has heard of)."""
        for stream, mark in marks.items():
            self.marks[stream] = mark
            if mark > self.high.get(stream, 0):
                self.high[stream] = mark

    def floors(self) -> dict[str, int]:
        return dict(self.high)

    def to_bytes(self) -> bytes:
        return msgpack.packb({"format": self.FORMAT, "node": self.node, "high": self.high,
                              "marks": self.marks}, use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> Ledger:
        """Raises `StorageError` if ``data`` is not a ledger."""
        try:
            raw = msgpack.unpackb(data, raw=False)
            ledger = cls()
            if raw.get("format") == 1:  # sent ranges and gaps: their ends are the high marks
                for k, spans in raw["sent"].items():
                    for _s, e in spans:
                        ledger.record_sent(k, 0, int(e))
                for k, gaps in raw["gaps"].items():
                    for s, c in gaps:
                        ledger.record_gap(k, int(s), int(c))
                return ledger
            if raw.get("format") != cls.FORMAT:
                raise ValueError(f"format {raw.get('format')!r}")
            node = raw.get("node")
            ledger.node = node if isinstance(node, str) else None
            ledger.high = {str(k): int(v) for k, v in raw["high"].items()}
            ledger.marks = {str(k): int(v) for k, v in raw["marks"].items()}
        except (ValueError, TypeError, KeyError, AttributeError,
                msgpack.UnpackException) as exc:
            raise StorageError(f"the uplink ledger is unreadable: {exc}") from None
        return ledger
