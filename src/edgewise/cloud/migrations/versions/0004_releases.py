"""Releases and their TUF metadata: ``releases`` (one row per published version, with its
manifest) and ``tuf_metadata`` (every signed version of root, targets, snapshot, timestamp).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


TS = sa.DateTime(timezone=True)  # edgewise.cloud.store.models.UTCDateTime stores this


def upgrade() -> None:
    op.create_table(
        "releases",
        sa.Column("version", sa.String(64), primary_key=True),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("manifest", sa.LargeBinary(), nullable=False),
        sa.Column("files", sa.Integer(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("created", TS, nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
    )
    op.create_table(
        "tuf_metadata",
        sa.Column("role", sa.String(16), primary_key=True),
        sa.Column("version", sa.BigInteger(), primary_key=True),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("created", TS, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("tuf_metadata")
    op.drop_table("releases")
