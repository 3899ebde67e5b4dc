"""Drop catalogue_sources, prompt_lists and prompt_list_entries, and subjects.source_id.

Why: no code ever wrote them. A run's source and prompts are recorded in `runs.parameters` and each
subject's image in `subjects.source_uri`; empty tables beside them only suggested a history that was
not kept. The views read none of them, but are dropped and made again around the change to
`subjects`, which SQLite carries out by rebuilding the table.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 06:00:00
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

from db.migrate import views_set_aside

revision: str = '0003'
down_revision: Union[str, None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

ID = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def _timestamps():
    return [sa.Column('id', ID, nullable=False),
            sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
            sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False)]


def upgrade() -> None:
    with views_set_aside():
        with op.batch_alter_table('subjects', schema=None) as batch_op:
            batch_op.drop_constraint('fk_subjects_source_id_catalogue_sources', type_='foreignkey')
            batch_op.drop_column('source_id')
        op.drop_table('prompt_list_entries')
        op.drop_table('prompt_lists')
        op.drop_table('catalogue_sources')


def downgrade() -> None:
    with views_set_aside():
        op.create_table('catalogue_sources',
        sa.Column('uri', sa.String(length=1024), nullable=False),
        sa.Column('kind', sa.String(length=16), nullable=False),
        sa.Column('name', sa.String(length=255), nullable=True),
        *_timestamps(),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_catalogue_sources')),
        sa.UniqueConstraint('uri', name=op.f('uq_catalogue_sources_uri'))
        )
        op.create_table('prompt_lists',
        sa.Column('name', sa.String(length=255), nullable=False),
        sa.Column('content_sha256', sa.String(length=64), nullable=False),
        *_timestamps(),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_prompt_lists')),
        sa.UniqueConstraint('content_sha256', name=op.f('uq_prompt_lists_content_sha256'))
        )
        op.create_table('prompt_list_entries',
        sa.Column('prompt_list_id', ID, nullable=False),
        sa.Column('position', sa.Integer(), nullable=False),
        sa.Column('template', sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(['prompt_list_id'], ['prompt_lists.id'], name=op.f('fk_prompt_list_entries_prompt_list_id_prompt_lists'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('prompt_list_id', 'position', name=op.f('pk_prompt_list_entries'))
        )
        with op.batch_alter_table('subjects', schema=None) as batch_op:
            batch_op.add_column(sa.Column('source_id', ID, nullable=True))
            batch_op.create_foreign_key('fk_subjects_source_id_catalogue_sources', 'catalogue_sources', ['source_id'], ['id'],
                                        ondelete='SET NULL')
