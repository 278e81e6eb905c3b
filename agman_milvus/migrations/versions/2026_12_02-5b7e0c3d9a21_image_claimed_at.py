"""images.claimed_at: when a worker started embedding a pending image (stale-work re-send)

Revision ID: 5b7e0c3d9a21
Revises: 1ec192410a5f
Create Date: 2026-12-02 14:00:00.000000
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '5b7e0c3d9a21'
down_revision: str | Sequence[str] | None = '1ec192410a5f'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.add_column(sa.Column('claimed_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.drop_column('claimed_at')
