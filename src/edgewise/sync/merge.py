"""Last-writer-wins maps for keys both edge and cloud may write (docs/architecture.md, principle 3).

A setpoint changed on site during an outage and the same setpoint changed by an operator in the
cloud must merge the same way on every replica. Each key holds one `Entry`: the value, the
hybrid-logical-clock timestamp of the write and who made it (``origin``). Merging keeps, per key,
the entry with the greater timestamp. Timestamps include the node id, so two writes from
different nodes never tie; the merge is commutative, associative and idempotent, and every
replica that has seen the same writes holds the same map, whatever the order.

A delete is a write of `TOMBSTONE`: it wins or loses against a concurrent set by timestamp
like any other write, and a later set revives the key. Tombstones stay in the map (they are
what makes a delete win against an older set arriving late).

Nothing is dropped silently: every write that loses, on `LwwMap.set` or in `merge`, comes back
as an `AuditRecord` for the caller to keep and report. Merging is pure: ``merge(a, b)`` returns
a new map and the records; the inputs are not changed.

Values must be msgpack-able (None, bool, int, float, str, bytes, lists, maps). If two entries
carry the same timestamp but differ (only possible when a node reissues timestamps, e.g. after
losing its persisted clock), the tie is broken on the canonical msgpack bytes of the value and
then the origin, so replicas still converge; the loser is audited like any other.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import msgpack

from edgewise.errors import PeerError
from edgewise.sync.hlc import HLC


class _Tombstone(enum.Enum):
    TOMBSTONE = "TOMBSTONE"

    def __repr__(self) -> str:
        return "TOMBSTONE"


TOMBSTONE = _Tombstone.TOMBSTONE
"""The value of a deleted key."""

Tombstone: TypeAlias = Literal[_Tombstone.TOMBSTONE]


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        items = [(_canonical(k), _canonical(v)) for k, v in value.items()]
        items.sort(key=lambda kv: _pack(kv[0]))
        return dict(items)
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def canonical_bytes(value: Any) -> bytes:
    """msgpack bytes of ``value`` with maps sorted by key: equal values, equal bytes.

    Raises `ValueError` if the value cannot be packed.
    """
    try:
        return _pack(_canonical(value))
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"value {value!r:.80} is not msgpack-able: {exc}") from exc


@dataclass(frozen=True, eq=False)
class Entry:
    """One write: ``value`` (or `TOMBSTONE`), its timestamp, and who made it."""

    value: Any
    hlc: HLC
    origin: str = ""
    _rank: tuple[HLC, bool, bytes, str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.hlc, HLC):
            raise ValueError(f"hlc must be an HLC, got {type(self.hlc).__name__}")
        if not isinstance(self.origin, str):
            raise ValueError(f"origin must be a string, got {type(self.origin).__name__}")
        deleted = self.value is TOMBSTONE
        packed = b"" if deleted else canonical_bytes(self.value)
        object.__setattr__(self, "_rank", (self.hlc, deleted, packed, self.origin))

    @property
    def deleted(self) -> bool:
        return self.value is TOMBSTONE

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Entry):
            return NotImplemented
        return self._rank == other._rank

    def __lt__(self, other: Entry) -> bool:
        return self._rank < other._rank

    def __hash__(self) -> int:
        return hash(self._rank)

    def to_wire(self) -> list[Any]:
        """``[value, [wall_ms, logical, node], origin, deleted]``; a tombstone's value is None."""
        return [None if self.deleted else self.value, list(self.hlc.to_tuple()), self.origin,
                self.deleted]

    @classmethod
    def from_wire(cls, data: Any) -> Entry:
        if not isinstance(data, list | tuple) or len(data) != 4:
            raise PeerError(f"malformed entry {data!r:.80}: expected [value, hlc, origin, deleted]")
        value, hlc, origin, deleted = data
        if not isinstance(deleted, bool) or not isinstance(origin, str):
            raise PeerError(f"malformed entry {data!r:.80}: origin must be text, deleted a bool")
        try:
            return cls(TOMBSTONE if deleted else value, HLC.from_tuple(hlc), origin)
        except ValueError as exc:
            raise PeerError(f"malformed entry: {exc}") from exc


@dataclass(frozen=True)
class AuditRecord:
    """A write that lost: ``lost_value`` (maybe `TOMBSTONE`) stamped ``lost_hlc`` was beaten
    by the write stamped ``winner_hlc``; ``at`` is when and where the loss was recorded (the
    recording replica's clock), if the caller said."""

    key: str
    lost_value: Any
    lost_hlc: HLC
    winner_hlc: HLC
    at: HLC | None = None
    lost_origin: str = ""

    def to_wire(self) -> dict[str, Any]:
        deleted = self.lost_value is TOMBSTONE
        return {
            "key": self.key,
            "lost_value": None if deleted else self.lost_value,
            "lost_deleted": deleted,
            "lost_hlc": list(self.lost_hlc.to_tuple()),
            "lost_origin": self.lost_origin,
            "winner_hlc": list(self.winner_hlc.to_tuple()),
            "at": None if self.at is None else list(self.at.to_tuple()),
        }

    @classmethod
    def from_wire(cls, data: Any) -> AuditRecord:
        try:
            at, origin = data["at"], data["lost_origin"]
            if not isinstance(origin, str):
                raise TypeError("lost_origin must be text")
            return cls(
                key=_key(data["key"]),
                lost_value=TOMBSTONE if data["lost_deleted"] is True else data["lost_value"],
                lost_hlc=HLC.from_tuple(data["lost_hlc"]),
                winner_hlc=HLC.from_tuple(data["winner_hlc"]),
                at=None if at is None else HLC.from_tuple(at),
                lost_origin=origin,
            )
        except (KeyError, TypeError) as exc:
            raise PeerError(f"malformed audit record {data!r:.80}: {exc!r}") from exc


def _key(key: Any) -> str:
    if not isinstance(key, str):
        raise PeerError(f"LWW map keys must be strings, got {type(key).__name__}")
    return key


def _loss(key: str, loser: Entry, winner: Entry, at: HLC | None) -> AuditRecord:
    return AuditRecord(key, loser.value, loser.hlc, winner.hlc, at, loser.origin)


class LwwMap:
    """A map of string keys to last-writer-wins entries.

    ``set`` and ``delete`` change the map in place (local writes); `merge` builds a new one.
    Reading (`get`, `in`, `len`, `items`) sees live keys only; `entries` includes tombstones.
    """

    __slots__ = ("_entries",)

    def __init__(self, entries: Mapping[str, Entry] | None = None) -> None:
        self._entries: dict[str, Entry] = {}
        for key, entry in (entries or {}).items():
            if not isinstance(key, str) or not isinstance(entry, Entry):
                raise ValueError(f"LwwMap holds str -> Entry, got {key!r} -> {entry!r:.80}")
            self._entries[key] = entry

    # -- writes -------------------------------------------------------------------------------
    def put(self, key: str, entry: Entry, *, at: HLC | None = None) -> AuditRecord | None:
        """Apply one write by the LWW rule; return the audit record of whichever write lost
        (the old entry or ``entry`` itself), or None if nothing was overwritten."""
        if not isinstance(key, str):
            raise ValueError(f"LwwMap keys must be strings, got {type(key).__name__}")
        old = self._entries.get(key)
        if old is None:
            self._entries[key] = entry
            return None
        if old == entry:
            return None
        if old < entry:
            self._entries[key] = entry
            return _loss(key, old, entry, at)
        return _loss(key, entry, old, at)

    def set(
        self, key: str, value: Any, hlc: HLC, origin: str | None = None, *, at: HLC | None = None
    ) -> AuditRecord | None:
        """Write ``value`` at ``hlc`` (origin defaults to the HLC's node). See `put`."""
        return self.put(key, Entry(value, hlc, hlc.node if origin is None else origin), at=at)

    def delete(
        self, key: str, hlc: HLC, origin: str | None = None, *, at: HLC | None = None
    ) -> AuditRecord | None:
        """Delete ``key`` at ``hlc`` (a tombstone write). See `put`."""
        return self.set(key, TOMBSTONE, hlc, origin, at=at)

    def merge(self, other: LwwMap, *, at: HLC | None = None) -> tuple[LwwMap, list[AuditRecord]]:
        """``merge(self, other)``: a new map, and the audit records of the writes that lost."""
        return merge(self, other, at=at)

    # -- reads --------------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        entry = self._entries.get(key)
        return default if entry is None or entry.deleted else entry.value

    def entry(self, key: str) -> Entry | None:
        """The entry for ``key``, tombstone included, or None if never written."""
        return self._entries.get(key)

    def entries(self) -> dict[str, Entry]:
        """Every entry, tombstones included (a copy)."""
        return dict(self._entries)

    def items(self) -> Iterator[tuple[str, Any]]:
        """Live ``(key, value)`` pairs in key order."""
        for key in sorted(self._entries):
            entry = self._entries[key]
            if not entry.deleted:
                yield key, entry.value

    def to_dict(self) -> dict[str, Any]:
        """Live values as a plain dict."""
        return dict(self.items())

    def max_hlc(self) -> HLC | None:
        """The greatest timestamp in the map: feed it to ``Clock.update`` after a merge."""
        return max((e.hlc for e in self._entries.values()), default=None)

    def __contains__(self, key: object) -> bool:
        entry = self._entries.get(key) if isinstance(key, str) else None
        return entry is not None and not entry.deleted

    def __len__(self) -> int:
        return sum(1 for e in self._entries.values() if not e.deleted)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LwwMap):
            return NotImplemented
        return self._entries == other._entries

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"LwwMap({self._entries!r})"

    # -- wire ---------------------------------------------------------------------------------
    def to_wire(self) -> dict[str, list[Any]]:
        """A msgpack-able dict ``{key: Entry.to_wire()}``, tombstones included."""
        return {key: self._entries[key].to_wire() for key in sorted(self._entries)}

    @classmethod
    def from_wire(cls, data: Any) -> LwwMap:
        """Inverse of `to_wire`. Raises `PeerError` on malformed input."""
        if not isinstance(data, dict):
            raise PeerError(f"LWW map must be a map, got {type(data).__name__}")
        return cls({_key(k): Entry.from_wire(v) for k, v in data.items()})


def merge(a: LwwMap, b: LwwMap, *, at: HLC | None = None) -> tuple[LwwMap, list[AuditRecord]]:
    """Merge two maps: per key the greater entry wins. Pure: ``a`` and ``b`` are not changed.

    Returns the merged map and one `AuditRecord` per key where the two sides held different
    entries (the loser), in key order, each stamped ``at``.
    """
    out = a.entries()
    audit: list[AuditRecord] = []
    for key in sorted(b._entries):
        theirs = b._entries[key]
        ours = out.get(key)
        if ours is None:
            out[key] = theirs
        elif ours != theirs:
            winner, loser = (theirs, ours) if ours < theirs else (ours, theirs)
            out[key] = winner
            audit.append(_loss(key, loser, winner, at))
    return LwwMap(out), audit
