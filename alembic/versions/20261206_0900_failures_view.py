"""A `failures` view: failed shots, failed product caches and rejected inputs, with their reasons.

Why (issue 33): docs/sql.md's "failures" query read `subject_caches`, `subjects` and `rejected_items`, base
tables the analysts' read-only role may not read (it gets the views only: base tables hold input URIs,
tensor URIs and leases), so it failed for the very role the page sets up. The view gives what the query
needs and nothing more, and `dreamcache db upgrade` grants it with the others (db/migrate.py).

It reads base tables only, so that `views_set_aside` may drop and remake generation_history beneath it;
a later migration that rebuilds generations, subject_caches, subjects, prompts or rejected_items on SQLite
must set this view aside too.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 09:00:00
"""

from typing import Sequence, Union

from alembic import op

revision: str = '0008'
down_revision: Union[str, None] = '0007'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

FAILURES = """
CREATE VIEW failures AS
SELECT 'generation' AS item, g.run_id, s.sku, p.text AS prompt, g.attempts, g.error, g.finished_at
FROM generations g
JOIN subject_caches c ON c.id = g.subject_cache_id
JOIN subjects s ON s.id = c.subject_id
JOIN prompts p ON p.id = g.prompt_id
WHERE g.status = 'failed'
UNION ALL
SELECT 'cache' AS item, NULL AS run_id, s.sku, NULL AS prompt, c.attempts, c.error, c.finished_at
FROM subject_caches c
JOIN subjects s ON s.id = c.subject_id
WHERE c.status = 'failed'
UNION ALL
SELECT 'input (' || r.stage || ')' AS item, r.run_id, r.item AS sku, NULL AS prompt, 0 AS attempts,
       r.reason AS error, r.created_at AS finished_at
FROM rejected_items r
"""


def upgrade() -> None:
    op.execute(FAILURES)


def downgrade() -> None:
    op.execute("DROP VIEW failures")
