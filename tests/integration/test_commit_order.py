"""On PostgreSQL two webhooks of one call can commit in the opposite order of their receipt ids
(ids are taken from a sequence at insert, made visible at commit). Delivery order must not depend
on that: it follows Aircall's timestamp, and the settle window keeps a row from being claimed
before a slower transaction of its key has had time to commit. These tests force the
interleaving with two real connections, on the model of the eventsourcing library's test that
ids cannot commit out of order.

The settle window is measured on the database's clock, which no test can set: these tests
receive their rows on it (as the receiver does) and wait out a short window for real."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import anyio
import pytest
import sqlalchemy as sa

from relay.db.delivery import DeliveryStore, RequestRecord
from relay.db.engine import create_engine
from relay.db.store import IncomingEvent, OutboxStore
from relay.db.tables import outbox
from tests.support import OutboxDatabase, call_lifecycle
from tests.support import incoming_event as incoming

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
SETTLE = timedelta(seconds=1)
LEASE = timedelta(seconds=60)


def row_values(event: IncomingEvent) -> dict[str, object]:
    """The row the receiver writes, received now by the database's clock."""
    received_at = sa.func.now()
    return {
        "dedup_key": event.dedup_key,
        "message_id": event.message_id,
        "source": event.source,
        "resource": event.resource,
        "event": event.event,
        "resource_id": event.resource_id,
        "ordering_key": event.ordering_key,
        "occurred_at": event.occurred_at,
        "received_at": received_at,
        "last_received_at": received_at,
        "received_count": 1,
        "payload": event.payload,
        "status": "pending",
        "attempts": 0,
        "next_attempt_at": received_at,
        "late": False,
    }


@pytest.fixture
async def stores(
    postgres_database: OutboxDatabase,
) -> AsyncIterator[tuple[sa.ext.asyncio.AsyncEngine, OutboxStore, DeliveryStore]]:
    engine = create_engine(postgres_database.url, timeout_seconds=2.0)
    yield engine, OutboxStore(engine), DeliveryStore(engine)
    await engine.dispose()


async def claim(delivery: DeliveryStore) -> list[tuple[int, str]]:
    """Claim what is deliverable now, and record it delivered."""
    now = datetime.now(UTC)
    claimed = await delivery.claim("a", now, SETTLE, LEASE, 100, 100)
    if claimed:
        ids = [row.id for row in claimed]
        record = RequestRecord(
            RequestRecord.new_id(), now, now, len(ids), 1, ids, 200, "delivered", None
        )
        await delivery.finish("a", record, delivered=ids)
    return [(row.id, row.event) for row in claimed]


async def test_the_earlier_event_committing_last_is_still_delivered_first(
    stores: tuple[sa.ext.asyncio.AsyncEngine, OutboxStore, DeliveryStore],
) -> None:
    engine, store, delivery = stores
    created, hungup = call_lifecycle(1)[0], call_lifecycle(1)[5]
    slow = await engine.connect()
    transaction = await slow.begin()
    # The first webhook takes the lower id, but its transaction is slow to commit ...
    [slow_id] = (
        await slow.execute(
            sa.insert(outbox).values(row_values(incoming(created, None))).returning(outbox.c.id)
        )
    ).scalars()
    # ... while the second one, received a moment later, commits at once with a higher id.
    [fast] = await store.insert_events([incoming(hungup, None)])
    assert fast.id > slow_id
    # Before the settle window is over nothing is claimed, committed or not.
    assert await claim(delivery) == []
    await transaction.commit()
    await slow.close()
    # Once settled, the two go in Aircall's order, not in the order of commit.
    await anyio.sleep(SETTLE.total_seconds())
    assert await claim(delivery) == [
        (slow_id, "call.created"),
        (fast.id, "call.hungup"),
    ]


async def test_the_later_event_committing_last_waits_its_turn(
    stores: tuple[sa.ext.asyncio.AsyncEngine, OutboxStore, DeliveryStore],
) -> None:
    engine, store, delivery = stores
    created, hungup = call_lifecycle(2)[0], call_lifecycle(2)[5]
    slow = await engine.connect()
    transaction = await slow.begin()
    # The later event takes the lower id and commits last; the earlier event commits first.
    [slow_id] = (
        await slow.execute(
            sa.insert(outbox).values(row_values(incoming(hungup, None))).returning(outbox.c.id)
        )
    ).scalars()
    [fast] = await store.insert_events([incoming(created, None)])
    assert fast.id > slow_id
    await anyio.sleep(SETTLE.total_seconds())
    first = await claim(delivery)
    await transaction.commit()
    await slow.close()
    second = await claim(delivery)
    # Whatever the ids and the commit order, call.created reaches Segment before call.hungup.
    assert [event for _, event in first + second] == ["call.created", "call.hungup"]
    rows = await engine.connect()
    try:
        late = (await rows.execute(sa.select(outbox.c.event, outbox.c.late))).all()
    finally:
        await rows.close()
    assert all(not flag for _, flag in late)


async def test_concurrent_claims_never_share_a_key(
    stores: tuple[sa.ext.asyncio.AsyncEngine, OutboxStore, DeliveryStore],
) -> None:
    """Two drainers claiming at the same moment on PostgreSQL (FOR UPDATE SKIP LOCKED): each
    key goes to one of them only, with its whole settled run."""

    engine, store, delivery = stores
    bodies = [body for call in range(1, 41) for body in call_lifecycle(call)[:4]]
    await store.insert_events([incoming(body, T0) for body in bodies])
    second = DeliveryStore(engine)
    now = T0 + timedelta(seconds=6)
    results: dict[str, list[str]] = {}

    async def take(owner: str, store_of: DeliveryStore) -> None:
        claimed = await store_of.claim(owner, now, SETTLE, LEASE, 80, 100)
        results[owner] = [row.ordering_key for row in claimed]

    async with anyio.create_task_group() as group:
        group.start_soon(take, "a", delivery)
        group.start_soon(take, "b", second)
    keys_a, keys_b = set(results["a"]), set(results["b"])
    assert not keys_a & keys_b
    assert len(results["a"]) + len(results["b"]) == len(bodies)
    for owner in ("a", "b"):
        for key in set(results[owner]):
            assert results[owner].count(key) == 4  # the whole run of the key
