"""A unit of work outlives a lost connection: run again on a new one, once committed (db.session.in_transaction).

The fault is real: the server ends the work's own backend (as a restart or fail-over does) on the suite's
PostgreSQL."""

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from db.session import connection_lost, in_transaction, make_engine, session_factory


@pytest.fixture
def shots_db(postgres_url):
    """Sessions on a database of one table (not the migrated schema of tests/db/conftest.py's `sessions`)."""
    engine = make_engine(postgres_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE shots (id integer PRIMARY KEY)"))
    yield session_factory(engine)
    engine.dispose()


def test_work_whose_connection_is_cut_runs_again_and_commits_once(shots_db):
    attempts = []

    def record(s):
        attempts.append(1)
        s.execute(text("INSERT INTO shots VALUES (1)"))
        if len(attempts) == 1:  # the server ends this very connection, mid-transaction
            s.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
        return "recorded"

    assert in_transaction(shots_db, record) == "recorded"
    assert len(attempts) == 2
    with shots_db() as s:
        assert s.execute(text("SELECT id FROM shots")).scalars().all() == [1]  # the cut attempt left nothing


def test_any_other_database_error_is_raised_at_once(shots_db):
    attempts = []

    def record(s):
        attempts.append(1)
        s.execute(text("INSERT INTO shots VALUES (1), (1)"))

    with pytest.raises(IntegrityError) as raised:
        in_transaction(shots_db, record)
    assert len(attempts) == 1 and not connection_lost(raised.value)
