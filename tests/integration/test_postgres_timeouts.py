"""PostgreSQL's statement and lock timeouts on the relay's connections: a statement that runs
past the limit is cancelled by the server, and the relay takes that as it takes any transient
database error (nothing half-written; the drainer claims again and delivers everything once)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import anyio
import pytest
import structlog.testing
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from relay.compose import build_drainer, build_store
from relay.db.delivery import DeliveryStore
from relay.db.engine import create_engine
from relay.db.store import OutboxStore
from relay.drainer.loop import Drainer
from relay.drainer.sender import SegmentSender
from relay.segment import MappingOptions
from relay.testing import FakeSegment, SourceConfig
from tests.conftest import make_settings
from tests.integration.test_drainer import FAST, WRITE_KEY, draining
from tests.support import OutboxDatabase, execute_async, incoming_event

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

QUERY_CANCELED = "57014"


@pytest.fixture
def fake() -> Iterator[FakeSegment]:
    with FakeSegment(write_keys={WRITE_KEY: SourceConfig()}) as server:
        yield server


async def _show(engine: AsyncEngine, setting: str) -> str:
    try:
        async with engine.connect() as connection:
            return str(await connection.scalar(text(f"SHOW {setting}")))
    finally:
        await engine.dispose()


async def test_the_receivers_and_drainers_statements_and_lock_waits_are_bounded(
    postgres_database: OutboxDatabase,
) -> None:
    settings = make_settings(postgres_database, database_timeout_seconds=1.5)
    receiver = build_store(settings).engine
    drainer = build_drainer(settings, require_write_key=False).store.engine
    for engine in (receiver, drainer):
        assert await _show(engine, "statement_timeout") == "30s"
    assert await _show(build_store(settings).engine, "lock_timeout") == "1500ms"
    # The operator's commands and migrations: no statement timeout, whatever the server's.
    unbounded = create_engine(
        postgres_database.url, timeout_seconds=2.0, statement_timeout_seconds=None
    )
    assert await _show(unbounded, "statement_timeout") == "0"


async def test_a_statement_over_the_limit_is_cancelled_by_the_server(
    postgres_database: OutboxDatabase,
) -> None:
    engine = create_engine(
        postgres_database.url, timeout_seconds=2.0, statement_timeout_seconds=0.2
    )
    try:
        async with engine.connect() as connection:
            with pytest.raises(sa_exc.DBAPIError, match="statement timeout") as raised:
                await connection.execute(text("SELECT pg_sleep(60)"))
        assert getattr(raised.value.orig, "sqlstate", None) == QUERY_CANCELED
        async with engine.connect() as connection:  # the pool goes on
            assert await connection.scalar(text("SELECT 1")) == 1
    finally:
        await engine.dispose()


async def make_slow(database: OutboxDatabase, operation: str) -> None:
    """From now on, every `operation` (INSERT, UPDATE) of an outbox row takes 2 s."""
    await execute_async(
        database.url,
        "CREATE FUNCTION relay_test_slow() RETURNS trigger LANGUAGE plpgsql AS"
        " $$ BEGIN PERFORM pg_sleep(2); RETURN NEW; END $$",
        f"CREATE TRIGGER relay_test_slow BEFORE {operation} ON outbox"
        " FOR EACH ROW EXECUTE FUNCTION relay_test_slow()",
    )


async def make_fast(database: OutboxDatabase) -> None:
    await execute_async(
        database.url, "DROP TRIGGER relay_test_slow ON outbox", "DROP FUNCTION relay_test_slow()"
    )


def _body(call: int, event: str, timestamp: int) -> dict[str, object]:
    return {"resource": "call", "event": event, "timestamp": timestamp, "data": {"id": call}}


async def test_a_cancelled_write_of_the_receiver_stores_nothing_and_the_next_one_does(
    postgres_database: OutboxDatabase,
) -> None:
    engine = create_engine(
        postgres_database.url, timeout_seconds=2.0, statement_timeout_seconds=0.3
    )
    store = OutboxStore(engine)
    events = [incoming_event(_body(1, "call.created", 1_773_000_000), datetime.now(UTC))]
    try:
        await make_slow(postgres_database, "INSERT")
        with pytest.raises(sa_exc.DBAPIError, match="statement timeout"):
            await store.insert_events(events)
        assert await postgres_database.rows_async() == []
        await make_fast(postgres_database)
        # As when Aircall retries after the 503: stored once.
        [stored] = await store.insert_events(events)
        assert not stored.duplicate
    finally:
        await engine.dispose()
    assert len(await postgres_database.rows_async()) == 1


async def test_a_claim_cancelled_by_the_statement_timeout_is_retried_and_delivers_once(
    postgres_database: OutboxDatabase, fake: FakeSegment
) -> None:
    engine = create_engine(
        postgres_database.url, timeout_seconds=2.0, statement_timeout_seconds=0.3
    )
    received = datetime.now(UTC) - timedelta(seconds=10)  # settled
    bodies = [
        _body(call, event, 1_773_000_000 + rank)
        for call in (1, 2, 3)
        for rank, event in enumerate(("call.created", "call.answered", "call.hungup"))
    ]
    await OutboxStore(engine).insert_events([incoming_event(body, received) for body in bodies])
    sender = SegmentSender(fake.base_url, WRITE_KEY, 5.0, max_connections=8)
    drainer = Drainer(DeliveryStore(engine), sender, FAST, MappingOptions())
    await make_slow(postgres_database, "UPDATE")
    try:
        with structlog.testing.capture_logs() as logs:
            async with draining(drainer):
                with anyio.fail_after(30):
                    while not any(
                        entry["event"] == "claim_failed" and "statement timeout" in entry["error"]
                        for entry in logs
                    ):
                        await anyio.sleep(0.05)
                assert fake.accepted() == []
                assert await _statuses(postgres_database) == {"pending"}  # rolled back whole
                await make_fast(postgres_database)
                with anyio.fail_after(30):
                    while await _statuses(postgres_database) != {"delivered"}:
                        await anyio.sleep(0.05)
    finally:
        await engine.dispose()
    message_ids = [message["messageId"] for message in fake.accepted()]
    assert len(message_ids) == len(set(message_ids)) == len(bodies)


async def _statuses(database: OutboxDatabase) -> set[str]:
    return {row["status"] for row in await database.rows_async("SELECT status FROM outbox")}
