"""What to give up when the outbox is full: a pure decision, no I/O.

Rule (docs/architecture.md, principle 5: pressure is visible): make room by compacting or
dropping the lowest priority first, oldest first within a priority; alarms (highest priority)
go last. A stream marked compactable has its raw chunks replaced by per-key aggregates before
anything of it is dropped. A new chunk whose priority is lower than everything stored is itself
the one dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class StoredChunk:
    id: int
    priority: int
    nbytes: int
    compactable: bool  # its stream allows compaction and it is not compacted yet


@dataclass(frozen=True)
class Eviction:
    chunk_id: int
    action: Literal["compact", "drop"]


def choose_evictions(
    stored: list[StoredChunk], used: int, incoming_bytes: int, incoming_priority: int,
    capacity: int,
) -> tuple[list[Eviction], bool]:
    """Return (evictions in order, accept_incoming).

    ``stored`` must be ordered by (priority ascending, id ascending). Compaction is assumed to
    shrink a chunk to a tenth of its size; the caller re-checks after applying it.
    """
    need = used + incoming_bytes - capacity
    if need <= 0:
        return [], True
    if incoming_bytes > capacity:
        return [], False
    out: list[Eviction] = []
    freed = 0
    for c in stored:
        if freed >= need:
            break
        if c.priority > incoming_priority:
            break
        if c.compactable:
            out.append(Eviction(c.id, "compact"))
            freed += c.nbytes - c.nbytes // 10
        else:
            out.append(Eviction(c.id, "drop"))
            freed += c.nbytes
    if freed >= need:
        return out, True
    # not enough lower-or-equal priority data to free: keep what is stored, drop the newcomer
    return [], False
