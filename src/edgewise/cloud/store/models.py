"""The control plane's tables as SQLAlchemy 2.0 ORM models (SQLite and PostgreSQL alike).

The schema itself is created and changed only by the Alembic migrations in
``edgewise/cloud/migrations``; these models describe it for queries. Times are timezone-aware
UTC datetimes (`UTCDateTime` keeps them aware on SQLite too). Certificate serials are 159-bit
integers, so they are stored as lower-case hex text. Sequence numbers are 64-bit.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

JsonType = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend.

    PostgreSQL keeps ``timestamptz``; SQLite has no time zones, so UTC is stored naive (as
    sortable text) and made aware again on load. Naive datetimes are refused on the way in.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("the store takes timezone-aware datetimes only (datetime.now(UTC))")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JsonType}


class Node(Base):
    __tablename__ = "nodes"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    labels: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    key_fingerprint: Mapped[str] = mapped_column(String(64), index=True)
    cert_serial: Mapped[str] = mapped_column(String(64))  # hex
    cert_expiry: Mapped[datetime]
    status: Mapped[str] = mapped_column(String(32), default="enrolled")
    created: Mapped[datetime]
    last_seen: Mapped[datetime | None]
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    enrol_token: Mapped[str | None] = mapped_column(String(64), default=None)  # its hash
    # decommissioned (`revoked` is set too): when, by whom, and whether the node must wipe itself
    decommissioned_at: Mapped[datetime | None] = mapped_column(default=None)
    decommissioned_by: Mapped[str | None] = mapped_column(String(128), default=None)
    wipe: Mapped[bool] = mapped_column(Boolean, default=False)


class EnrolmentTokenRow(Base):
    __tablename__ = "enrolment_tokens"

    hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    labels: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    expires_at: Mapped[datetime]
    uses_left: Mapped[int] = mapped_column(Integer)
    created: Mapped[datetime]


class OperatorTokenRow(Base):
    __tablename__ = "operator_tokens"

    hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    created: Mapped[datetime]
    expires_at: Mapped[datetime | None]
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class Revocation(Base):
    __tablename__ = "revocations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    serial: Mapped[str | None] = mapped_column(String(64), unique=True)  # hex
    fingerprint: Mapped[str | None] = mapped_column(String(64), unique=True)
    node_id: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text, default="")
    created: Mapped[datetime]


class ChunkRow(Base):
    __tablename__ = "chunks"

    node_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    stream: Mapped[str] = mapped_column(String(128), primary_key=True)
    seq_first: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    seq_count: Mapped[int] = mapped_column(BigInteger)
    records: Mapped[int] = mapped_column(BigInteger)
    compacted: Mapped[bool] = mapped_column(Boolean, default=False)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    # sent while its node was quarantined: kept apart from trusted data (docs/security.md)
    quarantined: Mapped[bool] = mapped_column(Boolean, default=False)


class GapRow(Base):
    """Sequence numbers a node dropped under pressure: known loss, so the mark can move on."""

    __tablename__ = "gaps"

    node_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    stream: Mapped[str] = mapped_column(String(128), primary_key=True)
    seq_first: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    seq_count: Mapped[int] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(Text, default="")
    received_at: Mapped[datetime]


class StreamRow(Base):
    __tablename__ = "streams"

    node_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    stream: Mapped[str] = mapped_column(String(128), primary_key=True)
    contiguous: Mapped[int] = mapped_column(BigInteger, default=0)  # every seq below is settled
    stored_records: Mapped[int] = mapped_column(BigInteger, default=0)
    gap_records: Mapped[int] = mapped_column(BigInteger, default=0)
    last_received: Mapped[datetime | None]


class DesiredStateRow(Base):
    __tablename__ = "desired_states"

    node_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    body: Mapped[dict[str, Any]] = mapped_column(JsonType)  # DesiredState.to_wire()
    created: Mapped[datetime]
    expires_at: Mapped[datetime | None]


class ReportedStateRow(Base):
    __tablename__ = "reported_states"

    node_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    body: Mapped[dict[str, Any]] = mapped_column(JsonType)  # ReportedState.to_wire()
    updated: Mapped[datetime]


class AuditRow(Base):
    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_target_ts", "target", "ts"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"),
                                    primary_key=True, autoincrement=True)
    ts: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(256))
    detail: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)


class ConfigLayerRow(Base):
    """One layer of config (`cloud.layers`): ``fleet``, ``group:NAME`` or ``node:ID``."""

    __tablename__ = "config_layers"

    name: Mapped[str] = mapped_column(String(160), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8))  # fleet | group | node
    position: Mapped[int] = mapped_column(Integer, default=0)
    selector: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    values: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    version: Mapped[int] = mapped_column(BigInteger)
    updated: Mapped[datetime]
    updated_by: Mapped[str] = mapped_column(String(128))


class NodeHealthRow(Base):
    """The newest health a node's heartbeat carried (`sync.health`), and its quarantine."""

    __tablename__ = "node_health"

    node_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    body: Mapped[dict[str, Any] | None] = mapped_column(JsonType, default=None)
    received: Mapped[datetime | None] = mapped_column(default=None)
    quarantine: Mapped[str | None] = mapped_column(Text, default=None)
    quarantined_by: Mapped[str | None] = mapped_column(String(128), default=None)
    quarantined_at: Mapped[datetime | None] = mapped_column(default=None)


class NodeTpmRow(Base):
    """A node's TPM (docs/security.md, "Hardware-rooted trust"): its EK fingerprint (one TPM,
    one node), the public areas of its AK and node key, and its newest attestation verdict."""

    __tablename__ = "node_tpm"

    node_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    ek_fingerprint: Mapped[str] = mapped_column(String(64), unique=True)
    ak_public: Mapped[bytes] = mapped_column(LargeBinary)
    node_key_public: Mapped[bytes] = mapped_column(LargeBinary)
    created: Mapped[datetime]
    attested_at: Mapped[datetime | None] = mapped_column(default=None)
    verdict: Mapped[dict[str, Any] | None] = mapped_column(JsonType, default=None)


class ReauthNonce(Base):
    """An outstanding re-authentication challenge (`Store.issue_nonce`): single use, short
    lived, shared by every control-plane process of the database."""

    __tablename__ = "reauth_nonces"

    nonce: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    node_id: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[datetime] = mapped_column(index=True)
