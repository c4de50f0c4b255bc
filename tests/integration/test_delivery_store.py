"""The drainer's side of the store, on SQLite and PostgreSQL: claims in key order with the
settle window, runs, leases and their expiry, finishing a request, late events, and the
questions the drainer asks; and, on PostgreSQL, that these follow the database's clock, not the
caller's.

The tests play at fixed moments (`T0` ...). On SQLite the caller's clock is the one the
statements use, so the moment is simply given. On PostgreSQL the statements read the server's
clock, which no test can set: there the harness moves the stored times instead, for the length of
each call, so that the server's `now()` stands at the moment played (`Harness.at`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from relay import aircall
from relay.db.delivery import (
    RELEASE_EXPIRED_EVERY,
    DeadRows,
    DeliveryStore,
    RequestRecord,
    RetryRows,
)
from relay.db.engine import create_engine
from relay.db.inspect import EventFilter, OutboxInspector
from relay.db.store import IncomingEvent, OutboxStore
from relay.segment import decode_payload
from tests.support import OutboxDatabase

pytestmark = pytest.mark.anyio

T0 = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
LEASE = timedelta(seconds=60)
SETTLE = timedelta(seconds=5)


def incoming(
    event: str,
    resource_id: int,
    timestamp: int,
    received_at: datetime,
    resource: str | None = None,
    forward: bool = True,
    extra: dict[str, object] | None = None,
) -> IncomingEvent:
    resource = resource or event.split(".")[0]
    data: dict[str, object] = {"id": resource_id, **(extra or {})}
    key = aircall.dedup_key(resource, event, timestamp, data)
    return IncomingEvent(
        dedup_key=key,
        message_id=aircall.message_id_for(key),
        source="main",
        resource=resource,
        event=event,
        resource_id=str(resource_id),
        ordering_key=f"{resource}:{resource_id}",
        occurred_at=datetime.fromtimestamp(timestamp, tz=UTC),
        received_at=received_at,
        payload={"resource": resource, "event": event, "timestamp": timestamp, "data": data},
        forward=forward,
        skip_reason=None if forward else "filtered",
    )


# The outbox's moments that the drainer's statements compare with the clock.
_CLOCKED = ("received_at", "last_received_at", "next_attempt_at", "claimed_until")
_SHIFT = sa.text(
    "UPDATE outbox SET "
    + ", ".join(f"{column} = {column} + CAST(:by AS interval)" for column in _CLOCKED)
)


class Harness:
    def __init__(self, outbox: OutboxStore, delivery: DeliveryStore) -> None:
        self.outbox = outbox
        self.delivery = delivery
        self.engine = outbox.engine

    async def add(self, *events: IncomingEvent) -> list[int]:
        stored = await self.outbox.insert_events(list(events))
        return [row.id for row in stored]

    @asynccontextmanager
    async def at(self, moment: datetime) -> AsyncIterator[None]:
        """Run the body as if the database's clock read `moment`. On PostgreSQL every stored
        moment is moved by (server's now - `moment`) before, and moved back after (with the
        moments the body wrote on the server's clock), so each row keeps its distance to `now`.
        On SQLite the statements use the caller's moment: nothing to do."""
        if self.engine.dialect.name != "postgresql":
            yield
            return
        async with self.engine.begin() as connection:
            server_now = await connection.scalar(sa.text("SELECT clock_timestamp()"))
            shift = server_now - moment
            await connection.execute(_SHIFT, {"by": shift})
        try:
            yield
        finally:
            async with self.engine.begin() as connection:
                await connection.execute(_SHIFT, {"by": -shift})

    async def claim(
        self, now: datetime, owner: str = "a", max_events: int = 100, max_per_key: int = 100
    ) -> list[tuple[str, str]]:
        async with self.at(now):
            claimed = await self.delivery.claim(
                owner, now, SETTLE, LEASE, max_events=max_events, max_per_key=max_per_key
            )
        self.last = claimed
        return [(row.ordering_key, row.event) for row in claimed]

    async def renew(self, owner: str, ids: list[int], now: datetime, lease: timedelta) -> int:
        async with self.at(now):
            return await self.delivery.renew(owner, ids, now, lease)

    async def retry(
        self, ids: list[int], now: datetime, after: timedelta, status: int = 503
    ) -> int:
        """Record a request of owner "a" at `now` answered `status`, its rows due again
        `after` it (a 5xx counts as a failed attempt, a 429 or 401 does not)."""
        retry = RetryRows(
            ids=ids,
            after=after,
            error=f"Segment answered {status}",
            failed_attempt=status not in (429, 401),
        )
        async with self.at(now):
            outcome = await self.delivery.finish(
                "a", record(ids, now, status, "retry"), retry=retry
            )
        return outcome.retried

    async def deliver(self, owner: str, ids: list[int], at: datetime) -> None:
        await self.delivery.finish(owner, record(ids, at, 200, "delivered"), delivered=ids)


def record(ids: list[int], at: datetime, status: int | None, outcome: str) -> RequestRecord:
    return RequestRecord(
        id=RequestRecord.new_id(),
        started_at=at,
        finished_at=at + timedelta(milliseconds=20),
        event_count=len(ids),
        body_bytes=100 * len(ids),
        outbox_ids=ids,
        http_status=status,
        outcome=outcome,
        error=None,
    )


@asynccontextmanager
async def harness_on(database: OutboxDatabase) -> AsyncIterator[Harness]:
    engine = create_engine(database.url, timeout_seconds=2.0)
    try:
        yield Harness(OutboxStore(engine), DeliveryStore(engine))
    finally:
        await engine.dispose()


@pytest.fixture
async def harness(database: OutboxDatabase) -> AsyncIterator[Harness]:
    async with harness_on(database) as made:
        yield made


async def test_nothing_is_claimed_before_the_settle_window(harness: Harness) -> None:
    await harness.add(incoming("call.created", 1, 100, T0))
    assert await harness.claim(T0 + timedelta(seconds=4)) == []
    assert await harness.claim(T0 + timedelta(seconds=5)) == [("call:1", "call.created")]


async def test_a_run_comes_in_timestamp_then_lifecycle_order(harness: Harness) -> None:
    # Received shuffled within the window; two share a timestamp (life cycle breaks the tie).
    await harness.add(
        incoming("call.ended", 1, 130, T0),
        incoming("call.hungup", 1, 110, T0 + timedelta(seconds=1)),
        incoming("call.answered", 1, 105, T0 + timedelta(seconds=1)),
        incoming("call.ringing_on_agent", 1, 100, T0 + timedelta(seconds=2)),
        incoming("call.created", 1, 100, T0 + timedelta(seconds=2)),
    )
    claimed = await harness.claim(T0 + timedelta(seconds=10))
    assert [event for _, event in claimed] == [
        "call.created",
        "call.ringing_on_agent",
        "call.answered",
        "call.hungup",
        "call.ended",
    ]


async def test_an_unsettled_earlier_event_holds_back_the_rest_of_its_key_only(
    harness: Harness,
) -> None:
    await harness.add(
        incoming("call.hungup", 1, 110, T0),
        incoming("call.created", 2, 100, T0),
    )
    # An earlier event of call 1 arrives late: it is not settled yet.
    await harness.add(incoming("call.created", 1, 100, T0 + timedelta(seconds=4)))
    claimed = await harness.claim(T0 + timedelta(seconds=6))
    assert claimed == [("call:2", "call.created")]  # call 2 does not wait on call 1
    claimed = await harness.claim(T0 + timedelta(seconds=9))
    assert claimed == [("call:1", "call.created"), ("call:1", "call.hungup")]


async def test_a_key_in_flight_is_not_claimed_again(harness: Harness) -> None:
    await harness.add(incoming("call.created", 1, 100, T0))
    assert await harness.claim(T0 + timedelta(seconds=6), owner="a")
    await harness.add(incoming("call.answered", 1, 105, T0 + timedelta(seconds=1)))
    assert await harness.claim(T0 + timedelta(seconds=7), owner="b") == []


async def test_an_expired_lease_is_claimed_again_by_another_drainer(harness: Harness) -> None:
    await harness.add(incoming("call.created", 1, 100, T0))
    first = T0 + timedelta(seconds=6)
    assert await harness.claim(first, owner="a")
    assert await harness.claim(first + timedelta(seconds=30), owner="b") == []
    assert await harness.claim(first + LEASE + timedelta(seconds=1), owner="b") == [
        ("call:1", "call.created")
    ]
    # The first owner lost its lease: its late answer changes nothing.
    ids = [row.id for row in harness.last]
    outcome = await harness.delivery.finish(
        "a", record(ids, first, 200, "delivered"), delivered=ids
    )
    assert outcome.delivered == 0
    assert outcome.lost_lease == 1


async def test_expired_leases_are_looked_for_at_most_once_a_second(harness: Harness) -> None:
    """Finding expired leases reads every row in flight, so a drainer claiming many times a
    second looks for them once a second (RELEASE_EXPIRED_EVERY): a row whose lease just
    expired waits for that look, at most a second more than its one-minute lease."""
    await harness.add(incoming("call.created", 1, 100, T0))
    first = T0 + timedelta(seconds=6)
    assert await harness.claim(first, owner="a")
    expiry = first + LEASE
    assert timedelta(seconds=1) == RELEASE_EXPIRED_EVERY
    assert await harness.claim(expiry - timedelta(seconds=0.2), owner="b") == []  # looked
    assert await harness.claim(expiry + timedelta(seconds=0.3), owner="b") == []  # too soon
    assert await harness.claim(expiry + timedelta(seconds=0.8), owner="b") == [
        ("call:1", "call.created")
    ]


async def test_renewal_keeps_the_lease(harness: Harness) -> None:
    [row_id] = await harness.add(incoming("call.created", 1, 100, T0))
    first = T0 + timedelta(seconds=6)
    assert await harness.claim(first, owner="a")
    assert await harness.renew("a", [row_id], first, LEASE * 3) == 1
    assert await harness.renew("b", [row_id], first, LEASE * 3) == 0
    assert await harness.claim(first + LEASE * 2, owner="b") == []


async def test_limits_on_events_and_per_key(harness: Harness) -> None:
    events = [incoming("call.tagged", 1, 100 + n, T0) for n in range(5)]
    events += [incoming("call.created", n, 100, T0) for n in range(2, 6)]
    await harness.add(*events)
    now = T0 + timedelta(seconds=6)
    claimed = await harness.claim(now, max_events=6, max_per_key=3)
    assert len(claimed) == 6
    assert claimed[:3] == [("call:1", "call.tagged")] * 3
    # The rest of call 1 waits behind its in-flight head; other calls are free.
    again = await harness.claim(now, owner="b")
    assert ("call:1", "call.tagged") not in again
    assert len(again) == 1


async def test_release_gives_rows_back_untouched(
    harness: Harness, database: OutboxDatabase
) -> None:
    [row_id] = await harness.add(incoming("call.created", 1, 100, T0))
    await harness.claim(T0 + timedelta(seconds=6))
    assert await harness.delivery.release("a", [row_id]) == 1
    [row] = await database.rows_async()
    assert (row["status"], row["attempts"], row["claimed_by"]) == ("pending", 0, None)


async def test_finish_delivered_retry_and_dead(harness: Harness, database: OutboxDatabase) -> None:
    ids = await harness.add(*(incoming("call.created", n, 100, T0) for n in range(1, 4)))
    now = T0 + timedelta(seconds=6)
    await harness.claim(now)
    rec = record(ids, now, 200, "delivered")
    await harness.delivery.finish("a", rec, delivered=[ids[0]])
    assert await harness.retry([ids[1]], now, after=timedelta(seconds=30)) == 1
    await harness.delivery.finish(
        "a", record([ids[2]], now, 400, "rejected"), dead=[DeadRows(ids=[ids[2]], reason="bad")]
    )
    rows = {row["id"]: row for row in await database.rows_async()}
    assert rows[ids[0]]["status"] == "delivered"
    assert rows[ids[0]]["request_id"] == rec.id
    assert rows[ids[0]]["delivered_at"] is not None
    assert rows[ids[0]]["attempts"] == 1
    assert rows[ids[1]]["status"] == "pending"
    assert rows[ids[1]]["last_http_status"] == 503
    assert rows[ids[1]]["last_error"] == "Segment answered 503"
    assert rows[ids[2]]["status"] == "dead"
    assert rows[ids[2]]["last_error"] == "bad"
    assert all(row["claimed_by"] is None for row in rows.values())
    requests = await database.rows_async("SELECT * FROM delivery_requests ORDER BY started_at")
    assert len(requests) == 3
    assert {request["http_status"] for request in requests} == {200, 503, 400}
    # The retry waits for its time, then is claimable again.
    assert await harness.claim(now + timedelta(seconds=29)) == []
    assert await harness.claim(now + timedelta(seconds=31)) == [("call:2", "call.created")]


async def test_only_a_failed_attempt_counts_in_attempts(
    harness: Harness, database: OutboxDatabase
) -> None:
    """A 429 or a configuration pause gives rows back without counting an attempt; a failed
    delivery (5xx, timeout, connection error) counts one (issue 10, fault 5)."""
    [row_id] = await harness.add(incoming("call.created", 1, 100, T0))
    now = T0 + timedelta(seconds=6)
    for step, (status, attempts) in enumerate(((429, 0), (401, 0), (503, 1))):
        moment = now + timedelta(seconds=step)
        assert await harness.claim(moment) == [("call:1", "call.created")]
        assert await harness.retry([row_id], moment, after=timedelta(0), status=status) == 1
        [row] = await database.rows_async()
        assert (row["status"], row["last_http_status"]) == ("pending", status)
        assert row["attempts"] == attempts


async def test_a_requests_rows_retried_are_due_at_one_moment_and_go_again_together(
    harness: Harness, database: OutboxDatabase
) -> None:
    """The rows of a request given back for a retry share one due time (on PostgreSQL the
    writing statement's moment, not each row's), so the next claim takes the key's run whole
    rather than its head alone."""
    ids = await harness.add(*(incoming("call.tagged", 1, 100 + n, T0) for n in range(40)))
    now = T0 + timedelta(seconds=6)
    assert len(await harness.claim(now)) == 40
    assert await harness.retry(ids, now, after=timedelta(seconds=2)) == 40
    rows = await database.rows_async("SELECT DISTINCT next_attempt_at FROM outbox")
    assert len(rows) == 1
    assert len(await harness.claim(now + timedelta(seconds=3))) == 40


async def test_dead_rows_do_not_block_their_key(harness: Harness) -> None:
    first, _ = await harness.add(
        incoming("call.created", 1, 100, T0), incoming("call.answered", 1, 105, T0)
    )
    now = T0 + timedelta(seconds=6)
    await harness.claim(now, max_per_key=1)
    await harness.delivery.finish(
        "a", record([first], now, 400, "rejected"), dead=[DeadRows(ids=[first], reason="bad")]
    )
    assert await harness.claim(now) == [("call:1", "call.answered")]


async def test_an_event_delivered_after_a_later_one_is_late(
    harness: Harness, database: OutboxDatabase
) -> None:
    [hungup] = await harness.add(incoming("call.hungup", 1, 110, T0))
    now = T0 + timedelta(seconds=6)
    await harness.claim(now)
    await harness.deliver("a", [hungup], now)
    # Aircall retried an earlier event of the call long after.
    [answered] = await harness.add(incoming("call.answered", 1, 105, T0 + timedelta(minutes=5)))
    later = T0 + timedelta(minutes=6)
    assert await harness.claim(later) == [("call:1", "call.answered")]
    outcome = await harness.delivery.finish(
        "a", record([answered], later, 200, "delivered"), delivered=[answered]
    )
    assert (outcome.delivered, outcome.late) == (1, 1)
    rows = {row["id"]: row for row in await database.rows_async()}
    assert rows[answered]["late"]
    assert not rows[hungup]["late"]


async def test_a_run_delivered_together_is_not_late(harness: Harness) -> None:
    ids = await harness.add(
        incoming("call.created", 1, 100, T0), incoming("call.hungup", 1, 110, T0)
    )
    now = T0 + timedelta(seconds=6)
    await harness.claim(now)
    outcome = await harness.delivery.finish("a", record(ids, now, 200, "x"), delivered=ids)
    assert (outcome.delivered, outcome.late) == (2, 0)


async def test_a_claim_returns_the_payload_as_stored_text(harness: Harness) -> None:
    """The claim hands the payload over as the stored JSON text (mapping parses it): every
    digit of an id beyond 64 bits, floats and non-ASCII text read back as they were stored."""
    big = 2**64 + 7
    event = incoming(
        "user.created", big, 100, T0, extra={"weight": 1.5e-07, "name": "Zoë 😀", "n": None}
    )
    await harness.add(event)
    assert await harness.claim(T0 + timedelta(seconds=6)) == [(f"user:{big}", "user.created")]
    (row,) = harness.last
    assert isinstance(row.payload, str)
    assert json.loads(row.payload) == event.payload
    decoded, _fast = decode_payload(row.payload)
    assert decoded == event.payload
    assert decoded["data"]["id"] == big and type(decoded["data"]["id"]) is int


async def test_skipped_rows_are_never_claimed(harness: Harness) -> None:
    await harness.add(incoming("call.hold", 1, 100, T0, forward=False))
    assert await harness.claim(T0 + timedelta(hours=1)) == []


async def test_calls_awaiting_call_ended(harness: Harness) -> None:
    await harness.add(
        incoming("call.hungup", 1, 110, T0),
        incoming("call.hungup", 2, 110, T0),
        incoming("call.ended", 2, 140, T0 + timedelta(seconds=30)),
        incoming("call.hungup", 3, 110, T0 + timedelta(minutes=9)),
    )
    awaiting = await harness.delivery.calls_awaiting_ended(T0 + timedelta(minutes=5))
    assert [call.ordering_key for call in awaiting] == ["call:1"]
    assert awaiting[0].hungup_received_at == T0


async def test_backlog(harness: Harness) -> None:
    ids = await harness.add(
        *(incoming("call.created", n, 100, T0 + timedelta(seconds=n)) for n in range(3))
    )
    now = T0 + timedelta(seconds=6)
    await harness.claim(now, max_events=1)
    await harness.delivery.finish(
        "a", record(ids[:1], now, 400, "x"), dead=[DeadRows(ids=ids[:1], reason="bad")]
    )
    backlog = await harness.delivery.backlog()
    assert (backlog.pending, backlog.delivering, backlog.dead) == (2, 0, 1)
    assert backlog.oldest_pending_received_at == T0 + timedelta(seconds=1)


# --- PostgreSQL: the database's clock, whatever the caller's -----------------------------------

OFF_BY = timedelta(hours=1)


@pytest.fixture
async def postgres_harness(postgres_database: OutboxDatabase) -> AsyncIterator[Harness]:
    async with harness_on(postgres_database) as made:
        yield made


async def database_now(harness: Harness) -> datetime:
    async with harness.engine.connect() as connection:
        moment = await connection.scalar(sa.text("SELECT clock_timestamp()"))
    assert isinstance(moment, datetime)
    return moment


async def seconds_left(harness: Harness, column: str) -> list[tuple[str | None, float]]:
    """Each row's owner, and the seconds from the database's clock to its moment `column`."""
    sql = (
        f"SELECT claimed_by, extract(epoch FROM {column} - clock_timestamp()) AS left_s "
        "FROM outbox ORDER BY id"
    )
    async with harness.engine.connect() as connection:
        rows = (await connection.execute(sa.text(sql))).all()
    return [(row.claimed_by, float(row.left_s)) for row in rows]


@pytest.mark.postgres
@pytest.mark.parametrize("direction", [1, -1], ids=["ahead", "behind"])
async def test_postgresql_settles_rows_on_its_own_clock(
    postgres_harness: Harness, direction: int
) -> None:
    """A caller whose clock is an hour ahead takes nothing unsettled; one an hour behind takes
    what is settled: the window is measured on the database's clock (issue 10, fault 6)."""
    harness = postgres_harness
    await harness.add(incoming("call.created", 1, 100, await database_now(harness)))
    skewed = datetime.now(UTC) + direction * OFF_BY
    claim = harness.delivery.claim
    if direction > 0:
        assert await claim("a", skewed, SETTLE, LEASE, 10, 10) == []
    await harness.add(incoming("call.created", 2, 100, await database_now(harness) - SETTLE))
    claimed = await claim("a", skewed, SETTLE, LEASE, 10, 10)
    assert [row.ordering_key for row in claimed] == ["call:2"]


@pytest.mark.postgres
@pytest.mark.parametrize("direction", [1, -1], ids=["ahead", "behind"])
async def test_postgresql_leases_on_its_own_clock(
    postgres_harness: Harness, direction: int
) -> None:
    """Whatever a drainer's clock says, its lease lasts LEASE on the database's clock, and no
    drainer (its clock an hour ahead, or right) takes a live lease (issue 10, fault 6)."""
    harness = postgres_harness
    [row_id] = await harness.add(
        incoming("call.created", 1, 100, await database_now(harness) - SETTLE)
    )
    real = datetime.now(UTC)
    holder, other = ("skewed", "right") if direction < 0 else ("right", "skewed")
    clocks = {"right": real, "skewed": real + direction * OFF_BY}
    assert await harness.delivery.claim(holder, clocks[holder], SETTLE, LEASE, 10, 10)
    [(owner, left)] = await seconds_left(harness, "claimed_until")
    assert owner == holder
    assert LEASE.total_seconds() - 5 < left <= LEASE.total_seconds()
    # The other drainer, an hour ahead or on time, finds the lease live: it takes nothing.
    assert await harness.delivery.claim(other, clocks[other] + OFF_BY, SETTLE, LEASE, 10, 10) == []
    assert await harness.delivery.renew(holder, [row_id], clocks[holder], LEASE * 2) == 1
    [(owner, left)] = await seconds_left(harness, "claimed_until")
    assert (owner, left > LEASE.total_seconds()) == (holder, True)
    # A retry is due 30 s after the record by the database's clock, not by the drainer's.
    retry = RetryRows(ids=[row_id], after=timedelta(seconds=30), error="Segment answered 503")
    request = record([row_id], clocks[holder], 503, "retry")
    assert (await harness.delivery.finish(holder, request, retry=retry)).retried == 1
    [(owner, due_in)] = await seconds_left(harness, "next_attempt_at")
    assert owner is None and 25 < due_in <= 30


@pytest.mark.postgres
async def test_postgresql_requeues_rows_due_on_its_own_clock(postgres_harness: Harness) -> None:
    """`outbox requeue` run on a host whose clock is an hour ahead makes the rows due now, by
    the database's clock, not in an hour (issue 10, fault 6)."""
    harness = postgres_harness
    [row_id] = await harness.add(
        incoming("call.created", 1, 100, await database_now(harness) - SETTLE)
    )
    real = datetime.now(UTC)
    assert await harness.delivery.claim("a", real, SETTLE, LEASE, 10, 10)
    dead = [DeadRows(ids=[row_id], reason="bad")]
    await harness.delivery.finish("a", record([row_id], real, 400, "rejected"), dead=dead)
    inspector = OutboxInspector(harness.engine)
    assert await inspector.requeue(EventFilter(ids=(row_id,)), real + OFF_BY, dry_run=False) == 1
    claimed = await harness.delivery.claim("b", real, SETTLE, LEASE, 10, 10)
    assert [row.id for row in claimed] == [row_id]
