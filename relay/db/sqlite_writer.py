"""The one writer of a SQLite file: the receiver's inserts and the drainer's updates both go
through a `SqliteWriter`.

- **A thread that owns its connection.** Each writer has one thread and one plain `sqlite3`
  connection (`sqlite_writer_connector`: set up like the engine's, WAL, `synchronous=FULL`, the
  busy timeout), opened on that thread at the first transaction and kept between transactions.
  A transaction is one hand-off from the event loop to the thread: every statement, fetch and
  the commit run there, with the GIL released while SQLite works. (Through SQLAlchemy's async
  engine and aiosqlite, each step would be a round trip between the loop and aiosqlite's
  thread.)
- **`BEGIN IMMEDIATE`**: a transaction takes SQLite's write lock when it begins, so it never
  fails on a lock upgrade halfway; a lock held by another process is waited for up to the
  engine's busy timeout (`RELAY_DATABASE_TIMEOUT_SECONDS`), then fails as an error of the
  database.
- **Group commit**: one transaction at a time; the works (`run(work)`) that queue while one runs
  share the next, in the order they were asked for, and each gets its own result. A commit (its
  WAL writes and `fsync`) serves them all, and the writers of one process never wait on the busy
  handler for each other.
- **One work's bad row fails only that work.** When a shared transaction fails with an error of
  one row's values (`row_specific_error`: a constraint, a value the column cannot hold), nothing
  of it was kept, and each of its works is run again in a transaction of its own, in order: only
  the works that fail alone get the error. The pass stops at the first error of the database
  (that work and the ones after it get it). An error of the database fails every work of the
  transaction at once.
- **No connection outlives an error of the database**: after one (anything but an error of one
  row's values), the connection is closed and the next transaction opens a new one, which a
  database read-only for a while, or a full disk, needs to write again (`relay/db/engine.py`
  says why). After an error of one row's values it is kept.
- **Errors** are SQLAlchemy's `DBAPIError` family whatever raised them (a work may use the
  driver's connection directly), with no parameter in their text (no payload in a log line).
- **Exits do not hang.** A transaction, once begun, runs to its end in the thread: a caller
  cancelled meanwhile stops waiting, but the works taken along with its own still get their
  results (and a drainer waits for it: `not_abandoned`). A work cancelled while still queued is
  taken out of the queue, so nothing of it runs. `close` closes the connection on the thread,
  after the transaction under way, and lets the thread end without waiting for it.

A work is a plain function of a synchronous SQLAlchemy `Connection`, run inside the
transaction; it may execute SQLAlchemy statements on it (the drainer) or use
`driver_connection(connection)` for the `sqlite3` connection itself (the receiver's
`executemany`, with no per-row work of SQLAlchemy's).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar, cast

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine

from relay.db.engine import sqlite_writer_connector
from relay.db.errors import row_specific_error

Result = TypeVar("Result")


class _Queued(Generic[Result]):
    """A work waiting for its transaction, then its outcome (set on the writer's thread before
    `future`, the transaction's, is done)."""

    __slots__ = ("error", "future", "result", "work")

    def __init__(self, work: Callable[[sa.Connection], Result]) -> None:
        self.work = work
        self.future: Future[None] | None = None
        self.result: Result | None = None
        self.error: BaseException | None = None


def driver_connection(connection: sa.Connection) -> sqlite3.Connection:
    """The `sqlite3` connection under a work's `connection` (same transaction)."""
    return cast(sqlite3.Connection, connection.connection.driver_connection)


class SqliteWriter:
    """See the module's docstring. `pragmas`: statements run on each new connection, after the
    engine's settings (the drainer's cache and temporary store)."""

    def __init__(
        self,
        connect: Callable[[], sqlite3.Connection],
        *,
        pragmas: Sequence[str] = (),
        thread_name: str = "sqlite-writer",
    ) -> None:
        # NullPool: closing the writer's Connection closes the `sqlite3` connection.
        # hide_parameters: a database error must never put a payload in a log line.
        self._engine = sa.create_engine(
            "sqlite://", creator=connect, poolclass=sa.pool.NullPool, hide_parameters=True
        )
        extra = tuple(pragmas)

        @sa.event.listens_for(self._engine, "connect")
        def on_connect(dbapi_connection: Any, connection_record: Any) -> None:
            for pragma in extra:
                dbapi_connection.execute(pragma)

        @sa.event.listens_for(self._engine, "begin")
        def on_begin(connection: sa.Connection) -> None:
            # The connection is in autocommit mode: the transaction is ours to begin.
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        self._connection: sa.Connection | None = None  # used on the writer's thread only
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self._queue: list[_Queued[Any]] = []
        self._lock: asyncio.Lock | None = None
        self.transactions = 0  # transactions committed
        self.connections_opened = 0

    @classmethod
    def for_engine(
        cls, engine: AsyncEngine, *, pragmas: Sequence[str] = (), thread_name: str = "sqlite-writer"
    ) -> SqliteWriter | None:
        """A writer for the engine's SQLite file, None when it has none (PostgreSQL, an
        in-memory database: see `sqlite_writer_connector`)."""
        connect = sqlite_writer_connector(engine)
        return None if connect is None else cls(connect, pragmas=pragmas, thread_name=thread_name)

    async def run(self, work: Callable[[sa.Connection], Result]) -> Result:
        """Run `work` in a write transaction, with whatever else queued meanwhile; its result,
        or the error that failed it (nothing of it is then kept)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        queued = _Queued(work)
        self._queue.append(queued)
        try:
            async with self._lock:
                if queued.future is None:  # else an earlier transaction took it along
                    batch, self._queue = self._queue, []
                    future = self._executor.submit(self._transaction, batch)
                    for item in batch:
                        item.future = future
                    # Shielded: a cancelled caller must not cancel the transaction of others.
                    await asyncio.shield(asyncio.wrap_future(future))
        finally:
            if queued.future is None and queued in self._queue:  # cancelled while queued
                self._queue.remove(queued)
        assert queued.future is not None
        if not queued.future.done():  # its transaction's caller was cancelled: wait for it
            await asyncio.shield(asyncio.wrap_future(queued.future))
        if queued.error is not None:
            raise queued.error
        return cast(Result, queued.result)

    async def close(self) -> None:
        """Close the connection (after the transaction under way) and let the thread go.
        Idempotent; the writer takes no work after it."""
        loop = asyncio.get_running_loop()
        with contextlib.suppress(RuntimeError):  # already shut down
            await loop.run_in_executor(self._executor, self._discard)
        self._executor.shutdown(wait=False)

    # -- on the writer's thread ----------------------------------------------------------------

    def _transaction(self, batch: list[_Queued[Any]]) -> None:
        try:
            self._attempt(batch)
        except Exception as error:
            if len(batch) > 1 and row_specific_error(error):
                self._one_by_one(batch)
            else:
                for item in batch:
                    item.error = error
        except BaseException as error:
            for item in batch:
                item.error = error
            raise

    def _one_by_one(self, batch: list[_Queued[Any]]) -> None:
        for index, item in enumerate(batch):
            try:
                self._attempt([item])
            except Exception as error:
                item.error = error
                if not row_specific_error(error):  # the database's: the rest would fail alike
                    for rest in batch[index + 1 :]:
                        rest.error = error
                    return

    def _attempt(self, batch: list[_Queued[Any]]) -> None:
        """Run the batch's works in one transaction; set their results, or raise."""
        try:
            connection = self._connection
            if connection is None:
                connection = self._connection = self._engine.connect()
                self.connections_opened += 1
            with connection.begin():
                results = [item.work(connection) for item in batch]
        except sqlite3.Error as error:  # raised by a work through the driver's connection
            wrapped = sa_exc.DBAPIError.instance(
                None, None, error, sqlite3.Error, hide_parameters=True
            )
            self._failed(wrapped)
            raise wrapped from error
        except Exception as error:
            self._failed(error)
            raise
        self.transactions += 1
        for item, result in zip(batch, results, strict=True):
            item.result = result

    def _failed(self, error: Exception) -> None:
        if not row_specific_error(error):
            self._discard()  # a new connection for the next transaction

    def _discard(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.close()
