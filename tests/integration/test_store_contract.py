"""The receiver's side of the store contract, with the same assertions on SQLite and PostgreSQL:
`OutboxStore.insert_events` (new, copies in one group, already stored, skipped, mixed groups,
two stores racing on one event), what a row holds afterwards, and the read-only questions.

The drainer's side of the same contract (claim, renew, release, finish, late, the questions the
drainer asks) is `test_delivery_store.py`; the operator's (stats, list, show, requeue, purge,
copy) is `test_operations.py`. All three run every test on both databases through the
`database` fixture, against real files and a real server, with no fake database anywhere.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy.exc import DBAPIError

from relay import aircall
from relay.db.engine import create_engine
from relay.db.migrate import head_revision
from relay.db.store import IncomingEvent, OutboxStore, StoredEvent, row_specific_error
from tests.support import (
    OutboxDatabase,
    incoming_event,
    refuse_rows_of_event,
    sample,
    writes_held,
)

pytestmark = pytest.mark.anyio

T0 = datetime(2026, 11, 23, 12, 0, 0, 123000, tzinfo=UTC)

ROW_COLUMNS = {
    "id",
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
    "last_http_status",
    "claimed_by",
    "claimed_until",
    "delivered_at",
    "request_id",
    "late",
    "origin",
}


def incoming(
    body: dict[str, Any],
    received_at: datetime | None = T0,
    forward: bool = True,
    source: str = "main",
) -> IncomingEvent:
    body = dict(body)
    body.pop("token", None)
    event: IncomingEvent = incoming_event(body, received_at, source=source, forward=forward)
    return event


def call_event(event: str, call_id: int, timestamp: int = 1_773_151_326) -> dict[str, Any]:
    body = sample(event)
    body["data"]["id"] = call_id
    body["timestamp"] = timestamp
    return body


@dataclass
class Stores:
    database: OutboxDatabase
    store: OutboxStore

    async def row(self, row_id: int) -> dict[str, Any]:
        row = await self.store.get_event(row_id)
        assert row is not None, f"no outbox row {row_id}"
        return row

    async def database_clock(self) -> datetime:
        """The database's clock: PostgreSQL's; on SQLite this process's (one host)."""
        if self.database.kind == "sqlite":
            return datetime.now(UTC)
        [row] = await self.database.rows_async("SELECT clock_timestamp() AS now")
        moment: datetime = row["now"]
        return moment


@pytest.fixture
async def stores(database: OutboxDatabase) -> AsyncIterator[Stores]:
    engine = create_engine(database.url, timeout_seconds=2.0)
    store = OutboxStore(engine)
    yield Stores(database, store)
    await store.close_writer()
    await engine.dispose()


async def test_a_new_event_is_one_pending_row_with_every_column(stores: Stores) -> None:
    event = incoming(call_event("call.created", 5_000_000_001), source="second")
    [stored] = await stores.store.insert_events([event])
    assert stored == StoredEvent(id=stored.id, duplicate=False, status="pending", received_count=1)
    row = await stores.row(stored.id)
    assert set(row) == ROW_COLUMNS
    assert row["dedup_key"] == event.dedup_key
    assert row["message_id"] == "aircall-" + event.dedup_key
    assert (row["source"], row["resource"], row["event"]) == ("second", "call", "call.created")
    assert (row["resource_id"], row["ordering_key"]) == ("5000000001", "call:5000000001")
    assert row["occurred_at"] == event.occurred_at
    assert row["received_at"] == row["last_received_at"] == row["next_attempt_at"] == T0
    assert all(row[name].tzinfo is not None for name in ("occurred_at", "received_at"))
    assert (row["received_count"], row["status"], row["attempts"], row["late"]) == (
        1,
        "pending",
        0,
        False,
    )
    for untouched in (
        "last_error",
        "last_http_status",
        "claimed_by",
        "claimed_until",
        "delivered_at",
        "request_id",
    ):
        assert row[untouched] is None, untouched
    assert row["payload"] == event.payload
    assert "token" not in row["payload"]
    assert row["origin"] == "webhook"


async def test_the_payload_comes_back_exactly(stores: Stores) -> None:
    body = call_event("call.commented", 5_000_000_002)
    body["data"]["huge_id"] = 2**63 - 1  # beyond a double's 2^53: every digit must survive
    body["data"]["ratio"] = 0.1
    body["data"]["text"] = 'Rappeler M. Çelik — 👍\n"urgent"'
    body["data"]["nested"] = {"a": [1, {"b": None}, True], "": ""}
    event = incoming(body)
    [stored] = await stores.store.insert_events([event])
    payload = (await stores.row(stored.id))["payload"]
    assert payload == event.payload
    assert payload["data"]["huge_id"] == 2**63 - 1
    assert isinstance(payload["data"]["huge_id"], int)


async def test_copies_in_one_group_are_one_row_counting_them_all(stores: Stores) -> None:
    event = incoming(call_event("call.answered", 5_000_000_003))
    results = await stores.store.insert_events([event, event, event])
    assert len({result.id for result in results}) == 1
    assert [result.duplicate for result in results] == [False, True, True]
    assert all(result.received_count == 3 for result in results)
    assert await stores.store.count_events() == 1


async def test_an_event_already_stored_only_counts_and_moves_last_received_at(
    stores: Stores,
) -> None:
    event = incoming(call_event("call.hungup", 5_000_000_004))
    [first] = await stores.store.insert_events([event])
    later = T0 + timedelta(minutes=7)
    again = incoming(call_event("call.hungup", 5_000_000_004), received_at=later, source="second")
    [second] = await stores.store.insert_events([again])
    assert second == StoredEvent(id=first.id, duplicate=True, status="pending", received_count=2)
    row = await stores.row(first.id)
    assert (row["received_at"], row["last_received_at"]) == (T0, later)
    assert row["source"] == "main"  # the first receipt's label stays
    assert await stores.store.count_events() == 1


async def test_a_skipped_event_is_stored_with_its_reason_and_never_due(stores: Stores) -> None:
    body = call_event("call.hungup", 5_000_000_005)
    body["event"] = "call.hold"
    [stored] = await stores.store.insert_events([incoming(body, forward=False)])
    assert (stored.status, stored.duplicate) == ("skipped", False)
    row = await stores.row(stored.id)
    assert row["status"] == "skipped"
    assert row["last_error"] == aircall.skip_reason("call.hold")
    assert row["next_attempt_at"] is None


async def test_an_event_without_a_receipt_time_is_stamped_on_the_database_clock(
    stores: Stores,
) -> None:
    """The receiver gives no receipt time: the write stamps it on the database's clock
    (PostgreSQL's `now()`, the start of the write's transaction), so that receivers on several
    hosts and the drainers' settle window all use one clock (issue 10, fault 6)."""
    forwarded = incoming(call_event("call.created", 5_000_000_011), received_at=None)
    hold = call_event("call.hungup", 5_000_000_012)
    hold["event"] = "call.hold"
    skipped = incoming(hold, received_at=None, forward=False)
    before = await stores.database_clock()
    stored = await stores.store.insert_events([forwarded, skipped])
    after = await stores.database_clock()
    new, ignored = [await stores.row(result.id) for result in stored]
    for row in (new, ignored):
        assert before <= row["received_at"] == row["last_received_at"] <= after
    assert new["next_attempt_at"] == new["received_at"]  # due at once, once settled
    assert ignored["next_attempt_at"] is None
    [again] = await stores.store.insert_events([forwarded])  # a copy, received later
    row = await stores.row(again.id)
    assert again.duplicate and row["received_at"] == new["received_at"]
    assert after <= row["last_received_at"] <= await stores.database_clock()


async def test_a_mixed_group_answers_each_event_in_the_order_given(stores: Stores) -> None:
    old = incoming(call_event("call.created", 5_000_000_006))
    [old_stored] = await stores.store.insert_events([old])
    new = incoming(call_event("call.created", 5_000_000_007))
    hold = call_event("call.hungup", 5_000_000_008)
    hold["event"] = "call.hold"
    skipped = incoming(hold, forward=False)
    results = await stores.store.insert_events([new, old, skipped, new])
    assert [(r.duplicate, r.status, r.received_count) for r in results] == [
        (False, "pending", 2),
        (True, "pending", 2),
        (False, "skipped", 1),
        (True, "pending", 2),
    ]
    assert results[1].id == old_stored.id
    assert results[0].id == results[3].id
    assert await stores.store.count_events() == 3


async def test_a_group_past_the_drivers_parameter_limit_is_one_write_in_order(
    stores: Stores,
) -> None:
    """2,000 events in one group: on PostgreSQL one `INSERT ... SELECT FROM unnest` of 17
    arrays (a multi-row `VALUES` would need 34,000 parameters, past asyncpg's 32,767); receipt
    ids follow the group's order on both databases."""
    events = [incoming(call_event("call.tagged", 5_100_000_000 + n)) for n in range(2000)]
    results = await stores.store.insert_events(events)
    ids = [result.id for result in results]
    assert ids == sorted(ids) and len(set(ids)) == 2000
    assert not any(result.duplicate for result in results)
    assert await stores.store.count_events() == 2000


async def test_receipt_ids_increase_from_one_group_to_the_next(stores: Stores) -> None:
    ids = []
    for number in range(5):
        group = [
            incoming(call_event("call.created", 5_100_000_000 + number * 10 + k)) for k in range(3)
        ]
        ids.extend(result.id for result in await stores.store.insert_events(group))
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


async def test_two_stores_racing_on_one_event_make_one_row_and_one_first_receipt(
    database: OutboxDatabase,
) -> None:
    """Two receivers (two engines, two connections) take the same webhook at the same moment,
    many times over: each event has one row counted twice, and exactly one of the two answers
    says it was new."""
    engines = [
        create_engine(database.url, timeout_seconds=2.0),
        create_engine(database.url, timeout_seconds=2.0),
    ]
    racers = [OutboxStore(engine) for engine in engines]
    events = [incoming(call_event("call.ringing_on_agent", 5_200_000_000 + n)) for n in range(20)]
    outcomes: dict[int, list[StoredEvent]] = {}

    async def take(racer: OutboxStore, index: int) -> None:
        for number, event in enumerate(events):
            [result] = await racer.insert_events([event])
            outcomes.setdefault(number, []).append(result)

    try:
        async with anyio.create_task_group() as group:
            for index, racer in enumerate(racers):
                group.start_soon(take, racer, index)
    finally:
        for racer in racers:
            await racer.close_writer()
        for engine in engines:
            await engine.dispose()
    for number, pair in outcomes.items():
        assert len(pair) == 2, number
        assert pair[0].id == pair[1].id, number
        assert sorted(result.duplicate for result in pair) == [False, True], number
        assert sorted(result.received_count for result in pair)[-1] == 2, number
    counts = await database.rows_async("SELECT received_count FROM outbox")
    assert [row["received_count"] for row in counts] == [2] * len(events)


async def test_a_refused_row_is_told_apart_from_a_database_that_cannot_write(
    database: OutboxDatabase,
) -> None:
    """`row_specific_error` on real errors: a row the database refuses (a trigger) is the row's;
    a write lock held past the timeout is the database's. A refused row writes nothing of its
    group, and leaves the store able to write the others."""
    await refuse_rows_of_event(database, "call.refused")
    refused = call_event("call.created", 5_400_000_001)
    refused["event"] = "call.refused"
    good = incoming(call_event("call.created", 5_400_000_002))
    engine = create_engine(database.url, timeout_seconds=0.2)
    store = OutboxStore(engine)
    try:
        with pytest.raises(DBAPIError, match="refused by a test trigger") as row_error:
            await store.insert_events([good, incoming(refused)])
        assert row_specific_error(row_error.value), row_error.value
        assert await store.count_events() == 0
        async with writes_held(database):
            with pytest.raises(DBAPIError, match="lock") as locked:
                await store.insert_events([good])
        assert not row_specific_error(locked.value), locked.value
        [stored] = await store.insert_events([good])
        assert (stored.duplicate, stored.received_count) == (False, 1)
    finally:
        await store.close_writer()
        await engine.dispose()


async def test_get_event_and_count_events(stores: Stores) -> None:
    assert await stores.store.count_events() == 0
    assert await stores.store.get_event(1) is None
    [stored] = await stores.store.insert_events([incoming(call_event("call.ended", 5_300_000_001))])
    assert await stores.store.count_events() == 1
    assert (await stores.row(stored.id))["event"] == "call.ended"
    assert await stores.store.get_event(stored.id + 1) is None


async def test_schema_state_reports_the_head_revision(stores: Stores) -> None:
    state = await stores.store.schema_state()
    assert (state.reachable, state.revision, state.error) == (True, head_revision(), None)


async def test_schema_state_of_an_unreachable_database_says_so_without_raising(
    database: OutboxDatabase, tmp_path: Path
) -> None:
    if database.kind == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path}"  # a directory: SQLite cannot open it
    else:
        url = "postgresql+asyncpg://postgres@127.0.0.1:1/nothing"  # nothing listens on port 1
    engine = create_engine(url, timeout_seconds=2.0)
    try:
        state = await OutboxStore(engine).schema_state()
    finally:
        await engine.dispose()
        if database.kind == "sqlite":
            await _aiosqlite_threads_gone()
    assert state.reachable is False
    assert state.revision is None
    assert state.error


async def _aiosqlite_threads_gone(within: float = 5.0) -> None:
    """Wait for aiosqlite's worker threads to end. The thread of a connection that failed to
    open answers its stop request a moment after the failure; if this test's event loop has
    closed by then, the thread's exception lands in whichever test runs next."""
    with anyio.move_on_after(within):
        while any("_connection_worker_thread" in thread.name for thread in threading.enumerate()):
            await anyio.sleep(0.01)
