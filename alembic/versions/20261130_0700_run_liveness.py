"""Runs carry their owner and a heartbeat.

Why: a run whose process died stayed `running` for ever. With the owner ("host:pid") and a
heartbeat renewed while the owner lives, a later run finds dead runs (heartbeat expired, or the
process gone on the same host) and marks them `crashed`. The new statuses (`incomplete`, `crashed`)
need no schema change: the status column is a plain string.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 07:00:00
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

from db.migrate import views_set_aside

revision: str = '0004'
down_revision: Union[str, None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('owner', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # SQLite drops a column by rebuilding the table, which the views that read `runs` would refuse.
    with views_set_aside():
        with op.batch_alter_table('runs', schema=None) as batch_op:
            batch_op.drop_column('heartbeat_at')
            batch_op.drop_column('owner')

