"""Initial schema: what was ingested, segmented, cached, generated and scored, and the history views.

Why: the platform's first persistent state. Unique keys make work idempotent (a subject cached
once per model configuration, a generation once per cache/prompt/seed/parameters), and the
`generation_history` and `run_summary` views answer the common questions in plain SQL
(docs/sql.md).

Revision ID: 0001
Revises:
Create Date: 2026-11-23 17:48:37
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = '0001'
down_revision: Union[str, None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


# Scores are pivoted into columns, one per metric; with several scorer models, the highest value.
def _score(metric: str, masked: bool) -> str:
    flag = "TRUE" if masked else "FALSE"
    return (f"(SELECT MAX(sc.value) FROM scores sc WHERE sc.generation_id = g.id "
            f"AND sc.metric = '{metric}' AND sc.masked = {flag})")


GENERATION_HISTORY = f"""
CREATE VIEW generation_history AS
SELECT
    g.id AS generation_id,
    g.run_id,
    r.flow_run_id,
    s.id AS subject_id,
    s.sku,
    s.category,
    p.text AS prompt,
    g.seed,
    g.guidance,
    g.text_scale,
    g.image_scale,
    g.steps,
    g.sampler,
    g.resolution,
    g.base_model_id,
    g.adapter_id,
    c.layer_preset,
    g.status,
    g.error,
    g.output_uri,
    g.attempts,
    g.started_at,
    g.finished_at,
    g.duration_s,
    g.created_at,
    {_score("dino", False)} AS dino,
    {_score("clip_i", False)} AS clip_i,
    {_score("clip_t", False)} AS clip_t,
    {_score("dino", True)} AS mdino,
    {_score("clip_i", True)} AS mclip_i
FROM generations g
JOIN subject_caches c ON c.id = g.subject_cache_id
JOIN subjects s ON s.id = c.subject_id
JOIN prompts p ON p.id = g.prompt_id
LEFT JOIN runs r ON r.id = g.run_id
"""

RUN_SUMMARY = """
CREATE VIEW run_summary AS
SELECT
    r.id AS run_id,
    r.flow_run_id,
    r.name,
    r.status,
    r.started_at,
    r.finished_at,
    (SELECT COUNT(*) FROM generations g WHERE g.run_id = r.id AND g.status = 'done') AS images_done,
    (SELECT COUNT(*) FROM generations g WHERE g.run_id = r.id AND g.status = 'failed') AS images_failed,
    (SELECT COUNT(*) FROM generations g WHERE g.run_id = r.id AND g.status IN ('pending', 'running')) AS images_open,
    (SELECT AVG(g.duration_s) FROM generations g WHERE g.run_id = r.id AND g.status = 'done') AS seconds_per_image
FROM runs r
"""


def upgrade() -> None:
    op.create_table('catalogue_sources',
    sa.Column('uri', sa.String(length=1024), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=True),
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_catalogue_sources')),
    sa.UniqueConstraint('uri', name=op.f('uq_catalogue_sources_uri'))
    )
    op.create_table('prompt_lists',
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('content_sha256', sa.String(length=64), nullable=False),
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_prompt_lists')),
    sa.UniqueConstraint('content_sha256', name=op.f('uq_prompt_lists_content_sha256'))
    )
    op.create_table('prompts',
    sa.Column('text', sa.Text(), nullable=False),
    sa.Column('text_sha256', sa.String(length=64), nullable=False),
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_prompts')),
    sa.UniqueConstraint('text_sha256', name=op.f('uq_prompts_text_sha256'))
    )
    op.create_table('runs',
    sa.Column('flow_run_id', sa.String(length=64), nullable=True),
    sa.Column('name', sa.String(length=255), nullable=True),
    sa.Column('parameters', sa.JSON(), nullable=False),
    sa.Column('status', sa.Enum('pending', 'running', 'completed', 'failed', 'cancelled', name='run_status', native_enum=False, length=16), server_default='pending', nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('summary', sa.JSON(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_runs')),
    sa.UniqueConstraint('flow_run_id', name=op.f('uq_runs_flow_run_id'))
    )
    op.create_table('prompt_list_entries',
    sa.Column('prompt_list_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('template', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['prompt_list_id'], ['prompt_lists.id'], name=op.f('fk_prompt_list_entries_prompt_list_id_prompt_lists'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('prompt_list_id', 'position', name=op.f('pk_prompt_list_entries'))
    )
    op.create_table('subjects',
    sa.Column('source_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('sku', sa.String(length=255), nullable=False),
    sa.Column('category', sa.String(length=255), nullable=True),
    sa.Column('source_uri', sa.String(length=1024), nullable=False),
    sa.Column('content_sha256', sa.String(length=64), nullable=False),
    sa.Column('attributes', sa.JSON(), nullable=False),
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.ForeignKeyConstraint(['source_id'], ['catalogue_sources.id'], name=op.f('fk_subjects_source_id_catalogue_sources'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_subjects')),
    sa.UniqueConstraint('sku', 'content_sha256', name=op.f('uq_subjects_sku_content_sha256'))
    )
    with op.batch_alter_table('subjects', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_subjects_category'), ['category'], unique=False)
        batch_op.create_index(batch_op.f('ix_subjects_content_sha256'), ['content_sha256'], unique=False)
        batch_op.create_index(batch_op.f('ix_subjects_sku'), ['sku'], unique=False)

    op.create_table('segmentations',
    sa.Column('subject_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('method', sa.String(length=64), nullable=False),
    sa.Column('mask_uri', sa.String(length=1024), nullable=True),
    sa.Column('reference_uri', sa.String(length=1024), nullable=True),
    sa.Column('area_fraction', sa.Double(), nullable=True),
    sa.Column('largest_component_share', sa.Double(), nullable=True),
    sa.Column('touches_border', sa.Boolean(), nullable=True),
    sa.Column('quality', sa.String(length=16), nullable=False),
    sa.Column('message', sa.Text(), nullable=True),
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.ForeignKeyConstraint(['subject_id'], ['subjects.id'], name=op.f('fk_segmentations_subject_id_subjects'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_segmentations')),
    sa.UniqueConstraint('subject_id', 'method', name=op.f('uq_segmentations_subject_id_method'))
    )
    op.create_table('subject_caches',
    sa.Column('subject_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('segmentation_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('base_model_id', sa.String(length=255), nullable=False),
    sa.Column('base_model_revision', sa.String(length=64), nullable=False),
    sa.Column('adapter_id', sa.String(length=255), nullable=False),
    sa.Column('layer_preset', sa.String(length=32), nullable=False),
    sa.Column('timestep', sa.Integer(), nullable=False),
    sa.Column('resolution', sa.Integer(), nullable=False),
    sa.Column('dtype', sa.String(length=16), nullable=False),
    sa.Column('tensor_uri', sa.String(length=1024), nullable=True),
    sa.Column('sha256', sa.String(length=64), nullable=True),
    sa.Column('bytes', sa.BigInteger(), nullable=True),
    sa.Column('status', sa.Enum('pending', 'running', 'done', 'failed', name='work_status', native_enum=False, length=16), server_default='pending', nullable=False),
    sa.Column('claimed_by', sa.String(length=255), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.ForeignKeyConstraint(['segmentation_id'], ['segmentations.id'], name=op.f('fk_subject_caches_segmentation_id_segmentations'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['subject_id'], ['subjects.id'], name=op.f('fk_subject_caches_subject_id_subjects'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_subject_caches')),
    sa.UniqueConstraint('subject_id', 'base_model_id', 'base_model_revision', 'adapter_id', 'layer_preset', 'resolution', 'timestep', name='uq_subject_caches_identity')
    )
    with op.batch_alter_table('subject_caches', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_subject_caches_status'), ['status'], unique=False)

    op.create_table('generations',
    sa.Column('run_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('subject_cache_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('prompt_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('seed', sa.BigInteger(), nullable=False),
    sa.Column('params_sha256', sa.String(length=64), nullable=False),
    sa.Column('parameters', sa.JSON(), nullable=False),
    sa.Column('sampler', sa.String(length=64), nullable=False),
    sa.Column('guidance', sa.String(length=16), nullable=False),
    sa.Column('text_scale', sa.Double(), nullable=False),
    sa.Column('image_scale', sa.Double(), nullable=True),
    sa.Column('steps', sa.Integer(), nullable=False),
    sa.Column('resolution', sa.Integer(), nullable=False),
    sa.Column('base_model_id', sa.String(length=255), nullable=False),
    sa.Column('adapter_id', sa.String(length=255), nullable=False),
    sa.Column('output_uri', sa.String(length=1024), nullable=True),
    sa.Column('duration_s', sa.Double(), nullable=True),
    sa.Column('status', sa.Enum('pending', 'running', 'done', 'failed', name='work_status', native_enum=False, length=16), server_default='pending', nullable=False),
    sa.Column('claimed_by', sa.String(length=255), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.ForeignKeyConstraint(['prompt_id'], ['prompts.id'], name=op.f('fk_generations_prompt_id_prompts')),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_generations_run_id_runs'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['subject_cache_id'], ['subject_caches.id'], name=op.f('fk_generations_subject_cache_id_subject_caches'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_generations')),
    sa.UniqueConstraint('subject_cache_id', 'prompt_id', 'seed', 'params_sha256', name='uq_generations_identity')
    )
    with op.batch_alter_table('generations', schema=None) as batch_op:
        batch_op.create_index('ix_generations_run_id_status', ['run_id', 'status'], unique=False)
        batch_op.create_index(batch_op.f('ix_generations_status'), ['status'], unique=False)

    op.create_table('scores',
    sa.Column('generation_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('metric', sa.String(length=16), nullable=False),
    sa.Column('masked', sa.Boolean(), nullable=False),
    sa.Column('value', sa.Double(), nullable=False),
    sa.Column('scorer_model_id', sa.String(length=255), nullable=False),
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.ForeignKeyConstraint(['generation_id'], ['generations.id'], name=op.f('fk_scores_generation_id_generations'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_scores')),
    sa.UniqueConstraint('generation_id', 'metric', 'masked', 'scorer_model_id', name=op.f('uq_scores_generation_id_metric_masked_scorer_model_id'))
    )
    with op.batch_alter_table('scores', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_scores_generation_id'), ['generation_id'], unique=False)

    op.execute(GENERATION_HISTORY)
    op.execute(RUN_SUMMARY)


def downgrade() -> None:
    op.execute("DROP VIEW run_summary")
    op.execute("DROP VIEW generation_history")
    with op.batch_alter_table('scores', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_scores_generation_id'))

    op.drop_table('scores')
    with op.batch_alter_table('generations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_generations_status'))
        batch_op.drop_index('ix_generations_run_id_status')

    op.drop_table('generations')
    with op.batch_alter_table('subject_caches', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_subject_caches_status'))

    op.drop_table('subject_caches')
    op.drop_table('segmentations')
    with op.batch_alter_table('subjects', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_subjects_sku'))
        batch_op.drop_index(batch_op.f('ix_subjects_content_sha256'))
        batch_op.drop_index(batch_op.f('ix_subjects_category'))

    op.drop_table('subjects')
    op.drop_table('prompt_list_entries')
    op.drop_table('runs')
    op.drop_table('prompts')
    op.drop_table('prompt_lists')
    op.drop_table('catalogue_sources')
