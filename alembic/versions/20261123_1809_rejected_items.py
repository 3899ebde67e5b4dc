"""Rejected items: inputs a run could not use, with the stage and the reason.

Why: catalogue runs go on past bad inputs (a corrupt image, an unsegmentable product, a manifest
row without an image); each is recorded here so the run summary and users in SQL can see what was
left out and why.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 18:09:38
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: Union[str, None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('rejected_items',
    sa.Column('run_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('stage', sa.String(length=16), nullable=False),
    sa.Column('item', sa.String(length=1024), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_rejected_items_run_id_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_rejected_items'))
    )
    with op.batch_alter_table('rejected_items', schema=None) as batch_op:
        batch_op.create_index('ix_rejected_items_run_id_stage', ['run_id', 'stage'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('rejected_items', schema=None) as batch_op:
        batch_op.drop_index('ix_rejected_items_run_id_stage')

    op.drop_table('rejected_items')
