"""LISTEN/NOTIFY on PostgreSQL: a receiver's commit of new rows sends exactly one notification,
a rolled-back one none; a drainer that polls only every 30 s still delivers a new event as soon
as it settles; the listener comes back after its connection is killed, and the drainer polls
while it is away.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import asyncpg
import httpx
import pytest
import structlog.testing
from sqlalchemy import text

from relay.db import DatabaseError
from relay.db.delivery import DeliveryStore
from relay.db.engine import create_engine
from relay.db.inspect import EventFilter, OutboxInspector
from relay.db.notify import APPLICATION_NAME, CHANNEL, OutboxListener, connect_arguments
from relay.db.store import IncomingEvent, OutboxStore
from relay.drainer.config import DrainerConfig
from relay.drainer.loop import Drainer
from relay.drainer.sender import SegmentSender
from relay.segment import MappingOptions
from relay.testing import FakeSegment, Fault, SourceConfig
from tests.conftest import make_settings
from tests.support import OutboxDatabase, incoming_event, running_receiver, sample

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

WRITE_KEY = "wk_notify_tests_0123456789"
# Polling alone would take 30 s: anything delivered sooner was woken by a notification.
SLOW_POLL = DrainerConfig(
    batch_size=50,
    concurrency=2,
    events_per_second=0,
    requests_per_second=0,
    settle_seconds=0.3,
    lease_seconds=30,
    poll_seconds=30,
    listen_poll_seconds=30,
    shutdown_grace_seconds=5,
)


def call_created(call_id: int) -> dict[str, Any]:
    body = sample("call.created")
    body["data"]["id"] = call_id
    return body


def event(call_id: int, forward: bool = True, received_at: datetime | None = None) -> IncomingEvent:
    body = call_created(call_id)
    del body["token"]
    made: IncomingEvent = incoming_event(body, received_at or datetime.now(UTC))
    if not forward:
        made = replace(made, forward=False, skip_reason="not forwarded")
    return made


class Heard:
    """Notifications on the outbox channel, heard on a plain asyncpg connection."""

    def __init__(self) -> None:
        self.payloads: list[str] = []

    def __call__(self, _connection: Any, _pid: int, _channel: str, payload: str) -> None:
        self.payloads.append(payload)

    async def settle(self, quiet_seconds: float = 0.5) -> list[str]:
        """The payloads, once none has arrived for `quiet_seconds`."""
        while True:
            seen = len(self.payloads)
            await anyio.sleep(quiet_seconds)
            if len(self.payloads) == seen:
                return list(self.payloads)


@asynccontextmanager
async def listening(database: OutboxDatabase) -> AsyncIterator[Heard]:
    heard = Heard()
    connection = await asyncpg.connect(**connect_arguments(database.url))
    try:
        await connection.add_listener(CHANNEL, heard)
        yield heard
    finally:
        await connection.close()


@pytest.fixture
async def store(postgres_database: OutboxDatabase) -> AsyncIterator[OutboxStore]:
    made = OutboxStore(create_engine(postgres_database.url, timeout_seconds=2.0))
    yield made
    await made.engine.dispose()


# --- the NOTIFY ---------------------------------------------------------------------------------


async def test_a_commit_of_new_rows_sends_one_notification_and_duplicates_none(
    postgres_database: OutboxDatabase, store: OutboxStore
) -> None:
    async with listening(postgres_database) as heard:
        await store.insert_events([event(1), event(2), event(3), event(3)])
        assert await heard.settle() == ["3"]  # one per commit, counting the new rows
        await store.insert_events([event(1), event(2)])  # duplicates only
        await store.insert_events([event(9, forward=False)])  # skipped: nothing to deliver
        assert await heard.settle() == ["3"]
        await store.insert_events([event(1), event(4)])  # one duplicate, one new
        assert await heard.settle() == ["3", "1"]


async def test_a_rolled_back_commit_sends_no_notification(
    postgres_database: OutboxDatabase, store: OutboxStore
) -> None:
    # A deferred trigger that fails at COMMIT, after the INSERT and the NOTIFY have run.
    admin = await asyncpg.connect(**connect_arguments(postgres_database.url))
    try:
        await admin.execute(
            """
            CREATE FUNCTION refuse_doomed() RETURNS trigger LANGUAGE plpgsql AS
              $$ BEGIN RAISE EXCEPTION 'doomed row'; END $$;
            CREATE CONSTRAINT TRIGGER refuse_doomed AFTER INSERT ON outbox
              DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
              WHEN (NEW.source = 'doomed') EXECUTE FUNCTION refuse_doomed();
            """
        )
    finally:
        await admin.close()

    async with listening(postgres_database) as heard:
        with pytest.raises(DatabaseError, match="doomed row"):
            await store.insert_events([event(1), replace(event(2), source="doomed")])
        assert await heard.settle() == []
        assert await postgres_database.rows_async("SELECT id FROM outbox") == []
        await store.insert_events([event(1)])  # the listener was listening all along
        assert await heard.settle() == ["1"]


async def test_the_receivers_group_commits_send_one_notification_each(
    postgres_database: OutboxDatabase,
) -> None:
    bodies = [json.dumps(call_created(100 + n)).encode() for n in range(40)]

    def post_all() -> list[int]:
        with (
            httpx.Client(base_url=receiver.url, timeout=10) as client,
            concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool,
        ):
            answers = pool.map(
                lambda body: client.post(
                    "/aircall/webhook",
                    content=body,
                    headers={"content-type": "application/json"},
                ),
                bodies,
            )
            return [answer.status_code for answer in answers]

    with running_receiver(make_settings(postgres_database)) as receiver:
        batcher = receiver.app.extensions["relay"].batcher
        async with listening(postgres_database) as heard:
            assert await anyio.to_thread.run_sync(post_all) == [200] * len(bodies)
            payloads = await heard.settle()
            commits = batcher.batches_written
            assert len(payloads) == commits  # every commit held new rows: one each
            assert sum(int(payload) for payload in payloads) == len(bodies)
            assert await anyio.to_thread.run_sync(post_all) == [200] * len(bodies)
            assert await heard.settle() == payloads  # duplicates wake no drainer
            assert batcher.batches_written > commits


# --- the drainer, woken -------------------------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeSegment]:
    with FakeSegment(write_keys={WRITE_KEY: SourceConfig()}) as server:
        yield server


@asynccontextmanager
async def draining(
    database: OutboxDatabase,
    fake: FakeSegment,
    listener: OutboxListener | None,
    config: DrainerConfig = SLOW_POLL,
) -> AsyncIterator[Drainer]:
    engine = create_engine(database.url, timeout_seconds=2.0)
    sender = SegmentSender(fake.base_url, WRITE_KEY, 5.0, max_connections=4)
    drainer = Drainer(
        DeliveryStore(engine), sender, config, MappingOptions(), notifications=listener
    )
    stop = anyio.Event()
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(drainer.run, stop)
            try:
                yield drainer
            finally:
                stop.set()
    finally:
        await sender.close()
        if listener is not None:
            await listener.close()
        await engine.dispose()


async def until(condition: Callable[[], bool], within: float) -> float:
    """Seconds it took for `condition` to hold; fails past `within`."""
    started = time.monotonic()
    with anyio.fail_after(within):
        while not condition():
            await anyio.sleep(0.01)
    return time.monotonic() - started


async def test_a_notification_wakes_the_drainer_when_the_event_has_settled(
    postgres_database: OutboxDatabase, store: OutboxStore, fake: FakeSegment
) -> None:
    listener = OutboxListener(postgres_database.url, timeout_seconds=2.0)
    async with draining(postgres_database, fake, listener):
        await until(lambda: listener.listening, within=5)
        await anyio.sleep(0.5)  # past the wake-up that follows the LISTEN
        for count, call_id in enumerate((501, 502), start=1):
            received = time.monotonic()
            await store.insert_events([event(call_id)])  # received_at: now
            await until(lambda count=count: len(fake.accepted()) == count, within=3)
            # The settle window (0.3 s), then one claim: nowhere near the 30 s poll.
            assert 0.3 <= time.monotonic() - received < 2.0
    assert [int(message["properties"]["call_id"]) for message in fake.accepted()] == [501, 502]


async def test_the_listener_reconnects_after_its_connection_is_killed(
    postgres_database: OutboxDatabase, store: OutboxStore
) -> None:
    listener = OutboxListener(postgres_database.url, timeout_seconds=2.0, retry_base_seconds=0.1)
    commits: list[float] = []
    states: list[bool] = []
    with structlog.testing.capture_logs() as logs:
        async with anyio.create_task_group() as group:
            group.start_soon(
                listener.run, lambda _payload: commits.append(time.monotonic()), states.append
            )
            await until(lambda: listener.listening, within=5)
            first_pid = listener.server_pid
            await terminate_backend(postgres_database, first_pid)
            await until(lambda: listener.connections == 2 and listener.listening, within=3)
            assert listener.server_pid != first_pid
            assert states == [True, False, True]
            await store.insert_events([event(7)])
            await until(lambda: len(commits) == 1, within=2)
            group.cancel_scope.cancel()
    await listener.close()
    events = [entry["event"] for entry in logs if entry["event"].startswith("listen")]
    assert events == ["listening", "listener_lost", "listening"]
    lost = next(entry for entry in logs if entry["event"] == "listener_lost")
    assert lost["log_level"] == "warning"


async def test_the_drainer_polls_while_its_listener_is_away(
    postgres_database: OutboxDatabase, store: OutboxStore, fake: FakeSegment
) -> None:
    listener = OutboxListener(postgres_database.url, timeout_seconds=2.0, retry_base_seconds=5.0)
    # Poll every 50 ms without the listener, every 30 s with it.
    config = replace(SLOW_POLL, poll_seconds=0.05)
    async with draining(postgres_database, fake, listener, config):
        await until(lambda: listener.listening, within=5)
        await anyio.sleep(0.5)
        await terminate_backend(postgres_database, listener.server_pid)
        await until(lambda: not listener.listening, within=2)
        await store.insert_events([event(801)])
        took = await until(lambda: len(fake.accepted()) == 1, within=3)
        assert took < 2.0
        assert not listener.listening  # delivered by polling: the listener waits 5 s to return


async def terminate_backend(database: OutboxDatabase, pid: int | None) -> None:
    assert pid is not None
    admin = await asyncpg.connect(**connect_arguments(database.url))
    try:
        names = await admin.fetch(
            "SELECT application_name FROM pg_stat_activity WHERE pid = $1", pid
        )
        assert [row["application_name"] for row in names] == [APPLICATION_NAME]
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()


async def test_an_operators_requeue_sends_one_notification_counting_the_rows(
    postgres_database: OutboxDatabase, store: OutboxStore
) -> None:
    await store.insert_events([event(1), event(2), event(3)])
    async with store.engine.begin() as connection:
        await connection.execute(text("UPDATE outbox SET status = 'dead', last_error = 'refused'"))
    inspector = OutboxInspector(store.engine)
    async with listening(postgres_database) as heard:
        now = datetime.now(UTC)
        assert await inspector.requeue(EventFilter(), now, dry_run=True) == 3
        assert await inspector.requeue(EventFilter(ids=(1_000_000,)), now, dry_run=False) == 0
        assert await heard.settle() == []  # a dry run, or nothing requeued: no notification
        assert await inspector.requeue(EventFilter(), now, dry_run=False) == 3
        assert await heard.settle() == ["ready:3"]


async def test_a_requeued_row_is_delivered_at_once_not_after_a_settle_window(
    postgres_database: OutboxDatabase, store: OutboxStore, fake: FakeSegment
) -> None:
    """Requeued rows were received long ago: the drainer claims them as soon as it hears of
    them, neither after a settle window (8 s here) nor at its next poll (30 s)."""
    long_ago = datetime.now(UTC) - timedelta(minutes=5)
    await store.insert_events([event(601, received_at=long_ago)])
    async with store.engine.begin() as connection:
        await connection.execute(text("UPDATE outbox SET status = 'dead', last_error = 'refused'"))
    listener = OutboxListener(postgres_database.url, timeout_seconds=2.0)
    async with draining(postgres_database, fake, listener, replace(SLOW_POLL, settle_seconds=8)):
        await until(lambda: listener.listening, within=5)
        await anyio.sleep(0.5)  # past the claim that follows the LISTEN
        assert fake.accepted() == []
        requeued = time.monotonic()
        inspector = OutboxInspector(store.engine)
        assert await inspector.requeue(EventFilter(), datetime.now(UTC), dry_run=False) == 1
        await until(lambda: len(fake.accepted()) == 1, within=5)
        assert time.monotonic() - requeued < 2.0


async def test_rows_a_stopping_drainer_gives_back_are_announced_ready(
    postgres_database: OutboxDatabase, store: OutboxStore
) -> None:
    """A drainer that stops gives back the rows it holds and says so (`ready:<n>`), so another
    drainer takes them at once instead of at its next poll; other releases stay silent."""
    await store.insert_events([event(1), event(2), event(3)])
    delivery = DeliveryStore(store.engine)
    later = datetime.now(UTC) + timedelta(seconds=5)
    claimed = await delivery.claim(
        "stopping", later, timedelta(0), timedelta(minutes=1), max_events=10, max_per_key=10
    )
    ids = [row.id for row in claimed]
    assert len(ids) == 3
    async with listening(postgres_database) as heard:
        assert await delivery.release("stopping", ids[:1]) == 1
        assert await delivery.release("someone else", ids[1:], announce=True) == 0
        assert await heard.settle() == []  # not announced, or nothing released
        assert await delivery.release("stopping", ids[1:], announce=True) == 2
        assert await heard.settle() == ["ready:2"]


async def test_a_stopping_drainers_rows_go_to_another_drainer_at_once(
    postgres_database: OutboxDatabase, store: OutboxStore, fake: FakeSegment
) -> None:
    """Drainer A's request hangs; A stops (grace period 0.5 s) and gives the row back; drainer
    B, which polls only every 30 s, hears of it and delivers it at once."""
    await store.insert_events([event(701, received_at=datetime.now(UTC) - timedelta(minutes=5))])
    fake.inject(Fault.hang())  # the first request hangs until its client goes away
    stop_a = anyio.Event()

    async def drainer_a() -> None:
        config = replace(SLOW_POLL, shutdown_grace_seconds=0.5)
        async with draining(postgres_database, fake, None, config):
            await stop_a.wait()

    async def held_by_a() -> bool:
        [row] = await postgres_database.rows_async("SELECT status FROM outbox")
        return bool(row["status"] == "delivering")

    async with anyio.create_task_group() as group:
        group.start_soon(drainer_a)
        with anyio.fail_after(5):
            while not await held_by_a():
                await anyio.sleep(0.05)
        listener = OutboxListener(postgres_database.url, timeout_seconds=2.0)
        async with draining(postgres_database, fake, listener):
            await until(lambda: listener.listening, within=5)
            await anyio.sleep(0.5)  # past the claim that follows the LISTEN: A holds the row
            assert fake.accepted() == []
            stopped = time.monotonic()
            stop_a.set()
            await until(lambda: len(fake.accepted()) == 1, within=10)
            assert time.monotonic() - stopped < 3.0  # the grace period, then one claim
