"""Layered config and fleet health: ``config_layers`` (fleet defaults, groups by label
selector, node overrides; each row versioned) and ``node_health`` (the newest health a node's
heartbeat carried, and an operator's quarantine with its reason).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


TS = sa.DateTime(timezone=True)  # edgewise.cloud.store.models.UTCDateTime stores this
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "config_layers",
        sa.Column("name", sa.String(160), primary_key=True),  # fleet | group:NAME | node:ID
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),  # groups: lowest applies first
        sa.Column("selector", JSON, nullable=False),
        sa.Column("values", JSON, nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("updated", TS, nullable=False),
        sa.Column("updated_by", sa.String(128), nullable=False),
    )
    op.create_table(
        "node_health",
        sa.Column("node_id", sa.String(64), primary_key=True),
        sa.Column("body", JSON, nullable=True),
        sa.Column("received", TS, nullable=True),
        sa.Column("quarantine", sa.Text(), nullable=True),  # the reason; NULL: not quarantined
        sa.Column("quarantined_by", sa.String(128), nullable=True),
        sa.Column("quarantined_at", TS, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("node_health")
    op.drop_table("config_layers")
