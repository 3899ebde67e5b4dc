"""Applying the Alembic migrations from code (`dreamcache db upgrade`, tests, the embedded default)."""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text

from db.session import make_engine

ROOT = Path(__file__).resolve().parent.parent
# The analysts' read-only group role (docs/sql.md): created by a superuser, granted the views by every upgrade,
# each view by its own constant statement.
READER_ROLE = "dreamcache_reader"
VIEW_GRANTS = {
    "generation_history": "GRANT SELECT ON generation_history TO dreamcache_reader",
    "run_summary": "GRANT SELECT ON run_summary TO dreamcache_reader",
    "failures": "GRANT SELECT ON failures TO dreamcache_reader",
}


def alembic_config(url: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "alembic"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["configure_logging"] = False  # keep the caller's logging as it is
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate to `revision`, then grant the analysts' role the views (a view made again has lost its grants)."""
    command.upgrade(alembic_config(url), revision)
    grant_views(url)


def grant_views(url: str) -> None:
    """On PostgreSQL, where READER_ROLE exists: USAGE on the schema and SELECT on the views of this revision
    that the connected role owns (the schema owner's; another role could not grant them). Without the role,
    which only a superuser or a CREATEROLE role may create, there is nothing to grant.
    """
    engine = make_engine(url)
    try:
        if engine.dialect.name != "postgresql":
            return
        with engine.begin() as connection:
            if connection.scalar(text("SELECT 1 FROM pg_roles WHERE rolname = :role"), dict(role=READER_ROLE)) is None:
                return
            owned = set(connection.scalars(text("SELECT viewname FROM pg_views WHERE schemaname = current_schema() "
                                                "AND viewowner = current_user")))
            if not owned & set(VIEW_GRANTS):
                return
            connection.execute(text("GRANT USAGE ON SCHEMA public TO dreamcache_reader"))
            for view, grant in VIEW_GRANTS.items():
                if view in owned:  # the views of this revision
                    connection.execute(text(grant))
    finally:
        engine.dispose()


def downgrade(url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def head_revision(url: str) -> str | None:
    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()


def migration_module(filename: str):
    """A migration file of alembic/versions loaded as a module (they are not a package): for its view SQL."""
    path = ROOT / "alembic" / "versions" / filename
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextmanager
def views_set_aside(definitions: str = "20261123_1748_initial_schema.py"):
    """Inside a migration: the views dropped around a change to the tables they read, then made again.

    SQLite changes a table by rebuilding it, which a view reading it refuses. The views are made again
    as the migration file `definitions` defines them (GENERATION_HISTORY, RUN_SUMMARY): the one in force
    at that revision, so that a migration's upgrade and downgrade each leave the views of their revision.
    """
    from alembic import op

    op.execute("DROP VIEW run_summary")
    op.execute("DROP VIEW generation_history")
    yield
    module = migration_module(definitions)
    op.execute(module.GENERATION_HISTORY)
    op.execute(module.RUN_SUMMARY)
