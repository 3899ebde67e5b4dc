"""`dreamcache history` on both databases: PostgreSQL cannot type a bare `:x IS NULL` parameter."""

import pytest
from typer.testing import CliRunner

from flows.cli import app


@pytest.mark.parametrize("filters", [[], ["--sku", "LAMP-1"], ["--run", "3"], ["--sku", "LAMP-1", "--run", "3"]])
def test_history_queries_run_on_either_database(database_url, monkeypatch, tmp_path, filters):
    monkeypatch.setenv("DREAMCACHE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DREAMCACHE_DATABASE_URL", database_url)
    result = CliRunner().invoke(app, ["history", *filters])
    assert result.exit_code == 0, result.output
