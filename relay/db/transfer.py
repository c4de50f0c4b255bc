"""Copying a whole outbox from one database to another (SQLite to PostgreSQL when one VM is no
longer enough), ids, statuses and request records included.

The target must be migrated and empty: copying never merges two outboxes. Rows are copied in
batches ordered by id, each batch in its own transaction; on PostgreSQL the id sequence is then
moved past the largest copied id, so new receipts keep increasing. Payloads travel as the JSON
text stored, never parsed: every row is copied byte for byte, however deeply it nests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from relay.db.engine import writer
from relay.db.tables import delivery_requests, outbox
from relay.progress import ProgressCallback


class TransferError(RuntimeError):
    """The copy cannot start (target not empty)."""


@dataclass(frozen=True, slots=True)
class CopyResult:
    outbox_rows: int
    delivery_requests: int


async def copy_outbox(
    source: AsyncEngine,
    target: AsyncEngine,
    batch_size: int = 1000,
    progress: ProgressCallback | None = None,
) -> CopyResult:
    """Copy every row; `progress` hears ("outbox rows" or "delivery requests", copied, total)
    before the first batch of each table and after every batch."""
    existing = await _count(target, outbox)
    if existing:
        raise TransferError(
            f"the target outbox already holds {existing} rows; copy only into an empty, migrated "
            "database"
        )
    rows = await _copy_table(source, target, outbox, batch_size, progress, "outbox rows")
    requests = await _copy_table(
        source, target, delivery_requests, batch_size, progress, "delivery requests"
    )
    if target.dialect.name == "postgresql" and rows:
        async with writer(target).begin() as connection:
            await connection.execute(
                sa.text(
                    "SELECT setval(pg_get_serial_sequence('outbox', 'id'), "
                    "(SELECT max(id) FROM outbox))"
                )
            )
    return CopyResult(outbox_rows=rows, delivery_requests=requests)


async def _count(engine: AsyncEngine, table: sa.Table) -> int:
    async with engine.connect() as connection:
        return int(await connection.scalar(sa.select(sa.func.count()).select_from(table)) or 0)


async def _copy_table(
    source: AsyncEngine,
    target: AsyncEngine,
    table: sa.Table,
    batch_size: int,
    progress: ProgressCallback | None,
    what: str,
) -> int:
    """Copy `table` in batches ordered by its primary key, each batch read after the last key
    copied (keyset paging: every row exactly once, and each read as cheap as the first, where an
    OFFSET would re-read every row before it)."""
    key = table.c.id
    read, write = _statements(table, target.dialect.name)
    total = await _count(source, table) if progress is not None else None
    copied = 0
    last: Any = None
    while True:
        if progress is not None:
            progress(what, copied, total)
        query = read.limit(batch_size)
        if last is not None:
            query = query.where(key > last)
        async with source.connect() as connection:
            batch = [dict(row._mapping) for row in await connection.execute(query)]
        if not batch:
            return copied
        async with writer(target).begin() as connection:
            await connection.execute(write, batch)
        copied += len(batch)
        last = batch[-1][key.name]


def _statements(table: sa.Table, target_dialect: str) -> tuple[sa.Select[Any], sa.Insert]:
    """The read and the write of a copy. The outbox's payload is read as its stored text and
    written as that text (PostgreSQL: cast to `json`, which checks it), never parsed: parsing
    would meet Python's recursion limit on a deeply nested payload, and re-encoding would
    change how it is spelt."""
    if table is not outbox:
        return sa.select(table).order_by(table.c.id), sa.insert(table)
    payload_text = sa.cast(outbox.c.payload, sa.Text()).label("payload_text")
    columns = [payload_text if column.name == "payload" else column for column in outbox.c]
    value: Any = sa.bindparam("payload_text", type_=sa.Text())
    if target_dialect != "sqlite":
        value = sa.cast(value, outbox.c.payload.type)
    return sa.select(*columns).order_by(outbox.c.id), sa.insert(outbox).values(payload=value)
