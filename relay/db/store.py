"""The receiver's store: the group of webhooks written in one transaction, the write probe of
readiness, and the few reads of the receiver and of `check`.

The upsert's SQL for each database is `relay/db/outbox_insert.py`; the drainer's statements are
`relay/db/delivery.py`. On a SQLite file every write goes through the file's writer
(`relay/db/sqlite_writer.py`); elsewhere through the async engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine

from relay.db.engine import writer
from relay.db.errors import error_message, row_specific_error, sqlstate
from relay.db.notify import notify_statement
from relay.db.outbox_insert import (
    IncomingEvent,
    OutboxInsert,
    Outcomes,
    new_pending_rows,
    outcomes_by_key,
)
from relay.db.sqlite_writer import SqliteWriter
from relay.db.tables import outbox

# What the receiver takes from here: the store, its rows, and how a failed write is judged.
__all__ = ["IncomingEvent", "OutboxStore", "SchemaState", "StoredEvent", "row_specific_error"]


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


class OutboxStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._writer = writer(engine)
        self.dialect = engine.dialect.name
        self._insert = OutboxInsert(self.dialect)
        self._sqlite_writer: SqliteWriter | None = None
        self._sqlite_writer_checked = False

    async def insert_events(self, events: Sequence[IncomingEvent]) -> list[StoredEvent]:
        """Write a group of webhooks in one transaction (group commit); one result per input.

        Copies of one event within the group become one row whose `received_count` counts
        them all. An event already in the outbox only gains `received_count` and
        `last_received_at`. An event is new exactly when the count after the write equals the
        number of copies written here, which also holds when another receiver races us on
        PostgreSQL (the upsert holds the row's lock until our commit, so the count read back in
        the same transaction is ours).

        On a SQLite file the transaction runs on the file's writer thread (`SqliteWriter`); on
        PostgreSQL it is one `INSERT ... SELECT ... FROM unnest(...) RETURNING`, then one
        NOTIFY if new rows are to be delivered (`relay/db/notify.py`).
        """
        if not events:
            return []
        copies: dict[str, int] = {}
        first: dict[str, IncomingEvent] = {}
        for item in events:
            copies[item.dedup_key] = copies.get(item.dedup_key, 0) + 1
            first.setdefault(item.dedup_key, item)
        to_row = self._insert.row
        written_at = self._insert.written_at()
        rows = [to_row(item, copies[key], written_at) for key, item in first.items()]
        sqlite_writer = self._sqlite_batch_writer()
        if sqlite_writer is not None:
            returned = await sqlite_writer.run(self._insert.sqlite_work(rows))
        else:
            returned = await self._write_with_engine(rows)
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

    async def _write_with_engine(self, rows: list[tuple[Any, ...]]) -> Outcomes:
        if self.dialect != "postgresql":
            return await self._write_batch(rows)
        # Two receivers writing the same events at once (Aircall's retries, two webhooks with
        # the same events) can deadlock when their batches hold two such events in opposite
        # orders (the rows keep their order of receipt: it gives their receipt ids). PostgreSQL
        # then rolls one transaction back; it is run again, and the upsert now sees the other's
        # rows. (Before migration 0004, the unique index on message_id, which ON CONFLICT does
        # not arbitrate, could also fail such a race with a unique violation.)
        for attempt in range(1, _RACE_ATTEMPTS + 1):
            try:
                return await self._write_batch(rows)
            except sa_exc.DBAPIError as error:
                if attempt == _RACE_ATTEMPTS or sqlstate(error) not in _RACE_SQLSTATES:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _write_batch(self, rows: list[tuple[Any, ...]]) -> Outcomes:
        insert = self._insert
        async with self._writer.begin() as connection:
            if insert.postgresql:
                parameters = insert.postgres_parameters(rows)
                result: Sequence[Any] = (
                    await connection.exec_driver_sql(insert.sql, parameters)
                ).all()
                # Wake the drainers: one NOTIFY per commit that holds new rows to deliver, in
                # the transaction, so PostgreSQL delivers it only if the commit succeeds.
                new_rows = new_pending_rows(rows, result)
                if new_rows:
                    sql, notify_parameters = notify_statement(new_rows)
                    await connection.exec_driver_sql(sql, notify_parameters)
            else:
                result = await insert.write_sqlite_async(connection, rows)
            return outcomes_by_key(result)

    def _sqlite_batch_writer(self) -> SqliteWriter | None:
        """The SQLite file's writer (None elsewhere)."""
        if not self._sqlite_writer_checked:
            self._sqlite_writer_checked = True
            self._sqlite_writer = SqliteWriter.for_engine(self.engine, thread_name="outbox-writer")
        return self._sqlite_writer

    async def probe_write(self) -> None:
        """Commit a write that changes nothing (the schema's version row rewritten with its own
        value), through the connection webhooks are written with; raise what makes it fail
        (locked, read-only, full, unreachable, no schema). For readiness, when no webhook has
        shown whether writes work."""
        sqlite_writer = self._sqlite_batch_writer()
        if sqlite_writer is not None:
            await sqlite_writer.run(_probe)
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


# PostgreSQL errors of a receiver racing another on the same event: deadlock_detected, and
# unique_violation, which only the unique index on message_id that migration 0004 drops could
# raise (kept for a receiver started before `migrate` has run). Both roll the whole
# transaction back; running it again is safe.
_RACE_SQLSTATES: Final = frozenset({"23505", "40P01"})
_RACE_ATTEMPTS: Final = 3
_PROBE_SQL: Final = "UPDATE alembic_version SET version_num = version_num"


def _probe(connection: sa.Connection) -> None:
    connection.exec_driver_sql(_PROBE_SQL)
