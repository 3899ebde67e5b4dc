import pytest

from db import migrate
from db.session import make_engine, session_factory


@pytest.fixture
def sessions(database_url):
    """A session factory on a freshly migrated database (SQLite and PostgreSQL)."""
    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    yield session_factory(engine)
    engine.dispose()
