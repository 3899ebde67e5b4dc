"""Generations record their image's sha256 and size; segmentations their mask's and reference's sha256.

Why: a shot deleted or truncated after it was recorded `done` stayed broken through any number of
re-runs. With the size recorded, every re-run checks its plan's shots cheaply (one listing); with
the sha256, `dreamcache verify` finds any damage and `--repair` regenerates what is damaged.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 08:00:00
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

from db.migrate import views_set_aside

revision: str = '0005'
down_revision: Union[str, None] = '0004'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('generations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('output_sha256', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('output_bytes', sa.BigInteger(), nullable=True))
    with op.batch_alter_table('segmentations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('mask_sha256', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('reference_sha256', sa.String(length=64), nullable=True))


def downgrade() -> None:
    # SQLite drops a column by rebuilding the table, which the views that read these tables would refuse.
    with views_set_aside():
        with op.batch_alter_table('segmentations', schema=None) as batch_op:
            batch_op.drop_column('reference_sha256')
            batch_op.drop_column('mask_sha256')
        with op.batch_alter_table('generations', schema=None) as batch_op:
            batch_op.drop_column('output_bytes')
            batch_op.drop_column('output_sha256')

