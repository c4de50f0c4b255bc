"""Copying a whole outbox from one database to another (SQLite to PostgreSQL when one VM is no
longer enough), ids, statuses and request records included.

The target must be migrated and empty: copying never merges two outboxes. Rows are copied in
batches ordered by id, each batch in its own transaction; on PostgreSQL the id sequence is then
moved past the largest copied id, so new receipts keep increasing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from relay.db.engine import writer
from relay.db.tables import delivery_requests, outbox


class TransferError(RuntimeError):
    """The copy cannot start (target not empty)."""


@dataclass(frozen=True, slots=True)
class CopyResult:
    outbox_rows: int
    delivery_requests: int


async def copy_outbox(
    source: AsyncEngine, target: AsyncEngine, batch_size: int = 1000
) -> CopyResult:
    async with target.connect() as connection:
        existing = await connection.scalar(sa.select(sa.func.count()).select_from(outbox))
    if existing:
        raise TransferError(
            f"the target outbox already holds {existing} rows; copy only into an empty, migrated "
            "database"
        )
    rows = await _copy_table(source, target, outbox, outbox.c.id, batch_size)
    requests = await _copy_table(
        source, target, delivery_requests, delivery_requests.c.id, batch_size
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


async def _copy_table(
    source: AsyncEngine,
    target: AsyncEngine,
    table: sa.Table,
    key: sa.Column[Any],
    batch_size: int,
) -> int:
    """Copy `table` in batches ordered by its unique `key`, each batch read after the last key
    copied (keyset paging: every row exactly once, and each read as cheap as the first, where an
    OFFSET would re-read every row before it)."""
    copied = 0
    last: Any = None
    while True:
        query = sa.select(table).order_by(key).limit(batch_size)
        if last is not None:
            query = query.where(key > last)
        async with source.connect() as connection:
            batch = [dict(row._mapping) for row in await connection.execute(query)]
        if not batch:
            return copied
        async with writer(target).begin() as connection:
            await connection.execute(sa.insert(table), batch)
        copied += len(batch)
        last = batch[-1][key.name]
