"""The receiver's upsert of a group of webhooks: its SQL and its values, for each database.

The statement is written here once per dialect, from one list of columns (`_WRITTEN_COLUMNS`),
and is where SQLite and PostgreSQL differ for the receiver:

- **SQLite**: the one-row `INSERT ... ON CONFLICT (dedup_key) DO UPDATE`, run by
  `executemany` for the group on the writer's `sqlite3` connection, then one `SELECT` of the
  rows' outcomes (id, received count, status). Receipt times are this process's clock (the
  database's: one host).
- **PostgreSQL**: one statement for the whole group, `INSERT ... SELECT ... FROM unnest(...)`:
  one array parameter per column, the same text whatever the group's size (asyncpg prepares it
  once), `RETURNING` the rows' outcomes. A receipt time given as NULL (the receiver's case) is
  the server's `now()`, the start of the transaction: `received_at`, `last_received_at`, and
  `next_attempt_at` of a `pending` row.

A row is one tuple built by `row()`, converted as SQLAlchemy's type processors would store it
(`tests/unit/test_store_rows.py` checks the SQLite timestamps against them); the payload is
written by `aircall.payload_json` (compact JSON through orjson). No per-row work of SQLAlchemy's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from relay.aircall import payload_json
from relay.db.sqlite_writer import driver_connection
from relay.db.tables import outbox


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


# The columns the upsert writes, in the order of a row's values.
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
_DEDUP_KEY: Final = _WRITTEN_COLUMNS.index("dedup_key")
_RECEIVED_COUNT: Final = _WRITTEN_COLUMNS.index("received_count")
_ON_CONFLICT: Final = (
    "ON CONFLICT (dedup_key) DO UPDATE SET"
    " received_count = outbox.received_count + excluded.received_count,"
    " last_received_at = excluded.last_received_at"
)
_OUTCOME_COLUMNS: Final = "id, dedup_key, received_count, status"
# On PostgreSQL, what each column is made of (`v.<name>`: its array's element).
_POSTGRES_VALUES: Final[dict[str, str]] = {
    "received_at": "COALESCE(v.received_at, now())",
    "last_received_at": "COALESCE(v.last_received_at, now())",
    "next_attempt_at": "CASE WHEN v.status = 'pending' THEN COALESCE(v.next_attempt_at, now()) END",
    "payload": "v.payload::JSON",  # carried as text: the JSON text as written, kept as is
}

# (id, dedup_key, received_count, status) by dedup key.
Outcomes = dict[str, tuple[int, int, str]]


def _sqlite_upsert() -> str:
    columns = ", ".join(_WRITTEN_COLUMNS)
    marks = ", ".join("?" * len(_WRITTEN_COLUMNS))
    return f"INSERT INTO outbox ({columns}) VALUES ({marks}) {_ON_CONFLICT}"


def _postgres_upsert() -> str:
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    arrays = []
    for number, name in enumerate(_WRITTEN_COLUMNS, start=1):
        kind = outbox.c[name].type.compile(dialect=dialect)
        arrays.append(f"${number}::{'TEXT' if kind == 'JSON' else kind}[]")
    columns = ", ".join(_WRITTEN_COLUMNS)
    values = ", ".join(_POSTGRES_VALUES.get(name, f"v.{name}") for name in _WRITTEN_COLUMNS)
    return (
        f"INSERT INTO outbox ({columns}) SELECT {values}"
        f" FROM unnest({', '.join(arrays)}) WITH ORDINALITY AS v({columns}, position)"
        f" ORDER BY v.position {_ON_CONFLICT} RETURNING {_OUTCOME_COLUMNS}"
    )


class OutboxInsert:
    """The upsert for one dialect (`sqlite` or `postgresql`)."""

    def __init__(self, dialect_name: str) -> None:
        self.dialect_name = dialect_name
        self.postgresql = dialect_name == "postgresql"
        self.sql = _postgres_upsert() if self.postgresql else _sqlite_upsert()
        self._moment: Callable[[datetime], Any] = (
            _postgres_moment if self.postgresql else sqlite_moment
        )
        self._not_late: Any = False if self.postgresql else 0
        self._select_sql: dict[int, str] = {}

    def written_at(self) -> datetime | None:
        """The receipt time of the events written now without one: on SQLite this process's
        clock; on PostgreSQL None, which the statement replaces with the server's `now()`."""
        return None if self.postgresql else datetime.now(UTC)

    def row(self, item: IncomingEvent, copies: int, written_at: datetime | None) -> tuple[Any, ...]:
        """The values of one event, converted for the driver
        (`written_at`: its receipt time if it has none)."""
        received = item.received_at if item.received_at is not None else written_at
        received_at = None if received is None else self._moment(received)
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

    # -- SQLite ----------------------------------------------------------------------------------

    def sqlite_work(self, rows: list[tuple[Any, ...]]) -> Callable[[sa.Connection], Outcomes]:
        """The group's transaction body for the SQLite writer (`SqliteWriter.run`)."""

        def work(connection: sa.Connection) -> Outcomes:
            raw = driver_connection(connection)
            raw.executemany(self.sql, rows)
            select, keys = self.select_outcomes([row[_DEDUP_KEY] for row in rows])
            return outcomes_by_key(raw.execute(select, keys))

        return work

    async def write_sqlite_async(
        self, connection: Any, rows: list[tuple[Any, ...]]
    ) -> Sequence[Any]:
        """The same through an async SQLAlchemy connection (a SQLite database without a file
        of its own: in memory, or a URL with options)."""
        await connection.exec_driver_sql(self.sql, rows)
        select, keys = self.select_outcomes([row[_DEDUP_KEY] for row in rows])
        return list((await connection.exec_driver_sql(select, keys)).all())

    def select_outcomes(self, keys: list[str]) -> tuple[str, tuple[str, ...]]:
        """SQLite: SQL and parameters reading back the outcomes of `keys`."""
        sql = self._select_sql.get(len(keys))
        if sql is None:
            marks = ", ".join("?" * len(keys))
            sql = f"SELECT {_OUTCOME_COLUMNS} FROM outbox WHERE dedup_key IN ({marks})"
            self._select_sql[len(keys)] = sql
        return sql, tuple(keys)

    # -- PostgreSQL ------------------------------------------------------------------------------

    def postgres_parameters(self, rows: list[tuple[Any, ...]]) -> tuple[list[Any], ...]:
        """The statement's parameters: one array per column."""
        return tuple(list(column) for column in zip(*rows, strict=True))


def outcomes_by_key(returned: Iterable[Any]) -> Outcomes:
    """The upsert's outcomes by dedup key, from the rows it returned (or the SQLite `SELECT` of
    them read back): each (id, dedup_key, received_count, status), `_OUTCOME_COLUMNS`."""
    return {key: (row_id, count, status) for row_id, key, count, status in returned}


def new_pending_rows(rows: list[tuple[Any, ...]], returned: Sequence[Any]) -> int:
    """How many of the upsert's rows are new and `pending` (each `returned` row is (id,
    dedup_key, received_count, status)); duplicates and skipped events need no drainer."""
    copies = {row[_DEDUP_KEY]: row[_RECEIVED_COUNT] for row in rows}
    return sum(
        1 for _, key, count, status in returned if status == "pending" and count == copies[key]
    )


def sqlite_moment(value: datetime) -> str:
    """An aware datetime as SQLite's DATETIME text in UTC: `2026-03-10 12:07:48.000005`."""
    if value.tzinfo is None:
        raise ValueError("naive datetime given where an aware UTC one is needed")
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


def _postgres_moment(value: datetime) -> datetime:
    """An aware datetime in UTC, as `UtcDateTime` gives asyncpg."""
    if value.tzinfo is None:
        raise ValueError("naive datetime given where an aware UTC one is needed")
    return value.astimezone(UTC)
