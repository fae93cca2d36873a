"""Chunks a quarantined node sent are kept apart: ``chunks.quarantined`` (docs/security.md,
"What quarantine allows"). Queries, data out and cloud pipelines skip them unless asked.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # a plain ADD COLUMN with a constant default: SQLite does not copy the table
    op.add_column("chunks", sa.Column("quarantined", sa.Boolean(), nullable=False,
                                      server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("chunks") as batch:
        batch.drop_column("quarantined")
