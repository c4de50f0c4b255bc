"""The deployment's budget toward Segment (`rate_limits`), on SQLite and PostgreSQL: drainers
taking from it at once share one budget, it refills at the rate up to one burst on the
database's clock, a 429 pauses every drainer and the refill with it, and with both limits off
nothing is written at all.

The store's tests use two `DeliveryStore`s on two engines, as two drainers would; the drainer's
use two `Drainer`s in this event loop against the fake Segment over real HTTP.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
import sqlalchemy as sa

from relay.db.delivery import DeliveryStore, RequestRecord, SendLimits, TakenBudget
from relay.db.engine import create_engine
from relay.testing import FakeSegment, Fault, SourceConfig
from tests.integration.test_drainer import FAST, WRITE_KEY, Relay, draining
from tests.support import OutboxDatabase, call_lifecycle

pytestmark = pytest.mark.anyio

LIMITS = SendLimits(
    events_per_second=200.0, requests_per_second=20.0, events_burst=100.0, requests_burst=1.0
)


@pytest.fixture
def fake() -> Iterator[FakeSegment]:
    with FakeSegment(write_keys={WRITE_KEY: SourceConfig()}) as server:
        yield server


@pytest.fixture
async def drainers(database: OutboxDatabase) -> AsyncIterator[tuple[DeliveryStore, ...]]:
    """Two drainers' stores, each on an engine (and connections) of its own."""
    engines = [
        create_engine(database.url, timeout_seconds=2.0),
        create_engine(database.url, timeout_seconds=2.0),
    ]
    stores = tuple(DeliveryStore(engine) for engine in engines)
    yield stores
    for store, engine in zip(stores, engines, strict=True):
        await store.close()
        await engine.dispose()


async def execute(database: OutboxDatabase, sql: str, **params: Any) -> None:
    engine = create_engine(database.url, timeout_seconds=2.0)
    try:
        async with engine.begin() as connection:
            await connection.execute(sa.text(sql), params)
    finally:
        await engine.dispose()


async def set_budget(
    database: OutboxDatabase, events: float, requests: float, seconds_ago: float
) -> None:
    """Put the budget's row at `events` and `requests` as of `seconds_ago`, by the database's
    clock (as if that long had passed since the last request took from it)."""
    if database.kind == "postgresql":
        updated_at = "clock_timestamp() - make_interval(secs => :seconds)"
    else:
        updated_at = "strftime('%Y-%m-%d %H:%M:%f', julianday('now') - :seconds / 86400.0) || '000'"
    await execute(
        database,
        "UPDATE rate_limits SET events_available = :events, requests_available = :requests, "
        f"updated_at = {updated_at}",
        events=events,
        requests=requests,
        seconds=seconds_ago,
    )


def pause_record() -> RequestRecord:
    now = datetime.now(UTC)
    return RequestRecord(
        id=RequestRecord.new_id(),
        started_at=now,
        finished_at=now,
        event_count=0,
        body_bytes=0,
        outbox_ids=[],
        http_status=429,
        outcome="rate_limited",
        error=None,
    )


async def test_the_first_request_goes_at_once_and_the_next_waits_its_turn(
    drainers: tuple[DeliveryStore, ...], database: OutboxDatabase
) -> None:
    first, second = drainers
    started = time.monotonic()
    assert await first.take_send_budget(LIMITS, 100) == TakenBudget(0.0, 0.0, 0.0)
    taken = await second.take_send_budget(LIMITS, 100)
    elapsed = time.monotonic() - started
    # The other drainer's request used the burst: this one is 100 events (0.5 s at 200/s) and
    # one request (0.05 s at 20/s) behind, less what came back meanwhile.
    assert -100.0 <= taken.events_available <= -100.0 + 200 * (elapsed + 0.01)
    assert -1.0 <= taken.requests_available <= -1.0 + 20 * (elapsed + 0.01)
    assert taken.paused_seconds == 0.0
    [row] = await database.rows_async("SELECT * FROM rate_limits")
    assert row["name"] == "segment"
    assert (row["events_per_second"], row["requests_per_second"]) == (200.0, 20.0)
    assert row["paused_until"] is None


async def test_the_budget_refills_at_the_rate_on_the_databases_clock_up_to_one_burst(
    drainers: tuple[DeliveryStore, ...], database: OutboxDatabase
) -> None:
    store, _ = drainers
    await store.take_send_budget(LIMITS, 100)

    started = time.monotonic()
    await set_budget(database, events=-100.0, requests=-5.0, seconds_ago=0.25)
    taken = await store.take_send_budget(LIMITS, 10)
    elapsed = time.monotonic() - started
    # 0.25 s gave back 50 events and 5 requests.
    assert -60.0 <= taken.events_available <= -60.0 + 200 * (elapsed + 0.01)
    assert -1.0 <= taken.requests_available <= -1.0 + 20 * (elapsed + 0.01)

    # Long idle: the budget holds one burst (a batch, a request), not more.
    await set_budget(database, events=-100.0, requests=-1.0, seconds_ago=60.0)
    assert await store.take_send_budget(LIMITS, 10) == TakenBudget(90.0, 0.0, 0.0)


async def test_a_limit_that_is_off_takes_nothing_from_its_bucket(
    drainers: tuple[DeliveryStore, ...],
) -> None:
    store, _ = drainers
    events_only = replace(LIMITS, requests_per_second=0.0)
    started = time.monotonic()
    assert await store.take_send_budget(events_only, 30) == TakenBudget(70.0, 1.0, 0.0)
    taken = await store.take_send_budget(events_only, 30)
    elapsed = time.monotonic() - started
    assert taken.requests_available == 1.0
    assert 40.0 <= taken.events_available <= 40.0 + 200 * (elapsed + 0.01)


async def test_two_drainers_taking_at_once_share_one_budget_and_never_exceed_it(
    drainers: tuple[DeliveryStore, ...],
) -> None:
    # A rate so low that nothing comes back during the test: every take must then see every
    # take before it, whichever drainer made it, so the levels returned are exactly the burst
    # less 10 events per request so far (no take lost, none counted twice), and each request's
    # turn is its own (the waits are spaced at the rate).
    slow = SendLimits(
        events_per_second=1e-9, requests_per_second=1e-9, events_burst=100.0, requests_burst=1.0
    )
    takes = 60
    taken: list[TakenBudget] = []

    async def drainer(store: DeliveryStore) -> None:
        for _ in range(takes):
            taken.append(await store.take_send_budget(slow, 10))

    async with anyio.create_task_group() as group:
        for store in drainers:
            group.start_soon(drainer, store)

    total = takes * len(drainers)
    events = sorted((budget.events_available for budget in taken), reverse=True)
    requests = sorted((budget.requests_available for budget in taken), reverse=True)
    assert events == pytest.approx([100.0 - 10 * n for n in range(1, total + 1)], abs=1e-3)
    assert requests == pytest.approx([1.0 - n for n in range(1, total + 1)], abs=1e-3)


async def test_a_429_pauses_every_drainer_and_the_refill_with_it(
    drainers: tuple[DeliveryStore, ...], database: OutboxDatabase
) -> None:
    limited, other = drainers
    await other.take_send_budget(LIMITS, 100)
    await limited.finish("limited", pause_record(), pause_seconds=30.0)
    # A shorter pause later never shortens it.
    await limited.finish("limited", pause_record(), pause_seconds=1.0)

    # Long idle before the 429: but nothing comes back while the pause lasts.
    await set_budget(database, events=-20.0, requests=0.0, seconds_ago=60.0)
    taken = await other.take_send_budget(LIMITS, 100)
    assert 29.0 < taken.paused_seconds <= 30.0
    # Counted from the pause's end: this request goes a pause and half a second from now.
    assert taken.events_available == pytest.approx(-120.0)
    assert taken.requests_available == pytest.approx(-1.0)

    # Once it is over, the budget refills from its end: here half a second ago.
    started = time.monotonic()
    await set_budget(database, events=-120.0, requests=-1.0, seconds_ago=0.5)
    await execute(database, "UPDATE rate_limits SET paused_until = updated_at")
    taken = await other.take_send_budget(LIMITS, 10)
    elapsed = time.monotonic() - started
    assert taken.paused_seconds == 0.0
    assert -30.0 <= taken.events_available <= -30.0 + 200 * (elapsed + 0.01)


async def test_a_pause_with_no_budget_row_changes_nothing(
    drainers: tuple[DeliveryStore, ...], database: OutboxDatabase
) -> None:
    store, _ = drainers
    await store.finish("limited", pause_record(), pause_seconds=5.0)
    assert await database.rows_async("SELECT * FROM rate_limits") == []


# --- two drainers ---------------------------------------------------------------------------


async def test_a_429_met_by_one_drainer_pauses_the_other(
    database: OutboxDatabase, fake: FakeSegment
) -> None:
    config = replace(FAST, events_per_second=10_000, max_retry_after_seconds=5)
    first, second = Relay(database, fake, config), Relay(database, fake, config)
    fake.inject(Fault.rate_limited(2))
    try:
        async with draining(first.drainer()):
            await first.receive(*call_lifecycle(1)[:3])
            with anyio.fail_after(20):
                while not await first.rows(
                    "SELECT id FROM delivery_requests WHERE http_status = 429"
                ):
                    await anyio.sleep(0.02)
            # The second drainer starts while the first one's pause lasts, with rows of its own.
            async with draining(second.drainer()):
                await second.receive(*call_lifecycle(2)[:3])
                await second.wait_accepted(6)
    finally:
        await first.engine.dispose()
        await second.engine.dispose()
    log = fake.requests(include_bodies=True)
    [limited] = [entry for entry in log if entry["status"] == 429]
    limited_at = datetime.fromisoformat(limited["received_at"])
    after = [entry for entry in log if entry["seq"] > limited["seq"]]
    assert {2} <= {
        int(message["properties"]["call_id"])
        for entry in after
        for message in entry["decoded_body"]["batch"]
    }
    for entry in after:  # neither drainer sent anything during the pause
        assert datetime.fromisoformat(entry["received_at"]) - limited_at >= timedelta(seconds=1.9)


async def test_with_both_limits_off_no_budget_is_kept(
    database: OutboxDatabase, fake: FakeSegment
) -> None:
    relay = Relay(database, fake, FAST)  # events and requests per second 0
    fake.inject(Fault.rate_limited(0))
    try:
        async with draining(relay.drainer()):
            await relay.receive(*call_lifecycle(3))
            await relay.wait_accepted(12)
    finally:
        await relay.engine.dispose()
    assert await relay.rows("SELECT * FROM rate_limits") == []
