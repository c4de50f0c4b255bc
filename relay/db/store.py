"""The outbox store: every SQL statement the relay runs, one named method each.

Receiver and drainer talk to the database only through this class. Dialect differences (SQLite
and PostgreSQL) are handled here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine

from relay.aircall import payload_json
from relay.db.engine import sqlite_writer_connector, writer
from relay.db.notify import notify_statement
from relay.db.tables import outbox
from relay.logs import REDACTED


@dataclass(frozen=True, slots=True)
class IncomingEvent:
    """A webhook accepted by the receiver, ready to be written.

    `received_at` None (the receiver's case): the moment the group commit writes it, on the
    database's clock (PostgreSQL's `now()`, the start of the write's transaction; on SQLite,
    the writing process's clock, which is the database's: one host). A given moment is kept
    (tools and tests that write events received earlier).
    """

    dedup_key: str
    message_id: str
    source: str
    resource: str
    event: str
    resource_id: str | None
    ordering_key: str
    occurred_at: datetime
    received_at: datetime | None
    payload: dict[str, Any]
    forward: bool
    skip_reason: str | None = None


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """What the database made of one incoming event."""

    id: int
    duplicate: bool
    status: str
    received_count: int


@dataclass(frozen=True, slots=True)
class SchemaState:
    reachable: bool
    revision: str | None
    error: str | None = None  # why the database did not answer, its password redacted


def error_message(error: BaseException, password: str | None = None) -> str:
    """What an operator needs of a database error, on one line: the driver's own message
    (`database "x" does not exist`), without SQLAlchemy's wrapping (class, statement, link),
    and with `password` (the URL's) replaced wherever it appears."""
    cause = error.orig if isinstance(error, sa_exc.DBAPIError) else None
    if cause is not None and str(cause):
        text = str(cause)
    else:
        text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    if password:
        text = text.replace(password, REDACTED)
    return " ".join(text.split())


class OutboxStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._writer = writer(engine)
        self.dialect = engine.dialect.name
        self._batch_insert = _BatchInsert(engine.dialect)
        self._sqlite_writer: _SqliteBatchWriter | None = None
        self._sqlite_writer_checked = False

    async def insert_events(self, events: Sequence[IncomingEvent]) -> list[StoredEvent]:
        """Write a group of webhooks in one transaction (group commit); one result per input.

        Copies of one event within the group become one row whose `received_count` counts
        them all. An event already in the outbox only gains `received_count` and
        `last_received_at`. An event is new exactly when the count after the write equals the
        number of copies written here, which also holds when another receiver races us on
        PostgreSQL (the upsert holds the row's lock until our commit, so the count read back in
        the same transaction is ours).

        The statement is compiled once (`_BatchInsert`). On a SQLite file the whole transaction
        (`executemany` of the upsert, then one SELECT of the rows' outcomes) runs in one call
        on a thread of its own (`_SqliteBatchWriter`); on PostgreSQL it is one
        multi-row `INSERT ... RETURNING`, then one NOTIFY if new rows are to be delivered
        (`relay/db/notify.py`).
        """
        copies: dict[str, int] = {}
        first: dict[str, IncomingEvent] = {}
        for item in events:
            copies[item.dedup_key] = copies.get(item.dedup_key, 0) + 1
            first.setdefault(item.dedup_key, item)
        to_row = self._batch_insert.row
        written_at = self._batch_insert.written_at()
        rows = [to_row(item, copies[key], written_at) for key, item in first.items()]
        keys = list(first)
        sqlite_writer = self._sqlite_batch_writer()
        if sqlite_writer is not None:
            returned = await sqlite_writer.write(self._batch_insert, rows, keys)
        else:
            returned = await self._write_with_engine(rows, keys)
        outcomes: list[StoredEvent] = []
        seen: set[str] = set()
        for item in events:
            key = item.dedup_key
            row_id, received_count, status = returned[key]
            duplicate = key in seen or received_count != copies[key]
            seen.add(key)
            outcomes.append(
                StoredEvent(
                    id=row_id, duplicate=duplicate, status=status, received_count=received_count
                )
            )
        return outcomes

    async def _write_with_engine(
        self, rows: list[tuple[Any, ...]], keys: list[str]
    ) -> dict[str, tuple[int, int, str]]:
        if self.dialect != "postgresql":
            return await self._write_batch(rows, keys)
        # Two receivers writing the same events at once (Aircall's retries, two webhooks with
        # the same events) can deadlock when their batches hold two such events in opposite
        # orders (the rows keep their order of receipt: it gives their receipt ids). PostgreSQL
        # then rolls one transaction back; it is run again, and the upsert now sees the other's
        # rows. (Before migration 0004, the unique index on message_id, which ON CONFLICT does
        # not arbitrate, could also fail such a race with a unique violation.)
        for attempt in range(1, _RACE_ATTEMPTS + 1):
            try:
                return await self._write_batch(rows, keys)
            except sa_exc.DBAPIError as error:
                if attempt == _RACE_ATTEMPTS or _sqlstate(error) not in _RACE_SQLSTATES:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _write_batch(
        self, rows: list[tuple[Any, ...]], keys: list[str]
    ) -> dict[str, tuple[int, int, str]]:
        statement = self._batch_insert
        async with self._writer.begin() as connection:
            if self.dialect == "postgresql":
                # One multi-row INSERT ... RETURNING: one statement for the server to plan and
                # run, one round trip (executemany would run one statement per row).
                sql = statement.insert_returning(len(rows))
                flat = tuple(value for row in rows for value in row)
                result: Sequence[Any] = (await connection.exec_driver_sql(sql, flat)).all()
                # Wake the drainers: one NOTIFY per commit that holds new rows to deliver, in
                # the transaction, so PostgreSQL delivers it only if the commit succeeds.
                new_rows = _new_pending_rows(rows, result)
                if new_rows:
                    sql, parameters = notify_statement(new_rows)
                    await connection.exec_driver_sql(sql, parameters)
            else:
                await connection.exec_driver_sql(statement.sql, rows)
                sql, parameters = statement.select_outcomes(keys)
                result = (await connection.exec_driver_sql(sql, parameters)).all()
            return {row[1]: (row[0], row[2], row[3]) for row in result}

    def _sqlite_batch_writer(self) -> _SqliteBatchWriter | None:
        """The SQLite file's batch writer (None elsewhere)."""
        if not self._sqlite_writer_checked:
            self._sqlite_writer_checked = True
            if self.dialect == "sqlite":
                self._sqlite_writer = _SqliteBatchWriter.for_engine(self.engine)
        return self._sqlite_writer

    async def probe_write(self) -> None:
        """Commit a write that changes nothing (the schema's version row rewritten with its own
        value), through the connection webhooks are written with; raise what makes it fail
        (locked, read-only, full, unreachable, no schema). For readiness, when no webhook has
        shown whether writes work."""
        sqlite_writer = self._sqlite_batch_writer()
        if sqlite_writer is not None:
            await sqlite_writer.probe()
            return
        async with self._writer.begin() as connection:
            await connection.exec_driver_sql(_PROBE_SQL)

    async def close_writer(self) -> None:
        """Close the connection that `insert_events` opened for itself, if any (idempotent)."""
        sqlite_writer, self._sqlite_writer = self._sqlite_writer, None
        self._sqlite_writer_checked = False
        if sqlite_writer is not None:
            await sqlite_writer.close()

    async def schema_state(self) -> SchemaState:
        """Whether the database answers, and the Alembic revision it is at."""
        try:
            async with self.engine.connect() as connection:
                has_table = await connection.run_sync(
                    lambda sync: sa.inspect(sync).has_table("alembic_version")
                )
                if not has_table:
                    return SchemaState(reachable=True, revision=None)
                revision = await connection.scalar(
                    sa.text("SELECT version_num FROM alembic_version")
                )
                return SchemaState(reachable=True, revision=revision)
        except Exception as error:  # readiness reports any failure, it never raises
            message = error_message(error, self.engine.url.password)
            return SchemaState(reachable=False, revision=None, error=message)

    async def get_event(self, event_id: int) -> dict[str, Any] | None:
        async with self.engine.connect() as connection:
            row = (
                await connection.execute(sa.select(outbox).where(outbox.c.id == event_id))
            ).first()
            return None if row is None else dict(row._mapping)

    async def count_events(self) -> int:
        async with self.engine.connect() as connection:
            return int(await connection.scalar(sa.select(sa.func.count()).select_from(outbox)) or 0)


# The columns `insert_events` writes, in the order of its statement's parameters.
_WRITTEN_COLUMNS: Final[tuple[str, ...]] = (
    "dedup_key",
    "message_id",
    "source",
    "resource",
    "event",
    "resource_id",
    "ordering_key",
    "occurred_at",
    "received_at",
    "last_received_at",
    "received_count",
    "payload",
    "status",
    "attempts",
    "next_attempt_at",
    "last_error",
    "late",
)
_CONVERTED_COLUMNS: Final[frozenset[str]] = frozenset(
    {"occurred_at", "received_at", "last_received_at", "next_attempt_at", "payload", "late"}
)
_NUMBERED_PARAMETER: Final = re.compile(r"\$(\d+)")
_DEDUP_KEY: Final = _WRITTEN_COLUMNS.index("dedup_key")
_RECEIVED_COUNT: Final = _WRITTEN_COLUMNS.index("received_count")


class _BatchInsert:
    """The receiver's upsert, compiled once for one dialect, with the conversions of its values.

    Through `connection.execute(statement, rows)`, SQLAlchemy would compile the statement for
    the batch and look up and apply each column's type processing for every row; here a row is
    one tuple built by one function, and the batch goes to the driver as is (`executemany` on
    SQLite, one multi-row statement on PostgreSQL). Timestamps and flags are converted by the
    same type processors SQLAlchemy uses (`UtcDateTime`, `Boolean`), so they are stored exactly
    as a plain `INSERT` through SQLAlchemy would store them; the payload is written by
    `aircall.payload_json` (compact JSON through orjson, the same value as `JSON`'s
    `json.dumps` would store, several times faster).
    """

    def __init__(self, dialect: Dialect) -> None:
        self.dialect_name = dialect.name
        insert = sqlite.insert if dialect.name == "sqlite" else postgresql.insert
        statement = insert(outbox).inline()  # no implicit RETURNING of the primary key
        statement = statement.on_conflict_do_update(
            index_elements=[outbox.c.dedup_key],
            set_={
                "received_count": outbox.c.received_count + statement.excluded.received_count,
                "last_received_at": statement.excluded.last_received_at,
            },
        )
        compiled = statement.compile(dialect=dialect, column_keys=list(_WRITTEN_COLUMNS))
        if tuple(compiled.positiontup or ()) != _WRITTEN_COLUMNS:  # pragma: no cover
            raise RuntimeError(f"unexpected parameter order: {compiled.positiontup}")
        self.sql = str(compiled)
        processors = {
            name: outbox.c[name].type.dialect_impl(dialect).bind_processor(dialect)
            for name in _WRITTEN_COLUMNS
        }
        unexpected = [
            name
            for name, processor in processors.items()
            if processor is not None and name not in _CONVERTED_COLUMNS
        ]
        if unexpected:  # pragma: no cover - a SQLAlchemy upgrade that converts more columns
            raise RuntimeError(f"columns {unexpected} need a conversion insert_events lacks")
        # Every moment is a UtcDateTime. On SQLite, its processors (UtcDateTime's, then the
        # dialect's DATETIME text) come down to one `isoformat`; checked against them here.
        self._moment = _or_identity(processors["received_at"])
        if dialect.name == "sqlite":
            probe = datetime(2026, 3, 10, 14, 7, 48, 5, tzinfo=timezone(timedelta(hours=2)))
            if _sqlite_moment(probe) != self._moment(probe):  # pragma: no cover - an upgrade
                raise RuntimeError("SQLite's DATETIME text is not what _sqlite_moment writes")
            self._moment = _sqlite_moment
        if dialect.name == "postgresql":
            self.sql = _received_by_the_database_clock(self.sql)
        self._flag = _or_identity(processors["late"])
        self._not_late = self._flag(False)
        self._select_sql: dict[int, str] = {}
        self._insert_returning: dict[int, str] = {}

    def written_at(self) -> datetime | None:
        """The receipt time of the events written now without one: on SQLite this process's
        clock (the database's: one host); on PostgreSQL None, which the statement replaces
        with the server's `now()`."""
        return None if self.dialect_name == "postgresql" else datetime.now(UTC)

    def row(self, item: IncomingEvent, copies: int, written_at: datetime | None) -> tuple[Any, ...]:
        """The statement's parameters for one event, converted for the driver (`written_at`:
        its receipt time if it has none)."""
        received = item.received_at
        received_at = self._moment(written_at if received is None else received)
        forward = item.forward
        return (
            item.dedup_key,
            item.message_id,
            item.source,
            item.resource,
            item.event,
            item.resource_id,
            item.ordering_key,
            self._moment(item.occurred_at),
            received_at,
            received_at,
            copies,
            payload_json(item.payload),
            "pending" if forward else "skipped",
            0,
            received_at if forward else None,
            None if forward else item.skip_reason,
            self._not_late,
        )

    def insert_returning(self, count: int) -> str:
        """PostgreSQL: the upsert of `count` rows in one statement, returning (id, dedup_key,
        received_count, status) of each; its parameters are the rows' values, row after row."""
        sql = self._insert_returning.get(count)
        if sql is None:
            head, rest = self.sql.split(" VALUES ", 1)
            group, tail = rest.split(") ON CONFLICT ", 1)
            width = len(_WRITTEN_COLUMNS)
            groups = ", ".join(_shift_parameters(group + ")", row * width) for row in range(count))
            sql = (
                f"{head} VALUES {groups} ON CONFLICT {tail}"
                " RETURNING outbox.id, outbox.dedup_key, outbox.received_count, outbox.status"
            )
            self._insert_returning[count] = sql
        return sql

    def select_outcomes(self, keys: list[str]) -> tuple[str, tuple[Any, ...]]:
        """SQL and parameters reading back (id, dedup_key, received_count, status) of `keys`."""
        columns = "SELECT id, dedup_key, received_count, status FROM outbox WHERE dedup_key"
        if self.dialect_name != "sqlite":
            return f"{columns} = ANY($1::VARCHAR[])", (keys,)
        sql = self._select_sql.get(len(keys))
        if sql is None:
            sql = f"{columns} IN ({', '.join('?' * len(keys))})"
            self._select_sql[len(keys)] = sql
        return sql, tuple(keys)


# PostgreSQL errors of a receiver racing another on the same event: deadlock_detected, and
# unique_violation, which only the unique index on message_id that migration 0004 drops could
# raise (kept for a receiver started before `migrate` has run). Both roll the whole
# transaction back; running it again is safe.
_RACE_SQLSTATES: Final = frozenset({"23505", "40P01"})
_RACE_ATTEMPTS: Final = 3


def _received_by_the_database_clock(sql: str) -> str:
    """PostgreSQL's upsert, where a receipt time given as NULL is the server's `now()` (the
    start of the transaction): `received_at`, `last_received_at`, and `next_attempt_at` of a
    `pending` row (new rows are due at once, and wait for the settle window)."""

    def parameter(column: str, kind: str = "TIMESTAMP WITH TIME ZONE") -> str:
        return f"${_WRITTEN_COLUMNS.index(column) + 1}::{kind}"

    replacements = {
        parameter(column): f"COALESCE({parameter(column)}, now())"
        for column in ("received_at", "last_received_at")
    }
    replacements[parameter("next_attempt_at")] = (
        f"CASE WHEN {parameter('status', 'VARCHAR')} = 'pending' "
        f"THEN COALESCE({parameter('next_attempt_at')}, now()) END"
    )
    head, values = sql.split(" VALUES ", 1)
    for old, new in replacements.items():
        if values.count(old + ",") != 1:  # pragma: no cover - a SQLAlchemy upgrade
            raise RuntimeError(f"unexpected upsert for PostgreSQL: {old} not found once")
        values = values.replace(old + ",", new + ",")
    return f"{head} VALUES {values}"


def _sqlstate(error: sa_exc.DBAPIError) -> str | None:
    code = getattr(error.orig, "sqlstate", None)
    return code if isinstance(code, str) else None


# Errors that concern the values of one row, not the database: SQLite's primary result codes
# CONSTRAINT (a constraint or a trigger's RAISE), TOOBIG and MISMATCH; PostgreSQL's SQLSTATE
# classes 22 (data exception: a NUL byte, a value too long for its column), 23 (integrity
# constraint violation), 54 (program limit exceeded: an index entry too large) and P0 (a
# PL/pgSQL RAISE). Anything else (locked, busy, read-only, full, I/O, connection, timeout, a
# missing table, an unknown error) is taken as the database's, for every row alike.
_SQLITE_ROW_CODES: Final = frozenset(
    {sqlite3.SQLITE_CONSTRAINT, sqlite3.SQLITE_TOOBIG, sqlite3.SQLITE_MISMATCH}
)
_POSTGRES_ROW_CLASSES: Final = frozenset({"22", "23", "54", "P0"})
_PROBE_SQL: Final = "UPDATE alembic_version SET version_num = version_num"


def row_specific_error(error: BaseException) -> bool:
    """Whether a failed write failed because of one row's values (another group of rows could
    succeed), rather than because of the database (every write fails alike)."""
    if isinstance(error, sa_exc.DBAPIError):
        if isinstance(error.orig, sqlite3.Error):
            return _sqlite_row_specific(error.orig)
        sqlstate = _sqlstate(error)
        return sqlstate is not None and sqlstate[:2] in _POSTGRES_ROW_CLASSES
    # A value that the driver cannot convert, raised before anything reached the database.
    return isinstance(error, ValueError)


def _sqlite_row_specific(error: sqlite3.Error) -> bool:
    code = getattr(error, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF in _SQLITE_ROW_CODES


def _new_pending_rows(rows: list[tuple[Any, ...]], returned: Sequence[Any]) -> int:
    """How many of the upsert's rows are new and `pending` (each `returned` row is (id,
    dedup_key, received_count, status)); duplicates and skipped events need no drainer."""
    copies = {row[_DEDUP_KEY]: row[_RECEIVED_COUNT] for row in rows}
    return sum(
        1 for _, key, count, status in returned if status == "pending" and count == copies[key]
    )


def _shift_parameters(sql: str, shift: int) -> str:
    """`$1` becomes `$(1 + shift)`, and so on: the same group of values, for a later row."""
    return _NUMBERED_PARAMETER.sub(lambda match: f"${int(match.group(1)) + shift}", sql)


def _sqlite_moment(value: datetime) -> str:
    """An aware datetime as SQLite's DATETIME text in UTC: `2026-03-10 12:07:48.000005`."""
    if value.tzinfo is None:
        raise ValueError("naive datetime given where an aware UTC one is needed")
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


def _or_identity(processor: Callable[[Any], Any] | None) -> Callable[[Any], Any]:
    return processor if processor is not None else _identity


def _identity(value: Any) -> Any:
    return value


class _SqliteBatchWriter:
    """Runs each batch's whole transaction in one call on a thread of its own, on a plain
    `sqlite3` connection set up like the engine's (`sqlite_writer_connector`).

    Through SQLAlchemy and aiosqlite, each step of a transaction (BEGIN, INSERT, SELECT, fetch,
    COMMIT, cursor handling) is a round trip between the event loop and aiosqlite's thread;
    here a batch is one round trip, and the thread spends its time in SQLite with the GIL
    released. The connection is opened on that thread at the first batch, and opened again
    after an error of the database (not after an error of one row's values: a constraint),
    which a database read-only for a while needs (relay/db/engine.py says why). Errors are
    raised as SQLAlchemy's `DBAPIError` family, as the engine's.
    """

    def __init__(self, connect: Callable[[], sqlite3.Connection]) -> None:
        self._connect = connect
        self._connection: sqlite3.Connection | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox-writer")

    @classmethod
    def for_engine(cls, engine: AsyncEngine) -> _SqliteBatchWriter | None:
        connect = sqlite_writer_connector(engine)
        return None if connect is None else cls(connect)

    async def write(
        self, statement: _BatchInsert, rows: list[tuple[Any, ...]], keys: list[str]
    ) -> dict[str, tuple[int, int, str]]:
        select_sql, parameters = statement.select_outcomes(keys)
        returned = await self._run([(statement.sql, rows), (select_sql, parameters)])
        return {key: (row_id, count, status) for row_id, key, count, status in returned}

    async def probe(self) -> None:
        await self._run([(_PROBE_SQL, ())])

    async def _run(self, steps: list[tuple[str, Any]]) -> list[Any]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._transaction, steps)

    def _transaction(self, steps: list[tuple[str, Any]]) -> list[Any]:
        """Run `steps` (statement, parameters; a list of parameter tuples for `executemany`)
        in one transaction begun with `BEGIN IMMEDIATE`, on the writer's thread; return the
        rows the last one read."""
        sql = "BEGIN IMMEDIATE"
        try:
            connection = self._connection
            if connection is None:
                connection = self._connection = self._connect()
            connection.execute(sql)
            try:
                returned: list[Any] = []
                for sql, parameters in steps:
                    if isinstance(parameters, list):
                        connection.executemany(sql, parameters)
                    else:
                        returned = connection.execute(sql, parameters).fetchall()
                sql = "COMMIT"
                connection.execute(sql)
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise
        except sqlite3.Error as error:
            if not _sqlite_row_specific(error):
                self._discard()  # a fresh connection for the next transaction
            raise sa_exc.DBAPIError.instance(
                sql, None, error, sqlite3.Error, hide_parameters=True
            ) from error
        return returned

    def _discard(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(sqlite3.Error):
                connection.close()

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._discard)
        self._executor.shutdown(wait=False)
