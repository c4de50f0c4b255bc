"""Database engines: one place that knows how each database is opened.

SQLite: WAL mode (the receiver and the drainer share the file), `synchronous=FULL` (a webhook
that got its 200 survives a power cut), a busy timeout, and transactions that we begin ourselves
so that writers can take the write lock up front (`BEGIN IMMEDIATE`) instead of failing on a lock
upgrade. The receiver's batch writes and the drainer's write transactions each go through a
writer of their own (`relay/db/sqlite_writer.py`) on a plain `sqlite3` connection
(`sqlite_writer_connector`), set up exactly like the engine's. PostgreSQL: asyncpg with
connect, pool and lock timeouts, and a pre-ping so that a restarted server is reconnected to.

SQLite connections do not outlive a failure. SQLite shares one mapping of the database's `-shm`
file among all the connections of a process to that file, for as long as one of them is open.
A connection opened while the files could not be written maps it read-only, and every
connection the process opens while that mapping lives shares it and cannot write either, even
once the files are writable again: only a connection opened when none is open maps the file
anew. So the engine keeps no idle connection to a SQLite file (`NullPool`: a connection is
closed when its query or transaction is over), and the only connections that live on are the
writers' (`sqlite_writer_connector`), which close theirs after an error of the database (not
after an error of one row's values) and open a new one for their next transaction. Once the
files are writable, the first connection opened while no other is open maps them read-write,
and every process (`serve`, `drain`, `run`) writes again without a restart.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from relay.database_url import normalise_database_url

# Execution option that makes a SQLite transaction begin with BEGIN IMMEDIATE.
SQLITE_IMMEDIATE = "relay_sqlite_immediate"
# Execution option recording a SQLite engine's busy timeout, for `sqlite_writer_connector`.
SQLITE_BUSY_TIMEOUT_MS = "relay_sqlite_busy_timeout_ms"

# PostgreSQL's `statement_timeout` for the relay's own work (`serve`, `drain`, `run`, `check`):
# the server cancels a statement that runs longer, and the relay handles that like any other
# database error (the receiver answers 503, the drainer claims or records again). Its
# statements take milliseconds (a claim of 600 rows, a batch of 255 webhooks, a purge batch of
# 1,000 rows); this only ends one that is stuck, before a drainer's lease (60 s by default)
# runs out under it or a stop waits on it. `migrate` and the `outbox` commands pass None: a
# migration, a requeue or the stats of a large outbox may rightly take longer.
STATEMENT_TIMEOUT_SECONDS = 30.0


def is_sqlite(url: str) -> bool:
    return normalise_database_url(url).startswith("sqlite")


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL, None for an in-memory database."""
    database = make_url(normalise_database_url(url)).database
    if not database or database == ":memory:":
        return None
    return Path(database)


def describe_url(url: str) -> str:
    """The database URL as shown to people: without its password."""
    return make_url(normalise_database_url(url)).render_as_string(hide_password=True)


def create_engine(
    url: str,
    timeout_seconds: float,
    pool_size: int = 5,
    statement_timeout_seconds: float | None = STATEMENT_TIMEOUT_SECONDS,
) -> AsyncEngine:
    """An engine for `url`. On PostgreSQL, `timeout_seconds` bounds connecting, waiting for a
    pooled connection and waiting for a lock; `statement_timeout_seconds` bounds a statement
    (None: no limit). SQLite waits at most `timeout_seconds` for its write lock."""
    url = normalise_database_url(url)
    if is_sqlite(url):
        return _create_sqlite_engine(url, timeout_seconds)
    return _create_postgresql_engine(url, timeout_seconds, pool_size, statement_timeout_seconds)


def _create_sqlite_engine(url: str, timeout_seconds: float) -> AsyncEngine:
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    busy_timeout_ms = int(timeout_seconds * 1000)
    # hide_parameters: a database error must never put a payload (personal data) in a log line.
    # On a file, no connection is kept idle (the module's docstring says why); an in-memory
    # database lives only as long as its one connection, which SQLAlchemy's default pool keeps.
    engine = create_async_engine(
        url,
        connect_args={"timeout": timeout_seconds},
        hide_parameters=True,
        execution_options={SQLITE_BUSY_TIMEOUT_MS: busy_timeout_ms},
        **({"poolclass": NullPool} if path is not None else {}),
    )

    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        # Let us emit BEGIN ourselves (the driver's implicit BEGIN is always DEFERRED).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in _sqlite_pragmas(busy_timeout_ms):
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(connection: Any) -> None:
        immediate = connection.get_execution_options().get(SQLITE_IMMEDIATE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _sqlite_pragmas(busy_timeout_ms: int) -> list[str]:
    return [
        "PRAGMA journal_mode=WAL",
        "PRAGMA synchronous=FULL",
        f"PRAGMA busy_timeout={busy_timeout_ms}",
        "PRAGMA foreign_keys=ON",
    ]


def sqlite_writer_connector(engine: AsyncEngine) -> Callable[[], sqlite3.Connection] | None:
    """How to open a plain `sqlite3` connection to a SQLite engine's database file, set up like
    the engine's own connections, for a writer (the receiver's batch writes, the drainer's write
    transactions); None when the engine is not one of ours on a SQLite file (PostgreSQL, an
    in-memory database, a URL with options).

    The connection is in autocommit mode (`isolation_level=None`): the caller sends
    `BEGIN IMMEDIATE` and `COMMIT` itself. It may be used from any one thread at a time. The
    writer keeps it between transactions, and closes it after an error of the database (see
    the module's docstring).
    """
    url = engine.url
    busy_timeout_ms = engine.get_execution_options().get(SQLITE_BUSY_TIMEOUT_MS)
    path = url.database
    if engine.dialect.name != "sqlite" or url.query or not isinstance(busy_timeout_ms, int):
        return None
    if not path or path == ":memory:" or path.startswith("file:"):
        return None

    def connect() -> sqlite3.Connection:
        connection = sqlite3.connect(
            path, timeout=busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False
        )
        try:
            for pragma in _sqlite_pragmas(busy_timeout_ms):
                connection.execute(pragma)
        except BaseException:
            connection.close()
            raise
        return connection

    return connect


def _create_postgresql_engine(
    url: str, timeout_seconds: float, pool_size: int, statement_timeout_seconds: float | None
) -> AsyncEngine:
    lock_timeout_ms = int(timeout_seconds * 1000)
    # 0 is PostgreSQL's "no limit", said explicitly so that a limit set on the role or the
    # database does not cut a migration short.
    statement_timeout_ms = int((statement_timeout_seconds or 0) * 1000)
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=timeout_seconds,
        pool_pre_ping=True,
        hide_parameters=True,
        connect_args={
            "timeout": timeout_seconds,
            "server_settings": {
                "lock_timeout": str(lock_timeout_ms),
                "statement_timeout": str(statement_timeout_ms),
                # A crashed client must never hold row locks for long.
                "idle_in_transaction_session_timeout": "60000",
                "application_name": "aircall-relay",
            },
        },
    )


def not_abandoned(engine: AsyncEngine) -> anyio.CancelScope:
    """A scope for work on `engine` (a query, or one short transaction) that must not be
    abandoned halfway on SQLite: cancelling its task (a drainer stopping) takes effect once the
    work is over. Elsewhere (asyncpg, which cancels a query cleanly) it changes nothing.

    On SQLite, a statement abandoned while aiosqlite's thread runs it makes SQLAlchemy close the
    connection from a task of its own, which waits for the statement to end. If the event loop
    shuts down before it has (a process exiting just after its stop), `asyncio.run` cancels
    that task; aiosqlite's `close()` then waits for a second stop request that its thread, gone
    after the first, never answers, and `asyncio.run` waits for the task forever: the process
    hangs at exit, its work done. Only anyio cancellation is held off (a cancel scope's, not
    `Task.cancel()`), so tasks doing such work are stopped through cancel scopes.
    """
    return anyio.CancelScope(shield=engine.dialect.name == "sqlite")


def writer(engine: AsyncEngine) -> AsyncEngine:
    """The same engine, for transactions that write (BEGIN IMMEDIATE on SQLite)."""
    return engine.execution_options(**{SQLITE_IMMEDIATE: True})
