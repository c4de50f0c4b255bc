"""The outbox gauges the receiver's `/metrics` reads (`relay/db/gauges.py`), on SQLite and
PostgreSQL: counts by status, oldest undelivered receipt, calls awaiting `call.ended`, and on
SQLite the space of the database file's filesystem."""

from __future__ import annotations

import dataclasses
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from relay.db.engine import create_engine
from relay.db.gauges import OutboxGauges, read_outbox_gauges
from relay.db.store import OutboxStore
from tests.support import OutboxDatabase, incoming_event, sample

pytestmark = pytest.mark.anyio

NOW = datetime(2026, 3, 10, 15, 0, tzinfo=UTC)


def body(event: str, call_id: int) -> dict[str, object]:
    payload = sample(event)
    del payload["token"]
    payload["data"]["id"] = call_id
    return payload


async def test_an_empty_outbox(database: OutboxDatabase) -> None:
    engine = create_engine(database.url, timeout_seconds=2.0)
    try:
        gauges = await read_outbox_gauges(engine, NOW)
    finally:
        await engine.dispose()
    assert dataclasses.replace(gauges, filesystem=None) == OutboxGauges(0, 0, 0, None, 0)


async def test_the_sqlite_files_filesystem_and_none_on_postgresql(
    database: OutboxDatabase,
) -> None:
    engine = create_engine(database.url, timeout_seconds=2.0)
    try:
        gauges = await read_outbox_gauges(engine, NOW)
    finally:
        await engine.dispose()
    if engine.dialect.name != "sqlite":
        assert gauges.filesystem is None
        return
    assert gauges.filesystem is not None
    assert engine.url.database is not None
    space = os.statvfs(Path(engine.url.database).parent)
    assert gauges.filesystem.size_bytes == space.f_blocks * space.f_frsize
    # What is available moves with every write on the machine: within 64 MiB of it now.
    now_available = space.f_bavail * space.f_frsize
    assert abs(gauges.filesystem.avail_bytes - now_available) < 64 * 2**20
    assert 0 < gauges.filesystem.avail_bytes < gauges.filesystem.size_bytes


STATE_COLUMNS = {
    "pending": "",
    "delivering": ", claimed_by = 'test:1:a', claimed_until = received_at",
    "delivered": ", delivered_at = received_at",
    "dead": ", last_error = 'refused'",
    "skipped": ", last_error = 'filtered'",
}


async def test_counts_the_oldest_undelivered_and_calls_awaiting_call_ended(
    database: OutboxDatabase,
) -> None:
    minutes_ago = [30, 25, 20, 15, 10, 5, 1]
    events = [
        (body("call.created", 1), "delivered"),
        (body("call.hungup", 1), "delivered"),  # call 1: no call.ended -> awaiting
        (body("call.created", 2), "dead"),
        (body("call.hungup", 2), "delivering"),
        (body("call.ended", 2), "pending"),  # call 2 has its call.ended, even undelivered
        (body("call.hungup", 3), "pending"),  # call 3: hung up 5 min ago, within the timeout
        (body("call.tagged", 3), "skipped"),
    ]
    engine = create_engine(database.url, timeout_seconds=2.0)
    try:
        store = OutboxStore(engine)
        stored = await store.insert_events(
            [
                incoming_event(payload, NOW - timedelta(minutes=ago))
                for (payload, _), ago in zip(events, minutes_ago, strict=True)
            ]
        )
        await store.close_writer()
        async with engine.begin() as connection:
            for row, (_, status) in zip(stored, events, strict=True):
                # With what each state needs (migration 0006's constraints).
                await connection.execute(
                    sa.text(
                        f"UPDATE outbox SET status = :status{STATE_COLUMNS[status]} WHERE id = :id"
                    ),
                    {"status": status, "id": row.id},
                )
        gauges = await read_outbox_gauges(engine, awaiting_before=NOW - timedelta(minutes=10))
    finally:
        await engine.dispose()
    assert dataclasses.replace(gauges, filesystem=None) == OutboxGauges(
        pending=2,
        delivering=1,
        dead=1,
        oldest_undelivered_received_at=NOW - timedelta(minutes=15),  # call 2's call.hungup
        calls_awaiting_call_ended=1,
    )


async def test_the_searches_for_hung_up_calls_read_the_partial_index(
    sqlite_database: OutboxDatabase,
) -> None:
    """The gauges and the drainer's check find `call.hungup` rows through
    `ix_outbox_call_hungup_received_at` (migration 0005), which SQLite uses only when the query
    spells the event as the index's own literal: a bound parameter would scan the outbox."""
    from relay.db.delivery import DeliveryStore

    engine = create_engine(sqlite_database.url, timeout_seconds=2.0)
    searches: list[tuple[str, object]] = []

    def capture(_conn: object, _cursor: object, statement: str, parameters: object, *_: object):
        if "hungup" in statement:
            searches.append((statement, parameters))

    sa.event.listen(engine.sync_engine, "before_cursor_execute", capture)
    try:
        await read_outbox_gauges(engine, awaiting_before=NOW)
        await DeliveryStore(engine).calls_awaiting_ended(NOW)
        sa.event.remove(engine.sync_engine, "before_cursor_execute", capture)
        assert len(searches) == 2
        async with engine.connect() as connection:
            for statement, parameters in searches:
                plan = await connection.exec_driver_sql(
                    "EXPLAIN QUERY PLAN " + statement, parameters
                )
                details = " | ".join(row[-1] for row in plan)
                assert "ix_outbox_call_hungup_received_at" in details, details
    finally:
        await engine.dispose()
