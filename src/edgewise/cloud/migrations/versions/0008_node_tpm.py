"""Nodes' TPMs: ``node_tpm`` (EK fingerprint, unique; AK and node-key public areas; the newest
attestation verdict). docs/security.md, "Hardware-rooted trust".

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)  # edgewise.cloud.store.models.UTCDateTime stores this
JSON = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "node_tpm",
        sa.Column("node_id", sa.String(64), primary_key=True),
        sa.Column("ek_fingerprint", sa.String(64), nullable=False, unique=True),
        sa.Column("ak_public", sa.LargeBinary(), nullable=False),
        sa.Column("node_key_public", sa.LargeBinary(), nullable=False),
        sa.Column("created", TS, nullable=False),
        sa.Column("attested_at", TS, nullable=True),
        sa.Column("verdict", JSON, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("node_tpm")
