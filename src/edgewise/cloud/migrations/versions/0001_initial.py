"""Initial schema: nodes, tokens, revocations, chunks, gaps, streams, twin states, audit log.

Revision ID: 0001
Revises:
Create Date: 2026-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TS = sa.DateTime(timezone=True)  # edgewise.cloud.store.models.UTCDateTime stores this


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("labels", JSON, nullable=False),
        sa.Column("key_fingerprint", sa.String(64), nullable=False),
        sa.Column("cert_serial", sa.String(64), nullable=False),
        sa.Column("cert_expiry", TS, nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("created", TS, nullable=False),
        sa.Column("last_seen", TS, nullable=True),
        sa.Column("revoked", sa.Boolean(), nullable=False),
    )
    op.create_index("ix_nodes_key_fingerprint", "nodes", ["key_fingerprint"])
    op.create_table(
        "enrolment_tokens",
        sa.Column("hash", sa.String(64), primary_key=True),
        sa.Column("labels", JSON, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("uses_left", sa.Integer(), nullable=False),
        sa.Column("created", TS, nullable=False),
    )
    op.create_table(
        "operator_tokens",
        sa.Column("hash", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("created", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=True),
        sa.Column("revoked", sa.Boolean(), nullable=False),
    )
    op.create_table(
        "revocations",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("serial", sa.String(64), nullable=True, unique=True),
        sa.Column("fingerprint", sa.String(64), nullable=True, unique=True),
        sa.Column("node_id", sa.String(64), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created", TS, nullable=False),
    )
    op.create_table(
        "chunks",
        sa.Column("node_id", sa.String(64), primary_key=True),
        sa.Column("stream", sa.String(128), primary_key=True),
        sa.Column("seq_first", sa.BigInteger(), primary_key=True),
        sa.Column("seq_count", sa.BigInteger(), nullable=False),
        sa.Column("records", sa.BigInteger(), nullable=False),
        sa.Column("compacted", sa.Boolean(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("received_at", TS, nullable=False),
    )
    op.create_index("ix_chunks_received_at", "chunks", ["received_at"])
    op.create_table(
        "gaps",
        sa.Column("node_id", sa.String(64), primary_key=True),
        sa.Column("stream", sa.String(128), primary_key=True),
        sa.Column("seq_first", sa.BigInteger(), primary_key=True),
        sa.Column("seq_count", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("received_at", TS, nullable=False),
    )
    op.create_table(
        "streams",
        sa.Column("node_id", sa.String(64), primary_key=True),
        sa.Column("stream", sa.String(128), primary_key=True),
        sa.Column("contiguous", sa.BigInteger(), nullable=False),
        sa.Column("stored_records", sa.BigInteger(), nullable=False),
        sa.Column("gap_records", sa.BigInteger(), nullable=False),
        sa.Column("last_received", TS, nullable=True),
    )
    op.create_table(
        "desired_states",
        sa.Column("node_id", sa.String(64), primary_key=True),
        sa.Column("version", sa.BigInteger(), primary_key=True),
        sa.Column("body", JSON, nullable=False),
        sa.Column("created", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=True),
    )
    op.create_table(
        "reported_states",
        sa.Column("node_id", sa.String(64), primary_key=True),
        sa.Column("body", JSON, nullable=False),
        sa.Column("updated", TS, nullable=False),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("ts", TS, nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(256), nullable=False),
        sa.Column("detail", JSON, nullable=False),
    )
    op.create_index("ix_audit_log_ts", "audit_log", ["ts"])
    op.create_index("ix_audit_log_target_ts", "audit_log", ["target", "ts"])


def downgrade() -> None:
    for table in ("audit_log", "reported_states", "desired_states", "streams", "gaps", "chunks",
                  "revocations", "operator_tokens", "enrolment_tokens", "nodes"):
        op.drop_table(table)
