"""Plain, frozen records the `Store` takes and returns (never ORM objects, so nothing lazy-loads
outside a transaction and callers need no SQLAlchemy)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from edgewise.sync.hlc import HLC
from edgewise.sync.merge import LwwMap
from edgewise.sync.twin_state import ReportedState


@dataclass(frozen=True)
class NodeInfo:
    id: str
    labels: dict[str, str]
    key_fingerprint: str
    cert_serial: int
    cert_expiry: datetime
    status: str  # enrolled | online | offline | revoked | decommissioned
    created: datetime
    last_seen: datetime | None
    revoked: bool
    decommissioned_at: datetime | None = None  # set with status "decommissioned" (revoked too)
    decommissioned_by: str | None = None  # the operator, as in the audit log
    wipe: bool = False  # the node must delete its keys and data when it hears it

    @property
    def decommissioned(self) -> bool:
        return self.decommissioned_at is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "labels": dict(self.labels),
            "key_fingerprint": self.key_fingerprint,
            "cert_serial": f"{self.cert_serial:x}",
            "cert_expiry": self.cert_expiry.isoformat(),
            "status": self.status,
            "created": self.created.isoformat(),
            "last_seen": self.last_seen.isoformat() if self.last_seen else None,
            "revoked": self.revoked,
            "decommissioned_at": (self.decommissioned_at.isoformat()
                                  if self.decommissioned_at else None),
            "decommissioned_by": self.decommissioned_by,
            "wipe": self.wipe,
        }


@dataclass(frozen=True)
class EnrolmentTokenInfo:
    """A stored enrolment token without its secret (only the first 12 hex of the hash)."""

    hash_prefix: str
    labels: dict[str, str]
    expires_at: datetime
    uses_left: int
    created: datetime


@dataclass(frozen=True)
class OperatorTokenInfo:
    hash_prefix: str
    name: str
    role: str
    created: datetime
    expires_at: datetime | None
    revoked: bool


@dataclass(frozen=True)
class StreamInfo:
    """Per (node, stream): every seq below ``contiguous`` is stored or known lost (a gap)."""

    node_id: str
    stream: str
    contiguous: int
    stored_records: int
    gap_records: int
    last_received: datetime | None


@dataclass(frozen=True)
class SeqRange:
    """A settled range above a stream's contiguous mark: a stored chunk or a gap."""

    first: int
    count: int
    gap: bool = False

    @property
    def end(self) -> int:
        return self.first + self.count


@dataclass(frozen=True)
class ChunkWrite:
    """One chunk to store (payload already decode-checked by ingest)."""

    node_id: str
    stream: str
    seq_first: int
    seq_count: int
    records: int
    compacted: bool
    payload: bytes
    received_at: datetime
    quarantined: bool = False  # its node was quarantined: stored apart (docs/security.md)


@dataclass(frozen=True)
class GapWrite:
    node_id: str
    stream: str
    seq_first: int
    seq_count: int
    reason: str
    received_at: datetime


@dataclass(frozen=True)
class MarkWrite:
    """The new contiguous mark of a stream (the store keeps the larger of old and new)."""

    node_id: str
    stream: str
    contiguous: int
    last_received: datetime


@dataclass(frozen=True)
class IngestResult:
    """What a `Store.commit_ingest` call actually inserted (conflicting rows are skipped)."""

    chunks: frozenset[tuple[str, str, int]] = frozenset()  # (node, stream, seq_first)
    gaps: frozenset[tuple[str, str, int]] = frozenset()
    records: int = 0


@dataclass(frozen=True)
class StoredChunk:
    node_id: str
    stream: str
    seq_first: int
    seq_count: int
    records: int
    compacted: bool
    payload: bytes
    received_at: datetime
    quarantined: bool = False


@dataclass(frozen=True)
class GapInfo:
    node_id: str
    stream: str
    seq_first: int
    seq_count: int
    reason: str
    received_at: datetime


@dataclass(frozen=True)
class ReportedInfo:
    state: ReportedState  # setpoints: the node's reports merged with the cloud's writes (LWW)
    updated: datetime
    # keys whose winning value the node has not reported having yet (a cloud write it has not
    # applied: not pulled yet, or held because its clock is behind)
    pending: tuple[str, ...] = ()


@dataclass(frozen=True)
class AuditEntry:
    id: int
    ts: datetime
    actor: str
    action: str
    target: str
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "ts": self.ts.isoformat(), "actor": self.actor,
                "action": self.action, "target": self.target, "detail": self.detail}


@dataclass(frozen=True)
class NodeReport:
    """A node's report waiting for `Store.write_node_batch`: ``state`` (its setpoints maybe
    merged with earlier reports'), ``at`` (the cloud's clock when it arrived) and ``own`` (the
    setpoints the node itself held in its newest report)."""

    state: ReportedState
    at: HLC
    own: LwwMap
