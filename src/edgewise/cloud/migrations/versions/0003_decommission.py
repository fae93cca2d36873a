"""Nodes can be decommissioned: when, by whom, and whether the node must wipe itself when it
hears it (`edgewise node decommission ID [--wipe]`).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("decommissioned_at", sa.DateTime(timezone=True),
                                   nullable=True))
        batch.add_column(sa.Column("decommissioned_by", sa.String(128), nullable=True))
        batch.add_column(sa.Column("wipe", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("wipe")
        batch.drop_column("decommissioned_by")
        batch.drop_column("decommissioned_at")
