"""Applying the Alembic migrations from code (`dreamcache db upgrade`, tests, the embedded default)."""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from db.session import make_engine

ROOT = Path(__file__).resolve().parent.parent


def alembic_config(url: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "alembic"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["configure_logging"] = False  # keep the caller's logging as it is
    return config


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


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
