"""The SQLite writer (`relay/db/sqlite_writer.py`), the one way the receiver and the drainer write
a SQLite file: group commit, `BEGIN IMMEDIATE` and the busy timeout, one work's bad row, errors
of the database and the connection opened again after them, cancellation, close.

On a real file, with a table of its own (the receiver's and the drainer's statements through
it are `test_store_contract.py` and `test_delivery_store.py`)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from relay.db.engine import create_engine
from relay.db.errors import row_specific_error
from relay.db.sqlite_writer import SqliteWriter, driver_connection

pytestmark = pytest.mark.anyio


@pytest.fixture
def path(tmp_path: Path) -> Path:
    path = tmp_path / "writer.sqlite3"
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT CHECK (v != 'bad'))")
    connection.close()
    return path


@pytest.fixture
async def writer(path: Path) -> AsyncIterator[SqliteWriter]:
    engine = create_engine(f"sqlite+aiosqlite:///{path}", timeout_seconds=0.2)
    made = SqliteWriter.for_engine(engine, pragmas=("PRAGMA cache_size=-4096",))
    assert made is not None
    yield made
    await made.close()
    await engine.dispose()


def insert(value: str) -> Callable[[sa.Connection], int]:
    def work(connection: sa.Connection) -> int:
        result = connection.execute(sa.text("INSERT INTO t (v) VALUES (:v)"), {"v": value})
        return int(result.lastrowid)

    return work


def stored(path: Path) -> list[str]:
    with sqlite3.connect(path) as connection:
        values = [row[0] for row in connection.execute("SELECT v FROM t ORDER BY id")]
    connection.close()
    return values


def blocking(
    started: threading.Event, release: threading.Event, value: str = "first"
) -> Callable[[Any], str]:
    """A work that writes `value`, then waits in its transaction until `release` is set."""

    def work(connection: sa.Connection) -> str:
        connection.execute(sa.text("INSERT INTO t (v) VALUES (:v)"), {"v": value})
        started.set()
        release.wait(10)
        return value

    return work


async def test_a_work_runs_in_a_transaction_and_returns_its_result(
    writer: SqliteWriter, path: Path
) -> None:
    assert await writer.run(insert("a")) == 1
    assert stored(path) == ["a"]
    assert writer.transactions == 1


async def test_works_queued_while_a_transaction_runs_share_the_next_one(
    writer: SqliteWriter, path: Path
) -> None:
    started, release = threading.Event(), threading.Event()
    results: dict[str, Any] = {}

    async def run(name: str, work: Callable[[sa.Connection], Any]) -> None:
        results[name] = await writer.run(work)

    async with anyio.create_task_group() as group:
        group.start_soon(run, "first", blocking(started, release))
        await anyio.to_thread.run_sync(started.wait, 10)
        for value in ("b", "c", "d"):
            group.start_soon(run, value, insert(value))
        await anyio.sleep(0.05)  # all three queued behind the first transaction
        release.set()
    assert results == {"first": "first", "b": 2, "c": 3, "d": 4}
    assert stored(path) == ["first", "b", "c", "d"]
    assert writer.transactions == 2  # the three shared one commit


async def test_the_transaction_takes_the_write_lock_when_it_begins(
    writer: SqliteWriter, path: Path
) -> None:
    """BEGIN IMMEDIATE: another writer is kept out from the start, even before a write."""
    inside, release = threading.Event(), threading.Event()

    def read_only_work(connection: sa.Connection) -> None:
        connection.execute(sa.text("SELECT count(*) FROM t")).all()
        inside.set()
        release.wait(10)

    async with anyio.create_task_group() as group:
        group.start_soon(writer.run, read_only_work)
        await anyio.to_thread.run_sync(inside.wait, 10)
        other = sqlite3.connect(path, timeout=0, isolation_level=None)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
        other.close()
        release.set()


async def test_a_lock_held_past_the_busy_timeout_fails_the_work_and_replaces_the_connection(
    writer: SqliteWriter, path: Path
) -> None:
    await writer.run(insert("a"))
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(OperationalError, match="locked") as locked:
            await writer.run(insert("b"))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert not row_specific_error(locked.value)
    assert await writer.run(insert("c")) == 2
    assert writer.connections_opened == 2
    assert stored(path) == ["a", "c"]


async def behind_a_transaction(
    writer: SqliteWriter, works: list[tuple[str, Callable[[sa.Connection], Any]]]
) -> dict[str, Any]:
    """Queue `works`, in order, while a first transaction (writing "first") runs, so that they
    share the next one; each one's result, or the error it got."""
    started, release = threading.Event(), threading.Event()
    outcomes: dict[str, Any] = {}

    async def run(name: str, work: Callable[[sa.Connection], Any]) -> None:
        try:
            outcomes[name] = await writer.run(work)
        except Exception as error:
            outcomes[name] = error

    async with anyio.create_task_group() as group:
        group.start_soon(run, "first", blocking(started, release))
        await anyio.to_thread.run_sync(started.wait, 10)
        for name, work in works:
            group.start_soon(run, name, work)
            await anyio.sleep(0.02)
        release.set()
    return outcomes


async def test_a_bad_row_fails_only_its_own_work_of_a_shared_transaction(
    writer: SqliteWriter, path: Path
) -> None:
    outcomes = await behind_a_transaction(
        writer, [(value, insert(value)) for value in ("b", "bad", "d")]
    )
    assert isinstance(outcomes["bad"], IntegrityError)
    assert row_specific_error(outcomes["bad"])
    assert (outcomes["b"], outcomes["d"]) == (2, 3)
    assert stored(path) == ["first", "b", "d"]
    assert writer.transactions == 3  # "first", then "b" and "d" each alone
    assert writer.connections_opened == 1  # an error of a row keeps the connection


async def test_the_work_by_work_pass_stops_at_an_error_of_the_database(
    writer: SqliteWriter, path: Path
) -> None:
    def missing_table(connection: sa.Connection) -> None:
        connection.execute(sa.text("INSERT INTO missing (v) VALUES (1)"))

    outcomes = await behind_a_transaction(
        writer,
        [("bad", insert("bad")), ("missing", missing_table), ("after", insert("after"))],
    )
    assert isinstance(outcomes["bad"], IntegrityError)
    assert isinstance(outcomes["missing"], OperationalError)
    assert outcomes["after"] is outcomes["missing"]  # not attempted: it would fail alike
    assert stored(path) == ["first"]


async def test_an_error_of_the_database_fails_every_work_and_a_new_connection_writes_again(
    writer: SqliteWriter, path: Path
) -> None:
    """The recovery of a database read-only for a while: the connection that failed is closed
    and the next transaction opens one that can write (here the first is made read-only by
    `query_only`, which only that connection has)."""

    def make_read_only(connection: sa.Connection) -> None:
        driver_connection(connection).execute("PRAGMA query_only=1")

    await writer.run(make_read_only)
    with pytest.raises(OperationalError, match="readonly") as refused:
        await writer.run(insert("a"))
    assert not row_specific_error(refused.value)
    assert await writer.run(insert("b")) == 1
    assert writer.connections_opened == 2
    assert stored(path) == ["b"]


async def test_driver_errors_are_sqlalchemys_and_never_show_the_parameters(
    writer: SqliteWriter,
) -> None:
    secret = "payload-with-personal-data"

    def raw_insert(connection: sa.Connection) -> None:
        driver_connection(connection).execute("INSERT INTO missing (v) VALUES (?)", (secret,))

    with pytest.raises(DBAPIError) as failed:
        await writer.run(raw_insert)
    assert isinstance(failed.value.orig, sqlite3.OperationalError)
    assert secret not in str(failed.value)

    def statement(connection: sa.Connection) -> None:
        connection.execute(sa.text("INSERT INTO missing (v) VALUES (:v)"), {"v": secret})

    with pytest.raises(DBAPIError) as failed_too:
        await writer.run(statement)
    assert secret not in str(failed_too.value)


async def test_the_pragmas_apply_to_every_connection(writer: SqliteWriter) -> None:
    def settings(connection: sa.Connection) -> tuple[Any, ...]:
        raw = driver_connection(connection)
        return (
            raw.execute("PRAGMA cache_size").fetchone()[0],
            raw.execute("PRAGMA journal_mode").fetchone()[0],
            raw.execute("PRAGMA synchronous").fetchone()[0],
            raw.execute("PRAGMA busy_timeout").fetchone()[0],
        )

    assert await writer.run(settings) == (-4096, "wal", 2, 200)


async def test_a_work_cancelled_while_queued_never_runs(writer: SqliteWriter, path: Path) -> None:
    started, release = threading.Event(), threading.Event()
    async with anyio.create_task_group() as group:
        group.start_soon(writer.run, blocking(started, release))
        await anyio.to_thread.run_sync(started.wait, 10)
        with anyio.move_on_after(0.05):
            await writer.run(insert("cancelled"))
        release.set()
    await writer.run(insert("later"))
    assert stored(path) == ["first", "later"]


async def test_a_cancelled_caller_leaves_the_works_taken_along_to_finish(
    writer: SqliteWriter, path: Path
) -> None:
    """The caller whose turn began a transaction is cancelled while it runs: the transaction
    goes on to its end, and a work it took along gets its result."""
    first_started, first_release = threading.Event(), threading.Event()
    a_started, a_release = threading.Event(), threading.Event()
    a_scope = anyio.CancelScope()
    results: list[Any] = []

    async def a_caller() -> None:
        with a_scope:
            await writer.run(blocking(a_started, a_release, "a"))

    async def b_caller() -> None:
        results.append(await writer.run(insert("b")))

    async with anyio.create_task_group() as group:
        group.start_soon(writer.run, blocking(first_started, first_release))
        await anyio.to_thread.run_sync(first_started.wait, 10)
        group.start_soon(a_caller)
        await anyio.sleep(0.02)
        group.start_soon(b_caller)
        await anyio.sleep(0.02)
        first_release.set()  # "a" and "b" go in the next transaction, begun by a's caller
        await anyio.to_thread.run_sync(a_started.wait, 10)
        a_scope.cancel()
        await anyio.sleep(0.02)
        assert results == []
        a_release.set()
    assert a_scope.cancelled_caught
    assert results == [3]
    assert stored(path) == ["first", "a", "b"]


async def test_close_closes_the_connection_and_is_idempotent(writer: SqliteWriter) -> None:
    await writer.run(insert("a"))
    await writer.close()
    await writer.close()
    assert writer._connection is None
