"""Shots record their mode, format, review state and publication; products their cut-outs and packshots.

Why (issue 26): a shop needs the product pixel-exact in some shots (`mode` 'place'), its own formats
(`aspect`, the delivered `width` and `height`), and a gate before anything is published: each shot's
`review` (pending, approved, rejected), who or which rule decided and when, and where it was published.
Cut-outs and white packshots are outputs per product, in `product_assets`. Existing shots were drawn
by the model, square at their resolution, and wait for review.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 11:00:00
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

from db.migrate import migration_module, views_set_aside

revision: str = '0007'
down_revision: Union[str, None] = '0006'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

REVIEW_STATE = sa.Enum('pending', 'approved', 'rejected', name='review_state', native_enum=False, length=16)

# The views from this revision on: generation_history gains the mode, format, review and publication
# columns; run_summary counts the approved shots and those waiting for review.
_PREVIOUS = migration_module("20261130_0900_samplers.py")
GENERATION_HISTORY = (_PREVIOUS.GENERATION_HISTORY
                      .replace("    g.resolution,\n", "    g.resolution,\n    g.mode,\n    g.aspect,\n    g.width,\n"
                               "    g.height,\n")
                      .replace("    g.output_uri,\n", "    g.output_uri,\n    g.review,\n    g.reviewed_by,\n"
                               "    g.reviewed_at,\n    g.review_note,\n    g.published_uri,\n    g.published_at,\n"))
RUN_SUMMARY = _PREVIOUS.RUN_SUMMARY.replace(
    "    (SELECT AVG(g.duration_s)",
    "    (SELECT COUNT(*) FROM generations g WHERE g.run_id = r.id AND g.status = 'done' AND g.review = 'approved')"
    " AS images_approved,\n"
    "    (SELECT COUNT(*) FROM generations g WHERE g.run_id = r.id AND g.status = 'done' AND g.review = 'pending')"
    " AS images_awaiting_review,\n"
    "    (SELECT AVG(g.duration_s)")


def upgrade() -> None:
    with views_set_aside("20261130_1100_shop_outputs.py"):
        with op.batch_alter_table('generations', schema=None) as batch_op:
            batch_op.add_column(sa.Column('mode', sa.String(length=16), server_default='generate', nullable=False))
            batch_op.add_column(sa.Column('aspect', sa.String(length=16), server_default='1:1', nullable=False))
            batch_op.add_column(sa.Column('width', sa.Integer(), nullable=True))
            batch_op.add_column(sa.Column('height', sa.Integer(), nullable=True))
            batch_op.add_column(sa.Column('review', REVIEW_STATE, server_default='pending', nullable=False))
            batch_op.add_column(sa.Column('reviewed_by', sa.String(length=255), nullable=True))
            batch_op.add_column(sa.Column('reviewed_at', sa.DateTime(timezone=True), nullable=True))
            batch_op.add_column(sa.Column('review_note', sa.Text(), nullable=True))
            batch_op.add_column(sa.Column('published_uri', sa.String(length=1024), nullable=True))
            batch_op.add_column(sa.Column('published_at', sa.DateTime(timezone=True), nullable=True))
            batch_op.create_index(batch_op.f('ix_generations_review'), ['review'], unique=False)
        # Shots made before were square at their resolution.
        op.execute("UPDATE generations SET width = resolution, height = resolution")
    op.create_table('product_assets',
    sa.Column('run_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('subject_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('aspect', sa.String(length=16), nullable=True),
    sa.Column('width', sa.Integer(), nullable=False),
    sa.Column('height', sa.Integer(), nullable=False),
    sa.Column('uri', sa.String(length=1024), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_product_assets_run_id_runs'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['subject_id'], ['subjects.id'], name=op.f('fk_product_assets_subject_id_subjects'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_product_assets')),
    sa.UniqueConstraint('uri', name=op.f('uq_product_assets_uri'))
    )
    with op.batch_alter_table('product_assets', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_product_assets_subject_id'), ['subject_id'], unique=False)


def downgrade() -> None:
    published = op.get_bind().execute(sa.text("SELECT COUNT(*) FROM generations WHERE published_uri IS NOT NULL "
                                              "OR mode <> 'generate' OR aspect <> '1:1'")).scalar()
    if published:
        raise RuntimeError(f"{published} shots are placed, in another format or published, which revision 0006 cannot "
                           "record: delete them (or their rows) before downgrading")
    with op.batch_alter_table('product_assets', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_product_assets_subject_id'))
    op.drop_table('product_assets')
    with views_set_aside("20261130_0900_samplers.py"):
        with op.batch_alter_table('generations', schema=None) as batch_op:
            batch_op.drop_index(batch_op.f('ix_generations_review'))
            for column in ('published_at', 'published_uri', 'review_note', 'reviewed_at', 'reviewed_by', 'review',
                           'height', 'width', 'aspect', 'mode'):
                batch_op.drop_column(column)
