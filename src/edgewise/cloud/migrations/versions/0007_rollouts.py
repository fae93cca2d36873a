"""Rollouts: ``rollouts`` (spec, state, wave, the driver's lease) and ``rollout_nodes`` (one row
per node of a rollout: wave, site, state, the release before, desired versions, baseline).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)  # edgewise.cloud.store.models.UTCDateTime stores this
JSON = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "rollouts",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("release", sa.String(64), nullable=False),
        sa.Column("spec", JSON, nullable=False),
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("waves", JSON, nullable=False),
        sa.Column("wave_done_at", TS, nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("paused_by", sa.String(16), nullable=True),
        sa.Column("accepted_failures", sa.Integer(), nullable=False),
        sa.Column("gate_accepted_wave", sa.Integer(), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("created", TS, nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("updated", TS, nullable=False),
        sa.Column("completed_at", TS, nullable=True),
        sa.Column("driver", sa.String(128), nullable=True),
        sa.Column("lease_until", TS, nullable=True),
    )
    op.create_table(
        "rollout_nodes",
        sa.Column("rollout_id", sa.String(32), primary_key=True),
        sa.Column("node_id", sa.String(64), primary_key=True),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("site", sa.String(256), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("had_release", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("previous", sa.String(64), nullable=True),
        sa.Column("version_before", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("version", sa.BigInteger(), nullable=True),
        sa.Column("baseline", JSON, nullable=True),
        sa.Column("assigned_at", TS, nullable=True),
        sa.Column("changed_at", TS, nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
    )
    op.create_index("ix_rollout_nodes_node", "rollout_nodes", ["node_id"])
    op.create_index("ix_rollout_nodes_state", "rollout_nodes", ["rollout_id", "state"])


def downgrade() -> None:
    op.drop_table("rollout_nodes")
    op.drop_table("rollouts")
