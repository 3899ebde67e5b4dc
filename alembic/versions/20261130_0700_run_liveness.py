"""Runs carry their owner and a heartbeat.

Why: a run whose process died stayed `running` for ever. With the owner ("host:pid") and a
heartbeat renewed while the owner lives, a later run finds dead runs (heartbeat expired, or the
process gone on the same host) and marks them `crashed`. The new statuses (`incomplete`, `crashed`)
need no schema change: the status column is a plain string.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 07:00:00
"""

import importlib.util
from pathlib import Path
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

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
    op.execute("DROP VIEW run_summary")
    op.execute("DROP VIEW generation_history")
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_column('heartbeat_at')
        batch_op.drop_column('owner')
    for view in _views():
        op.execute(view)


def _views():
    """The views as the initial migration defines them (one definition, not a copy)."""
    path = Path(__file__).with_name("20261123_1748_initial_schema.py")
    spec = importlib.util.spec_from_file_location("initial_schema", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.GENERATION_HISTORY, module.RUN_SUMMARY
