"""Generations record their image's sha256 and size; segmentations their mask's and reference's sha256.

Why: a shot deleted or truncated after it was recorded `done` stayed broken through any number of
re-runs. With the size recorded, every re-run checks its plan's shots cheaply (one listing); with
the sha256, `dreamcache verify` finds any damage and `--repair` regenerates what is damaged.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 08:00:00
"""

import importlib.util
from pathlib import Path
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

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
    op.execute("DROP VIEW run_summary")
    op.execute("DROP VIEW generation_history")
    with op.batch_alter_table('segmentations', schema=None) as batch_op:
        batch_op.drop_column('reference_sha256')
        batch_op.drop_column('mask_sha256')
    with op.batch_alter_table('generations', schema=None) as batch_op:
        batch_op.drop_column('output_bytes')
        batch_op.drop_column('output_sha256')
    for view in _views():
        op.execute(view)


def _views():
    """The views as the initial migration defines them (one definition, not a copy)."""
    path = Path(__file__).with_name("20261123_1748_initial_schema.py")
    spec = importlib.util.spec_from_file_location("initial_schema", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.GENERATION_HISTORY, module.RUN_SUMMARY
