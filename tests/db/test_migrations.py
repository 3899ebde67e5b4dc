import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from typer.testing import CliRunner

from db import migrate, session
from db.models import Base
from db.session import make_engine
from flows.cli import app

TABLES = {"subjects", "segmentations", "subject_caches", "rejected_items", "prompts", "runs", "generations", "scores",
          "product_assets"}
VIEWS = {"generation_history", "run_summary"}
pytestmark = pytest.mark.fresh_migrations  # the migrations themselves, replayed from base


def test_upgrade_creates_the_schema_that_the_models_describe(database_url):
    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    with engine.connect() as connection:
        names = inspect(connection)
        assert TABLES == set(names.get_table_names()) - {"alembic_version"}
        assert VIEWS <= set(names.get_view_names())
        # The migration and the ORM models agree: autogenerate finds nothing to do.
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    engine.dispose()
    assert migrate.current_revision(database_url) == migrate.head_revision(database_url)


def test_downgrade_removes_everything_and_upgrade_works_again(database_url):
    migrate.upgrade(database_url)
    migrate.downgrade(database_url, "base")
    engine = make_engine(database_url)
    with engine.connect() as connection:
        names = inspect(connection)
        assert set(names.get_table_names()) <= {"alembic_version"}
        assert not set(names.get_view_names()) & VIEWS
    engine.dispose()
    migrate.upgrade(database_url)
    assert migrate.current_revision(database_url) == migrate.head_revision(database_url)


def test_cli_upgrades_a_fresh_sqlite_file(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMCACHE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DREAMCACHE_DATABASE_URL", raising=False)
    result = CliRunner().invoke(app, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "home" / "dreamcache.db").is_file()
    assert f"is at revision {migrate.head_revision('sqlite://')}" in result.output


def test_cli_upgrades_an_empty_postgres_database_without_printing_the_password(postgres_url, monkeypatch):
    url_with_password = postgres_url.replace("postgres@", "postgres:hunter2@")  # trust auth ignores it
    monkeypatch.setenv("DREAMCACHE_DATABASE_URL", url_with_password)
    result = CliRunner().invoke(app, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    assert "hunter2" not in result.output and "***" in result.output
    assert migrate.current_revision(postgres_url) == migrate.head_revision(postgres_url)


def test_cli_names_the_database_it_cannot_reach(monkeypatch):
    # The minute of patience for a restarting server (session.CONNECT_RETRY_S) is not what this test is about.
    monkeypatch.setattr(session, "CONNECT_RETRY_S", 2)
    monkeypatch.setenv("DREAMCACHE_DATABASE_URL", "postgresql+psycopg://app:s3cret@127.0.0.1:1/nowhere")
    result = CliRunner().invoke(app, ["db", "upgrade"])
    assert result.exit_code == 1
    assert "could not migrate postgresql+psycopg://app:***@127.0.0.1:1/nowhere" in result.output
    assert "s3cret" not in result.output
