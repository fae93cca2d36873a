"""Nodes remember the enrolment token they used (its hash), so an enrolment retried after a
lost answer (same key, same token) is answered with the same node.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # nodes enrolled before this revision have none: a retry of theirs is refused as before
    op.add_column("nodes", sa.Column("enrol_token", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("enrol_token")
