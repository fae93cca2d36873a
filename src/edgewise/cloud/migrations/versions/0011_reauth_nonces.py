"""Re-authentication nonces in the store, so that any control-plane process sharing the
database can take a nonce another one issued (issue 11, scale-out; docs/control-plane.md,
"Several processes").

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reauth_nonces",
        sa.Column("nonce", sa.LargeBinary(32), primary_key=True),
        sa.Column("node_id", sa.String(64), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_reauth_nonces_expires", "reauth_nonces", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_reauth_nonces_expires", "reauth_nonces")
    op.drop_table("reauth_nonces")
