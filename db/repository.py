"""Idempotent writes: rows keyed by their unique constraints are inserted once, whoever asks first."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from sqlalchemy import select, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import Base


def insert_missing(session: Session, model: type[Base], rows: Sequence[dict[str, Any]]) -> int:
    """INSERT ... ON CONFLICT DO NOTHING: rows whose unique key exists are skipped, never duplicated.

    Safe under concurrency on both databases: two workers inserting the same key race on the
    unique index, and the loser's row is simply not inserted. Returns how many rows were new.
    """
    if not rows:
        return 0
    dialect = session.get_bind().dialect.name
    insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}.get(dialect)
    if insert is None:
        raise NotImplementedError(f"idempotent inserts are implemented for PostgreSQL and SQLite, not {dialect}")
    statement = insert(model).values(list(rows)).on_conflict_do_nothing().returning(*model.__table__.primary_key)
    return len(session.execute(statement).all())  # rowcount is not reliable for multi-row inserts


def ids_by_key(session: Session, model: type[Base], columns: Sequence[str],
               keys: Iterable[tuple]) -> dict[tuple, int]:
    """Map unique-key tuples to row ids, e.g. after `insert_missing`."""
    keys = list(keys)
    if not keys:
        return {}
    cols = [getattr(model, c) for c in columns]
    found: dict[tuple, int] = {}
    for start in range(0, len(keys), 500):  # stay well under the databases' bound-parameter limits
        chunk = keys[start : start + 500]
        rows = session.execute(select(model.id, *cols).where(tuple_(*cols).in_(chunk)))
        found.update({tuple(row[1:]): row[0] for row in rows})
    return found
