"""screening_chunks: a screening job's queries in slices, one task each (fan-out over workers)

Every existing job gets one chunk over all its queries, with the progress it had, so a job
queued or interrupted before the upgrade resumes where it stopped (its message counts as sent
at the upgrade).

Revision ID: 7c1d2e3f4a5b
Revises: 5b7e0c3d9a21
Create Date: 2026-12-05 10:00:00.000000
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '7c1d2e3f4a5b'
down_revision: str | Sequence[str] | None = '5b7e0c3d9a21'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('screening_chunks',
    sa.Column('job_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('start', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('stop', sa.Integer(), nullable=False),
    sa.Column('done', sa.Integer(), server_default='0', nullable=False),
    sa.Column('worker', sa.String(length=255), nullable=True),
    sa.Column('claimed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['screening_jobs.id'], name=op.f('fk_screening_chunks_job_id_screening_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('job_id', 'start', name=op.f('pk_screening_chunks'))
    )
    op.execute("INSERT INTO screening_chunks (job_id, start, stop, done, sent_at) "
               "SELECT id, 0, total, done, CURRENT_TIMESTAMP FROM screening_jobs")


def downgrade() -> None:
    op.drop_table('screening_chunks')
