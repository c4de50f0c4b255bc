"""The drainer against the fake Segment over real HTTP: order, the late `call.ended`, late
events, duplicates, every fault kind, rate limits, and a long run with random faults.

Windows are short (a settle window of a fraction of a second, retries in tens of
milliseconds) so that the tests never sleep for real minutes.
"""

from __future__ import annotations

import functools
import random
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
import structlog.testing

from relay import aircall
from relay.db.delivery import DeliveryStore
from relay.db.engine import create_engine
from relay.db.store import OutboxStore
from relay.drainer.config import DrainerConfig
from relay.drainer.loop import Drainer
from relay.drainer.sender import SegmentSender
from relay.segment import MappingOptions
from relay.testing import ChaosEntry, FakeSegment, Fault, SourceConfig
from tests.support import OutboxDatabase, call_lifecycle, sample, sample_events
from tests.support import incoming_event as incoming

pytestmark = pytest.mark.anyio

WRITE_KEY = "wk_drainer_tests_0123456789"

FAST = DrainerConfig(
    batch_size=50,
    concurrency=4,
    events_per_second=0,
    requests_per_second=0,
    settle_seconds=0.3,
    lease_seconds=30,
    poll_seconds=0.02,
    retry_base_seconds=0.05,
    retry_cap_seconds=0.3,
    max_retry_after_seconds=5,
    shutdown_grace_seconds=5,
    configuration_retry_seconds=0.5,
)


@pytest.fixture
def fake() -> Iterator[FakeSegment]:
    with FakeSegment(write_keys={WRITE_KEY: SourceConfig()}) as server:
        yield server


class Relay:
    """An outbox (receiver side) and a drainer sending to the fake, in this event loop."""

    def __init__(
        self,
        database: OutboxDatabase,
        fake: FakeSegment,
        config: DrainerConfig,
        database_timeout_seconds: float = 2.0,
    ) -> None:
        self.database = database
        self.fake = fake
        self.config = config
        self.engine = create_engine(database.url, timeout_seconds=database_timeout_seconds)
        self.outbox = OutboxStore(self.engine)
        self.delivery = DeliveryStore(self.engine)

    def drainer(
        self,
        write_key: str = WRITE_KEY,
        timeout_seconds: float = 5.0,
        clock_off_by: timedelta = timedelta(0),
    ) -> Drainer:
        """A drainer of its own (its own store); `clock_off_by`: its host's clock is that far
        ahead (or behind, if negative)."""
        sender = SegmentSender(self.fake.base_url, write_key, timeout_seconds, max_connections=8)
        return Drainer(
            DeliveryStore(self.engine),
            sender,
            self.config,
            MappingOptions(),
            clock=lambda: datetime.now(UTC) + clock_off_by,
        )

    async def receive(self, *bodies: dict[str, Any], received_at: datetime | None = None) -> None:
        """Store `bodies` as the receiver does; `received_at` None: stamped by the write, on the
        database's clock."""
        await self.outbox.insert_events([incoming(body, received_at) for body in bodies])

    async def wait_accepted(self, count: int, within: float = 30) -> None:
        await anyio.to_thread.run_sync(
            functools.partial(self.fake.wait_for, count=count, timeout=within)
        )

    async def wait_settled(self, count: int, within: float = 30) -> None:
        """Until `count` rows are delivered or dead: the fake may have accepted a batch whose
        answer the drainer never saw (an after-accept fault), so its count is not enough."""
        with anyio.fail_after(within):
            while True:
                rows = await self.rows(
                    "SELECT count(*) AS n FROM outbox WHERE status IN ('delivered', 'dead')"
                )
                if rows[0]["n"] >= count:
                    return
                await anyio.sleep(0.05)

    async def rows(self, sql: str = "SELECT * FROM outbox ORDER BY id") -> list[dict[str, Any]]:
        return await self.database.rows_async(sql)


@asynccontextmanager
async def draining(drainer: Drainer) -> AsyncIterator[Drainer]:
    stop = anyio.Event()
    async with anyio.create_task_group() as group:
        group.start_soon(drainer.run, stop)
        try:
            yield drainer
        finally:
            stop.set()
    assert isinstance(drainer.sender, SegmentSender)
    await drainer.sender.close()


@pytest.fixture
async def relay(database: OutboxDatabase, fake: FakeSegment) -> AsyncIterator[Relay]:
    made = Relay(database, fake, FAST)
    yield made
    await made.engine.dispose()


def call_id_of(message: dict[str, Any]) -> int:
    return int(message["properties"]["call_id"])


def accepted_events_of(fake: FakeSegment, call: int) -> list[str]:
    return [
        message["event"]
        for message in fake.accepted()
        if message["event"].startswith("call.") and call_id_of(message) == call
    ]


# --- order --------------------------------------------------------------------------------------


# The order tests post their webhooks one commit at a time while the drainer runs, all of them
# "received" at the moment posting starts: they are within the settle window as long as posting
# takes less than it. 0.3 s was too short on a loaded machine (the later commits then arrived
# after the earlier ones had been delivered, and were rightly delivered late).
ORDERED = replace(FAST, settle_seconds=1.5)


@pytest.fixture
async def ordered_relay(database: OutboxDatabase, fake: FakeSegment) -> AsyncIterator[Relay]:
    made = Relay(database, fake, ORDERED)
    yield made
    await made.engine.dispose()


async def test_a_calls_events_shuffled_within_the_window_arrive_in_order(
    ordered_relay: Relay, fake: FakeSegment
) -> None:
    relay = ordered_relay
    events = call_lifecycle(1903456789)
    shuffled = events[:]
    random.Random(3).shuffle(shuffled)
    async with draining(relay.drainer()):
        received_at = datetime.now(UTC)
        for body in shuffled:  # one webhook at a time, all within the settle window
            await relay.receive(body, received_at=received_at)
        await relay.wait_accepted(12)
    assert accepted_events_of(fake, 1903456789) == [body["event"] for body in events]
    fake.assert_no_discards()
    fake.assert_no_duplicates()
    rows = await relay.rows()
    assert {row["status"] for row in rows} == {"delivered"}
    assert not any(row["late"] for row in rows)


async def test_many_calls_interleaved_keep_their_own_order(
    ordered_relay: Relay, fake: FakeSegment
) -> None:
    relay = ordered_relay
    calls = [7_000_000 + n for n in range(40)]
    streams = {call: call_lifecycle(call, shift_seconds=n) for n, call in enumerate(calls)}
    mixed = [body for stream in streams.values() for body in stream]
    random.Random(11).shuffle(mixed)
    async with draining(relay.drainer()):
        received_at = datetime.now(UTC)
        for start in range(0, len(mixed), 60):
            await relay.receive(*mixed[start : start + 60], received_at=received_at)
        await relay.wait_accepted(len(mixed))
    for call, stream in streams.items():
        assert accepted_events_of(fake, call) == [body["event"] for body in stream]
    fake.assert_no_duplicates()
    fake.assert_max_batch_events(FAST.batch_size)


async def test_call_ended_half_a_minute_after_hangup_stalls_nothing(
    relay: Relay, fake: FakeSegment
) -> None:
    """`call.ended` comes after `call.hungup`, with `call.tagged` and `call.commented` arriving
    in between (30 s compressed to about 1.5 s): each is delivered when it settles, without
    waiting for `call.ended`, another call flows meanwhile, and the order by timestamp holds."""
    call = call_lifecycle(55)
    by_name = {body["event"]: body for body in call}
    ended = by_name["call.ended"]
    tagged, commented = by_name["call.tagged"], by_name["call.commented"]
    # Aircall's timestamps as they would be: tag and comment made during wrap-up, before the
    # call.ended payload was built.
    tagged["timestamp"] = ended["timestamp"] - 20
    commented["timestamp"] = ended["timestamp"] - 10
    other = call_lifecycle(66)
    async with draining(relay.drainer()):
        await relay.receive(*call[:6])  # created ... hungup
        await relay.wait_accepted(6)
        await relay.receive(tagged)
        await relay.receive(other[0])
        await relay.wait_accepted(8)
        await relay.receive(commented)
        await relay.wait_accepted(9)
        await relay.receive(ended)
        await relay.receive(*other[1:3])
        await relay.wait_accepted(12)
    assert accepted_events_of(fake, 55) == [
        "call.created",
        "call.ringing_on_agent",
        "call.agent_declined",
        "call.answered",
        "call.transferred",
        "call.hungup",
        "call.tagged",
        "call.commented",
        "call.ended",
    ]
    assert accepted_events_of(fake, 66) == [body["event"] for body in other[:3]]
    rows = await relay.rows()
    assert not any(row["late"] for row in rows)


async def test_an_event_older_than_one_already_delivered_is_sent_and_flagged_late(
    relay: Relay, fake: FakeSegment
) -> None:
    call = call_lifecycle(77)
    ended, tagged = call[6], call[7]
    async with draining(relay.drainer()) as drainer:
        await relay.receive(tagged)
        await relay.wait_accepted(1)
        await relay.receive(ended)  # its timestamp is before tagged's
        await relay.wait_accepted(2)
    assert accepted_events_of(fake, 77) == ["call.tagged", "call.ended"]
    [message] = [m for m in fake.accepted() if m["event"] == "call.ended"]
    assert message["originalTimestamp"].startswith("2026-03-10T14:07:48")
    late = {row["event"]: row["late"] for row in await relay.rows()}
    assert late == {"call.tagged": False, "call.ended": True}
    assert drainer.summary.late == 1


async def test_a_duplicate_webhook_is_sent_once(relay: Relay, fake: FakeSegment) -> None:
    body = sample("call.created")
    del body["token"]
    async with draining(relay.drainer()):
        await relay.receive(body)
        await relay.receive(body)
        await relay.wait_accepted(1)
        await anyio.sleep(FAST.settle_seconds * 2)
    assert len(fake.accepted()) == 1
    assert fake.stats()["duplicates"] == 0
    [row] = await relay.rows()
    assert row["received_count"] == 2


# --- clocks -------------------------------------------------------------------------------------


CLOCK_OFF_BY = timedelta(seconds=120)  # more than the settle window and the lease (30 s)


@pytest.mark.postgres
@pytest.mark.parametrize("direction", [1, -1], ids=["ahead", "behind"])
async def test_a_drainer_whose_clock_is_off_settles_on_the_database_clock(
    postgres_database: OutboxDatabase, fake: FakeSegment, direction: int
) -> None:
    """On PostgreSQL the settle window is measured on the database's clock: a drainer whose
    clock is ahead takes nothing early, one whose clock is behind is not held back (issue 10,
    fault 6: each used its own clock, and took rows early or minutes late)."""
    settle = 1.0
    relay = Relay(postgres_database, fake, replace(FAST, settle_seconds=settle))
    bodies = _call_bodies(1)
    async with draining(relay.drainer(clock_off_by=direction * CLOCK_OFF_BY)):
        received = datetime.now(UTC)  # this host's clock is the database's
        await relay.receive(*bodies, received_at=received)
        await relay.wait_accepted(len(bodies), within=15)
    await relay.engine.dispose()
    for entry in fake.requests():
        sent = datetime.fromisoformat(entry["received_at"])
        assert sent - received >= timedelta(seconds=settle - 0.05)
    fake.assert_no_duplicates()


@pytest.mark.postgres
async def test_a_drainer_whose_clock_is_ahead_steals_no_live_lease(
    postgres_database: OutboxDatabase, fake: FakeSegment
) -> None:
    """On PostgreSQL a lease's end is the database's clock plus the lease, and its expiry is
    checked on the same clock: a drainer whose clock is two minutes ahead does not take the
    rows of a drainer whose request is in flight (issue 10, fault 6)."""
    relay = Relay(postgres_database, fake, FAST)
    fake.inject(Fault.latency(3000, accept="after_accept"))  # the first answer takes 3 s
    bodies = _call_bodies(1)
    first = relay.drainer()
    with structlog.testing.capture_logs() as logs:
        async with draining(first):
            await relay.receive(*bodies, received_at=datetime.now(UTC))
            await relay.wait_accepted(len(bodies))  # accepted; the answer is still coming
            async with draining(relay.drainer(clock_off_by=CLOCK_OFF_BY)):
                await relay.wait_settled(len(bodies))
                await anyio.sleep(1.5)  # it looks for expired leases once a second
    await relay.engine.dispose()
    fake.assert_no_duplicates()
    assert len(fake.requests()) == 1
    rows = await relay.rows("SELECT drainer, outcome FROM delivery_requests")
    assert rows == [{"drainer": first.owner, "outcome": "delivered"}]
    assert not [entry for entry in logs if entry["event"] == "lease_lost"]


# --- what Segment answers -------------------------------------------------------------------


def _call_bodies(call: int, count: int = 3) -> list[dict[str, Any]]:
    return call_lifecycle(call)[:count]


@pytest.mark.parametrize(
    "fault",
    [
        Fault.status(500),
        Fault.status(502),
        Fault.status(503, headers={"Retry-After": "0"}),
        Fault.status(504),
        Fault.reset("after_body_read"),
        Fault.reset("after_headers_read"),
        Fault.close("after_body_read"),
        Fault.reset("mid_response", accept="after_accept"),
        Fault.close("after_body_read", accept="after_accept"),
        Fault.status(500, accept="after_accept"),
        Fault.bad_success("", code=202),
        Fault.hang(3000),
        Fault.latency(3000, accept="after_accept"),
    ],
    ids=lambda fault: f"{fault.kind}-{fault.code or fault.phase or ''}-{fault.accept}",
)
async def test_transient_faults_are_retried_until_accepted_once(
    relay: Relay, fake: FakeSegment, fault: Fault
) -> None:
    fake.inject(fault, times=2)
    bodies = _call_bodies(1)
    async with draining(relay.drainer(timeout_seconds=1.0)):
        await relay.receive(*bodies)
        await relay.wait_settled(3)
    message_ids = [message["messageId"] for message in fake.accepted()]
    assert len(message_ids) == len(set(message_ids)) == 3
    assert accepted_events_of(fake, 1) == [body["event"] for body in bodies]
    rows = await relay.rows()
    assert {row["status"] for row in rows} == {"delivered"}
    assert all(row["attempts"] == 3 for row in rows)  # two failures, then the success
    requests = await relay.rows("SELECT * FROM delivery_requests ORDER BY started_at")
    assert [request["outcome"] for request in requests] == ["retry", "retry", "delivered"]


async def test_429_waits_for_retry_after_for_all_sending_and_resends_the_same_ids(
    relay: Relay, fake: FakeSegment
) -> None:
    fake.inject(Fault.rate_limited(1))
    async with draining(relay.drainer()):
        await relay.receive(*_call_bodies(1), *_call_bodies(2))
        await relay.wait_accepted(6)
    log = fake.requests()
    [limited] = [entry for entry in log if entry["status"] == 429]
    after = [entry for entry in log if entry["seq"] > limited["seq"]]
    assert after
    limited_at = datetime.fromisoformat(limited["received_at"])
    for entry in after:  # nothing at all was sent during the wait
        assert datetime.fromisoformat(entry["received_at"]) - limited_at >= timedelta(seconds=0.95)
    first_ids = [message["messageId"] for message in limited["decoded_body"]["batch"]]
    resent = [message["messageId"] for entry in after for message in entry["decoded_body"]["batch"]]
    assert set(first_ids) <= set(resent)
    sent_at = {entry["decoded_body"]["sentAt"] for entry in [limited, *after]}
    assert len(sent_at) == 1 + len(after)  # sentAt is fresh on every attempt
    rows = await relay.rows()
    # The 429 judged the sender, not the rows: only the delivery counts as an attempt.
    assert any(row["last_http_status"] == 200 for row in rows)
    assert {row["attempts"] for row in rows} == {1}


async def test_429_with_a_retry_after_date_in_zone_minus_0000_pauses_and_is_recorded(
    relay: Relay, fake: FakeSegment
) -> None:
    """`Retry-After: <date> -0000` parsed as a naive datetime made the wait a TypeError: no
    pause, no request record, and the rows waited for their lease (issue 10, fault 5)."""
    until = (datetime.now(UTC) + timedelta(seconds=3)).replace(microsecond=0)
    fake.inject(
        Fault.status(429, headers={"Retry-After": until.strftime("%a, %d %b %Y %H:%M:%S -0000")})
    )
    async with draining(relay.drainer()):
        await relay.receive(*_call_bodies(1))
        await relay.wait_accepted(3, within=FAST.lease_seconds / 2)
    log = fake.requests()
    [limited] = [entry for entry in log if entry["status"] == 429]
    after = [entry for entry in log if entry["seq"] > limited["seq"]]
    assert after
    for entry in after:  # nothing was sent before the date Segment gave
        assert datetime.fromisoformat(entry["received_at"]) >= until - timedelta(seconds=0.05)
    requests = await relay.rows("SELECT * FROM delivery_requests ORDER BY started_at")
    assert [(request["http_status"], request["outcome"]) for request in requests] == [
        (429, "rate_limited"),
        (200, "delivered"),
    ]


async def test_a_rejected_batch_is_split_and_only_the_bad_message_goes_dead(
    database: OutboxDatabase,
) -> None:
    # This fake refuses events over 6,000 bytes: one event is made larger (the relay's own
    # limit is 32,000), so the whole batch gets 400 until the bad one is alone.
    with FakeSegment(write_keys={WRITE_KEY: SourceConfig()}, max_event_bytes=6000) as fake:
        relay = Relay(database, fake, FAST)
        bodies = [body for call in (1, 2, 3) for body in _call_bodies(call, 2)]
        heavy = bodies[3]
        heavy["data"]["padding"] = "x" * 7000
        async with draining(relay.drainer()) as drainer:
            await relay.receive(*bodies)
            await relay.wait_accepted(5)
            await anyio.sleep(0.5)
        await relay.engine.dispose()
        rows = {row["event"] + str(row["resource_id"]): row for row in await relay.rows()}
        [dead] = [row for row in rows.values() if row["status"] == "dead"]
        assert dead["resource_id"] == "2"
        assert dead["event"] == heavy["event"]
        assert dead["last_http_status"] == 400
        assert "400" in dead["last_error"]
        assert sum(row["status"] == "delivered" for row in rows.values()) == 5
        assert drainer.summary.dead == 1
        assert len(fake.accepted()) == 5
        fake.assert_no_duplicates()


async def test_401_pauses_delivery_and_keeps_the_rows(database: OutboxDatabase) -> None:
    with FakeSegment(write_keys={WRITE_KEY: SourceConfig()}, unknown_key_policy="401") as fake:
        relay = Relay(database, fake, replace(FAST, configuration_retry_seconds=30))
        async with draining(relay.drainer(write_key="wk_wrong_key_0000000000")) as drainer:
            await relay.receive(*_call_bodies(1))
            with anyio.fail_after(10):
                while drainer.summary.requests == 0:
                    await anyio.sleep(0.05)
            await anyio.sleep(0.5)
            assert drainer.summary.requests == 1  # paused: no hammering with a bad key
        await relay.engine.dispose()
        rows = await relay.rows()
        assert {row["status"] for row in rows} == {"pending"}
        assert {row["last_http_status"] for row in rows} == {401}
        assert {row["attempts"] for row in rows} == {0}  # a pause is no failed attempt
        assert "RELAY_SEGMENT_WRITE_KEY" in rows[0]["last_error"]
        assert fake.accepted() == []


async def test_pauses_and_429s_do_not_use_up_max_attempts(relay: Relay, fake: FakeSegment) -> None:
    """With RELAY_MAX_ATTEMPTS=2, configuration pauses (a wrong write key for a while) and 429s
    used to count, and the first 5xx after them killed the rows (issue 10, fault 5). Only
    failed deliveries count: one 5xx, then the delivery, is two attempts."""
    for fault in (
        Fault.status(401),
        Fault.rate_limited(0),
        Fault.status(403),
        Fault.rate_limited(0),
        Fault.status(503),
    ):
        fake.inject(fault)
    relay.config = replace(FAST, max_attempts=2, configuration_retry_seconds=0.2)
    bodies = _call_bodies(1)
    async with draining(relay.drainer()) as drainer:
        await relay.receive(*bodies)
        await relay.wait_settled(len(bodies))
    rows = await relay.rows()
    assert {row["status"] for row in rows} == {"delivered"}
    assert {row["attempts"] for row in rows} == {2}
    assert drainer.summary.dead == 0
    requests = await relay.rows("SELECT * FROM delivery_requests ORDER BY started_at")
    assert [request["http_status"] for request in requests] == [401, 429, 403, 429, 503, 200]


async def test_unsendable_events_go_dead_without_being_sent(
    relay: Relay, fake: FakeSegment
) -> None:
    huge = sample("user.created")
    del huge["token"]
    huge["data"]["substatus"] = "y" * 40_000  # cannot be trimmed under 32 KB
    async with draining(relay.drainer()):
        await relay.receive(huge, *_call_bodies(1, 1))
        await relay.wait_accepted(1)
        await anyio.sleep(0.3)
    rows = {row["event"]: row for row in await relay.rows()}
    assert rows["user.created"]["status"] == "dead"
    assert (
        "too_large" in rows["user.created"]["last_error"]
        or "bytes" in rows["user.created"]["last_error"]
    )
    assert rows["call.created"]["status"] == "delivered"


async def test_token_buckets_hold_the_event_rate(
    database: OutboxDatabase, fake: FakeSegment
) -> None:
    config = replace(FAST, batch_size=10, events_per_second=40, requests_per_second=0)
    relay = Relay(database, fake, config)
    bodies = [body for call in range(1, 11) for body in call_lifecycle(call)]  # 120 events
    async with draining(relay.drainer()) as drainer:
        await relay.receive(*bodies)
        await relay.wait_accepted(len(bodies), within=60)
    await relay.engine.dispose()
    times = sorted(
        (datetime.fromisoformat(entry["received_at"]), entry["message_count"])
        for entry in fake.requests()
    )
    # Over any window, at most one second's burst plus the rate times the window's length.
    for index, (start, _) in enumerate(times):
        sent = 0
        for moment, count in times[index:]:
            sent += count
            window = (moment - start).total_seconds()
            assert sent <= 40 + 10 + 40 * window + 1e-6, (sent, window)
    assert drainer.metrics.rate_limit_wait.labels(cause="token_bucket")._value.get() > 0


async def test_two_thousand_events_with_random_faults_are_each_accepted_once(
    relay: Relay, fake: FakeSegment
) -> None:
    fake.set_chaos(
        [
            ChaosEntry(Fault.status(500), 0.08),
            ChaosEntry(Fault.status(503), 0.04),
            ChaosEntry(Fault.rate_limited(0), 0.04),
            ChaosEntry(Fault.reset("after_body_read"), 0.04),
            ChaosEntry(Fault.reset("mid_response", accept="after_accept"), 0.05),
            ChaosEntry(Fault.status(502, accept="after_accept"), 0.05),
        ],
        seed=2026,
    )
    calls = range(9_100_000, 9_100_000 + 167)
    bodies = [body for call in calls for body in call_lifecycle(call)][:2000]
    random.Random(5).shuffle(bodies)
    async with draining(relay.drainer(timeout_seconds=2.0)):
        for start in range(0, len(bodies), 100):
            await relay.receive(*bodies[start : start + 100])
        await relay.wait_settled(2000, within=120)
    accepted = [message["messageId"] for message in fake.accepted()]
    assert len(accepted) == len(set(accepted)) == 2000
    expected = {aircall.validate_envelope(body).message_id for body in bodies}
    assert set(accepted) == expected
    assert fake.stats()["duplicates"] > 0  # after_accept faults made re-sends: Segment dropped them
    fake.assert_no_discards()
    rows = await relay.rows("SELECT status, count(*) AS n FROM outbox GROUP BY status")
    assert rows == [{"status": "delivered", "n": 2000}]


async def test_a_locked_database_delays_delivery_but_loses_nothing(
    sqlite_database: OutboxDatabase, fake: FakeSegment
) -> None:
    """Another process holds the SQLite write lock for seconds, longer than the busy timeout:
    claims and the recording of answers fail and are retried; the drainer carries on."""
    import sqlite3

    relay = Relay(
        sqlite_database, fake, replace(FAST, lease_seconds=4), database_timeout_seconds=0.2
    )
    path = sqlite_database.url.split("///", 1)[1]
    bodies = [body for call in (1, 2, 3) for body in call_lifecycle(call)]
    await relay.receive(*bodies, received_at=datetime.now(UTC) - timedelta(seconds=10))
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    with structlog.testing.capture_logs() as logs:
        async with draining(relay.drainer()):
            await anyio.sleep(1.5)
            holder.execute("ROLLBACK")
            await relay.wait_settled(len(bodies), within=30)
    holder.close()
    await relay.engine.dispose()
    assert any(entry["event"] == "claim_failed" for entry in logs)
    message_ids = [message["messageId"] for message in fake.accepted()]
    assert len(message_ids) == len(set(message_ids)) == len(bodies)
    for call in (1, 2, 3):
        assert accepted_events_of(fake, call) == [body["event"] for body in call_lifecycle(call)]


# --- where requests go, and Segment out of reach (issue 10, item 11) ---------------------------


async def _until_logged(logs: list[dict[str, Any]], event: str, count: int = 1) -> None:
    with anyio.fail_after(30):
        while sum(entry["event"] == event for entry in logs) < count:
            await anyio.sleep(0.02)


async def test_a_segment_url_that_never_answers_is_named_and_reported_once(relay: Relay) -> None:
    """A wrong RELAY_SEGMENT_BASE_URL (nothing listens there): `drainer_started` and every
    failed request name the base URL, never the key; past `unreachable_alert_seconds` it is
    said once at error level, however long the failures go on. The rows wait, pending."""
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        base_url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    sender = SegmentSender(base_url, WRITE_KEY, timeout_seconds=1.0, max_connections=8)
    config = replace(FAST, unreachable_alert_seconds=0.5)
    with structlog.testing.capture_logs() as logs:
        async with draining(Drainer(relay.delivery, sender, config, MappingOptions())):
            await relay.receive(*_call_bodies(1))
            await _until_logged(logs, "segment_unreachable")
            failed = sum(entry["event"] == "segment_request" for entry in logs)
            await _until_logged(logs, "segment_request", failed + 5)  # and it goes on failing
    [started] = [entry for entry in logs if entry["event"] == "drainer_started"]
    assert started["segment_base_url"] == base_url
    requests = [entry for entry in logs if entry["event"] == "segment_request"]
    assert all(entry["status"] is None for entry in requests)
    assert all(entry["segment_base_url"] == base_url for entry in requests)
    [alert] = [entry for entry in logs if entry["event"] == "segment_unreachable"]
    assert alert["log_level"] == "error"
    assert alert["segment_base_url"] == base_url
    assert alert["failing_s"] >= 0.5
    assert "RELAY_SEGMENT_BASE_URL" in alert["detail"]
    assert WRITE_KEY not in repr(logs)
    assert {row["status"] for row in await relay.rows()} == {"pending"}


async def test_segment_out_of_reach_again_after_it_answered_is_reported_again(
    database: OutboxDatabase, fake: FakeSegment
) -> None:
    relay = Relay(database, fake, replace(FAST, unreachable_alert_seconds=0.5))
    try:
        with structlog.testing.capture_logs() as logs:
            async with draining(relay.drainer(timeout_seconds=1.0)):
                for outage, call in enumerate((1, 2), start=1):
                    fake.inject(Fault.reset("after_body_read"), times=None)  # no answer at all
                    await relay.receive(*_call_bodies(call))
                    await _until_logged(logs, "segment_unreachable", outage)
                    fake.reset()  # Segment answers again
                    await relay.wait_settled(3 * outage)
                    await _until_logged(logs, "segment_reachable", outage)
    finally:
        await relay.engine.dispose()
    said = [
        entry["event"]
        for entry in logs
        if entry["event"] in ("segment_unreachable", "segment_reachable")
    ]
    assert said == ["segment_unreachable", "segment_reachable"] * 2
    assert all(
        entry["segment_base_url"] == fake.base_url
        for entry in logs
        if entry["event"] in ("segment_unreachable", "segment_reachable")
    )
    assert {row["status"] for row in await relay.rows()} == {"delivered"}


# --- the warehouse ------------------------------------------------------------------------------


async def test_no_property_lands_on_a_reserved_warehouse_column(
    sqlite_database: OutboxDatabase, fake: FakeSegment
) -> None:
    """Every sample event, and one whose data has keys named like Segment's own columns, through
    the drainer to the fake, which lists the reserved columns each message's properties would
    fill with the relay's own list (relay/snakecase.py): none but a user event's `user_id`, which
    holds the same value as its `userId`."""
    named_like_columns = sample("contact.updated")
    named_like_columns["data"].update(
        {"uuid": "u", "uuid_ts": 1, "loaded_at": 2, "context": {"ip": "x"}, "event": "e"}
    )
    bodies = [*(sample(event) for event in sample_events()), named_like_columns]
    relay = Relay(sqlite_database, fake, FAST)
    try:
        async with draining(relay.drainer()):
            await relay.receive(*bodies)
            await relay.wait_accepted(len(bodies))
    finally:
        await relay.engine.dispose()
    fake.assert_no_discards()
    for message in fake.accepted():
        if message["event"].startswith("user."):
            assert message["dropped_columns"] == ["user_id"], message["event"]
            assert str(message["properties"]["user_id"]) == message["userId"]
        else:
            assert message["dropped_columns"] == [], message["event"]
    [renamed] = [message for message in fake.accepted() if "contact_uuid" in message["properties"]]
    assert {"contact_uuid_ts", "contact_loaded_at", "contact_context"} <= set(renamed["properties"])
