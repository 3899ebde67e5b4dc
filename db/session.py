"""Engines and sessions for the configured database URL (SQLite embedded, PostgreSQL in production)."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

logger = logging.getLogger(__name__)

T = TypeVar("T")

# How long a new PostgreSQL connection keeps trying while the server is unreachable, starting up or
# shutting down (a restart, a fail-over): work waits for the database instead of failing.
CONNECT_RETRY_S = 60
# What a server that is down, restarting or failing over answers (libpq's messages; no SQLSTATE comes
# with a failed connection). Anything else (wrong password, unknown role or database) fails at once.
TRANSIENT_CONNECT_ERRORS = ("connection refused", "the database system is", "server closed the connection",
                            "connection reset", "timeout expired", "could not receive data", "no route to host",
                            "terminating connection")

# How long a SQLite writer waits for the lock before failing: claims serialise on it.
SQLITE_BUSY_TIMEOUT_MS = 30_000


def make_engine(url: str, **kwargs) -> Engine:
    """An engine with the settings this platform relies on, for either database."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        # pysqlite defers BEGIN until the first write; emit BEGIN IMMEDIATE ourselves instead, so a
        # transaction takes SQLite's single write lock when it starts. Writers then queue on the
        # busy timeout rather than failing on a stale snapshot (SQLITE_BUSY_SNAPSHOT in WAL mode):
        # this is the SQLite equivalent of row claiming with FOR UPDATE SKIP LOCKED (see db.claims).
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        return engine
    # pool_pre_ping: connections survive a database restart (the next checkout reconnects), and the
    # reconnection waits for the server to be back (see _connect_with_retry).
    engine = create_engine(url, pool_pre_ping=True, **kwargs)
    event.listen(engine, "do_connect", _connect_with_retry)
    return engine


def _connect_with_retry(dialect, _record, cargs, cparams):
    """Connect, retrying with backoff for CONNECT_RETRY_S while the server is down or restarting.

    Only an unreachable or restarting server is waited for (TRANSIENT_CONNECT_ERRORS); a wrong
    password or a missing database fails at once.
    """
    deadline = time.monotonic() + CONNECT_RETRY_S
    delay = 0.2
    while True:
        try:
            return dialect.connect(*cargs, **cparams)
        except dialect.loaded_dbapi.OperationalError as exc:
            transient = any(marker in str(exc).lower() for marker in TRANSIENT_CONNECT_ERRORS)
            if not transient or time.monotonic() + delay > deadline:
                raise
            logger.warning("database unreachable (%s): retrying in %.1fs", str(exc).strip().splitlines()[0], delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    dbapi_connection.isolation_level = None  # let the "begin" event issue BEGIN
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: committed when the block ends, rolled back on any error."""
    with factory() as session, session.begin():
        yield session


# How often a unit of work is run again after its connection was lost under it (each new connection itself
# waits up to CONNECT_RETRY_S for the server).
LOST_CONNECTION_ATTEMPTS = 3


def connection_lost(exc: BaseException) -> bool:
    """The connection died under a statement (the server restarted, failed over or cut it): the transaction
    was rolled back, nothing of it is written."""
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def in_transaction(factory: sessionmaker[Session], work: Callable[[Session], T]) -> T:
    """`work(session)` as one transaction, run again from the start on a new connection when the connection
    is lost under it. Only for work that is safe to repeat as a whole (a lost transaction left nothing
    behind, so work that writes the same rows again is): recording a shot, renewing leases."""
    for attempt in range(1, LOST_CONNECTION_ATTEMPTS + 1):
        try:
            with transaction(factory) as session:
                return work(session)
        except DBAPIError as exc:
            if not connection_lost(exc) or attempt == LOST_CONNECTION_ATTEMPTS:
                raise
            logger.warning("database connection lost (%s): running the transaction again",
                           str(exc.orig).strip().splitlines()[0])
    raise AssertionError("unreachable")
