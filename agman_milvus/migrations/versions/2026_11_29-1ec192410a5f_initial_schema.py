"""initial schema: products, images, models, screening jobs and matches

Revision ID: 1ec192410a5f
Revises: 
Create Date: 2026-11-29 11:17:54.514067
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '1ec192410a5f'
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('models',
    sa.Column('version', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('backbone', sa.String(length=64), nullable=False),
    sa.Column('schema', sa.JSON(), nullable=False),
    sa.Column('embed_dim', sa.Integer(), nullable=False),
    sa.Column('descriptor_dim', sa.Integer(), nullable=False),
    sa.Column('checkpoint_path', sa.Text(), nullable=True),
    sa.Column('checkpoint_sha256', sa.String(length=64), nullable=True),
    sa.Column('active', sa.Boolean(), server_default='0', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('CURRENT_TIMESTAMP'), nullable=False),
    sa.PrimaryKeyConstraint('version', name=op.f('pk_models'))
    )
    op.create_table('products',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('external_id', sa.String(length=255), nullable=False),
    sa.Column('title', sa.String(length=512), nullable=True),
    sa.Column('brand', sa.String(length=255), nullable=True),
    sa.Column('category', sa.String(length=255), nullable=True),
    sa.Column('gender', sa.String(length=64), nullable=True),
    sa.Column('colour', sa.String(length=64), nullable=True),
    sa.Column('extra', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('CURRENT_TIMESTAMP'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('CURRENT_TIMESTAMP'), nullable=False),
    sa.Column('deleted', sa.Boolean(), server_default='0', nullable=False),
    sa.Column('deleted_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_products')),
    sa.UniqueConstraint('external_id', name=op.f('uq_products_external_id'))
    )
    op.create_table('screening_jobs',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('status', sa.Enum('queued', 'running', 'done', 'failed', name='job_status', native_enum=False, create_constraint=True, length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('CURRENT_TIMESTAMP'), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('total', sa.Integer(), server_default='0', nullable=False),
    sa.Column('done', sa.Integer(), server_default='0', nullable=False),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_screening_jobs'))
    )
    with op.batch_alter_table('screening_jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_screening_jobs_status'), ['status'], unique=False)

    op.create_table('images',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('product_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('source_uri', sa.Text(), nullable=True),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('phash', sa.BigInteger(), nullable=True),
    sa.Column('width', sa.Integer(), nullable=True),
    sa.Column('height', sa.Integer(), nullable=True),
    sa.Column('status', sa.Enum('pending', 'indexed', 'failed', 'deleted', name='image_status', native_enum=False, create_constraint=True, length=16), nullable=False),
    sa.Column('failure_reason', sa.Text(), nullable=True),
    sa.Column('model_version', sa.String(length=64), nullable=True),
    sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('CURRENT_TIMESTAMP'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('CURRENT_TIMESTAMP'), nullable=False),
    sa.Column('indexed_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['product_id'], ['products.id'], name=op.f('fk_images_product_id_products'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_images')),
    sa.UniqueConstraint('product_id', 'sha256', name=op.f('uq_images_product_id'))
    )
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_images_product_id'), ['product_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_images_status'), ['status'], unique=False)

    op.create_table('screening_matches',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('job_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('query_ref', sa.Text(), nullable=False),
    sa.Column('matched_image_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('matched_product_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('verdict', sa.String(length=32), nullable=False),
    sa.Column('score', sa.Float(), nullable=False),
    sa.Column('evidence', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['screening_jobs.id'], name=op.f('fk_screening_matches_job_id_screening_jobs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['matched_image_id'], ['images.id'], name=op.f('fk_screening_matches_matched_image_id_images'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['matched_product_id'], ['products.id'], name=op.f('fk_screening_matches_matched_product_id_products'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_screening_matches'))
    )
    with op.batch_alter_table('screening_matches', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_screening_matches_job_id'), ['job_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('screening_matches', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_screening_matches_job_id'))

    op.drop_table('screening_matches')
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_images_status'))
        batch_op.drop_index(batch_op.f('ix_images_product_id'))

    op.drop_table('images')
    with op.batch_alter_table('screening_jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_screening_jobs_status'))

    op.drop_table('screening_jobs')
    op.drop_table('products')
    op.drop_table('models')
