"""Cloud pipeline runs: which control-plane replica runs each cloud pipeline (a lease with a
fencing term) and the run's state as of its last shipment (operator state, source positions,
the next sequence number of each result stream), so another replica takes over exactly where
the results in the store end. docs/cloud-pipelines.md, "Several replicas".

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cloud_pipeline_runs",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("runner", sa.String(128), nullable=True),
        sa.Column("term", sa.BigInteger(), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("state", sa.LargeBinary(), nullable=True),
        sa.Column("shipped_at", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("cloud_pipeline_runs")
