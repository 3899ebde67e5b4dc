"""Generations record their sampler's eta and negative prompt; caches how their pass was prepared.

Why (issue 23): the authors' released inference conditions the unconditional passes and the cache on a
negative prompt, stretches the reference and samples the VAE posterior. A shot made with a negative
prompt is another shot, and a cache made with another text or preparation is another cache: it is part
of the cache's identity, so it is never silently reused for a run that asks for the other. Existing
rows keep the method's way (eta 0, no negative prompt, preparation ''), which is how they were made.
`generation_history` shows the new columns.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 09:00:00
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

from db.migrate import migration_module, views_set_aside

revision: str = '0006'
down_revision: Union[str, None] = '0005'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

IDENTITY = ["subject_id", "base_model_id", "base_model_revision", "adapter_id", "layer_preset", "resolution",
            "timestep"]


# The views from this revision on: generation_history gains eta, negative_prompt and cache_preparation.
_INITIAL = migration_module("20261123_1748_initial_schema.py")
GENERATION_HISTORY = (_INITIAL.GENERATION_HISTORY
                      .replace("    g.sampler,\n", "    g.sampler,\n    g.eta,\n    g.negative_prompt,\n")
                      .replace("    c.layer_preset,\n", "    c.layer_preset,\n    c.preparation AS cache_preparation,\n"))
RUN_SUMMARY = _INITIAL.RUN_SUMMARY


def upgrade() -> None:
    with views_set_aside("20261130_0900_samplers.py"):
        with op.batch_alter_table('generations', schema=None) as batch_op:
            batch_op.add_column(sa.Column('eta', sa.Double(), server_default='0', nullable=False))
            batch_op.add_column(sa.Column('negative_prompt', sa.Text(), server_default='', nullable=False))
        with op.batch_alter_table('subject_caches', schema=None) as batch_op:
            batch_op.add_column(sa.Column('preparation', sa.Text(), server_default='', nullable=False))
            batch_op.drop_constraint('uq_subject_caches_identity', type_='unique')
            batch_op.create_unique_constraint('uq_subject_caches_identity', IDENTITY + ['preparation'])


def downgrade() -> None:
    # Caches that differ only in their preparation would break the older, narrower identity; they (and the
    # shots made from them) are not dropped silently.
    prepared = op.get_bind().execute(sa.text("SELECT COUNT(*) FROM subject_caches WHERE preparation <> ''")).scalar()
    if prepared:
        raise RuntimeError(f"{prepared} caches were made with a negative prompt or the authors' preparation, which "
                           "revision 0005 cannot tell apart: delete them (and their generations) before downgrading")
    with views_set_aside():
        with op.batch_alter_table('subject_caches', schema=None) as batch_op:
            batch_op.drop_constraint('uq_subject_caches_identity', type_='unique')
            batch_op.create_unique_constraint('uq_subject_caches_identity', IDENTITY)
            batch_op.drop_column('preparation')
        with op.batch_alter_table('generations', schema=None) as batch_op:
            batch_op.drop_column('negative_prompt')
            batch_op.drop_column('eta')
