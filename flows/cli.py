"""The full `dreamcache` command: the library's commands plus the platform's (database, runs)."""

from __future__ import annotations

import typer
from sqlalchemy import make_url

from dreamcache import cli as library_cli
from dreamcache.config import Settings

app = library_cli.app
db_app = typer.Typer(help="The platform database (SQLite embedded, PostgreSQL in production).", no_args_is_help=True)
app.add_typer(db_app, name="db")


def _safe(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head", help="Target revision.")) -> None:
    """Apply the migrations (creates the schema on an empty database)."""
    from db import migrate

    url = Settings().resolved_database_url
    try:
        migrate.upgrade(url, revision)
    except Exception as exc:  # connection refused, permissions, ...: say which database and why
        library_cli._fail(f"could not migrate {_safe(url)}: {exc}")
    typer.echo(f"{_safe(url)} is at revision {migrate.current_revision(url)}")


@db_app.command("current")
def db_current() -> None:
    """Show the database's revision and the code's head revision."""
    from db import migrate

    url = Settings().resolved_database_url
    typer.echo(f"{_safe(url)}: revision {migrate.current_revision(url)} (head: {migrate.head_revision(url)})")


def main() -> None:
    library_cli.main()
