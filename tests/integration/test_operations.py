"""What operators rely on, on SQLite and PostgreSQL: the SQL views, every query of
docs/operations.md, the `outbox` command, and retention."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from relay.db.delivery import DeadRows, DeliveryStore, RequestRecord, RetryRows
from relay.db.engine import create_engine
from relay.db.inspect import EventFilter, OutboxInspector
from relay.db.store import OutboxStore
from relay.db.tables import utc_datetime
from relay.drainer.retention import RetentionPolicy, purge_once
from tests.acceptance.processes import relay_env, run_relay
from tests.support import ROOT, OutboxDatabase, call_lifecycle, sample
from tests.support import incoming_event as incoming

pytestmark = pytest.mark.anyio

NOW = datetime.now(UTC).replace(microsecond=0)
CALL = 1903456789
LEASE = timedelta(minutes=1)


def record(ids: list[int], at: datetime, status: int | None, outcome: str) -> RequestRecord:
    return RequestRecord(
        id=RequestRecord.new_id(),
        started_at=at,
        finished_at=at + timedelta(milliseconds=30),
        event_count=len(ids),
        body_bytes=2000 * len(ids),
        outbox_ids=ids,
        http_status=status,
        outcome=outcome,
        error=None if status == 200 else f"Segment answered {status}",
    )


@dataclass
class Populated:
    database: OutboxDatabase
    ids: dict[str, int]


@pytest.fixture
async def populated(database: OutboxDatabase) -> AsyncIterator[Populated]:
    """A day in the life: the sample call delivered up to call.hungup (its call.ended missing for
    half an hour), a second call with a dead event and a retry pending, a skipped event, an old
    delivered user event, and a duplicate."""
    engine = create_engine(database.url, timeout_seconds=2.0)
    outbox, delivery = OutboxStore(engine), DeliveryStore(engine)
    ids: dict[str, int] = {}
    # The old user event first, delivered before the rest is received: on PostgreSQL a claim
    # compares with the database's clock, by which every row below is settled.
    user = sample("user.connected")
    del user["token"]
    old = NOW - timedelta(days=40)
    [old_user] = await outbox.insert_events([incoming(user, old)])
    ids["old_user"] = old_user.id
    owner = "vm:1:test"
    settled = old + timedelta(seconds=10)
    claimed = await delivery.claim(owner, settled, timedelta(seconds=10), LEASE, 10, 10)
    assert [row.id for row in claimed] == [old_user.id]
    await delivery.finish(
        owner, record([old_user.id], settled, 200, "delivered"), delivered=[old_user.id]
    )
    early = NOW - timedelta(minutes=30)
    call = [body for body in call_lifecycle(CALL) if body["event"] != "call.ended"][:6]
    stored = await outbox.insert_events([incoming(body, early) for body in call])
    for body, row in zip(call, stored, strict=True):
        ids[str(body["event"])] = row.id
    second = call_lifecycle(42)[:3]
    stored = await outbox.insert_events(
        [incoming(body, early + timedelta(minutes=1)) for body in second]
    )
    ids["second_created"], ids["second_ringing"], ids["second_declined"] = (r.id for r in stored)
    hold = sample("call.hungup")
    del hold["token"]
    hold["event"] = "call.hold"
    [skipped] = await outbox.insert_events([incoming(hold, early, forward=False)])
    ids["skipped"] = skipped.id
    await outbox.insert_events([incoming(call[0], early)])  # a duplicate of call.created

    at = early + timedelta(minutes=2)
    claimed = await delivery.claim(owner, at, timedelta(0), LEASE, 100, 100)
    first_call = [ids[str(body["event"])] for body in call]
    await delivery.finish(owner, record(first_call, at, 200, "delivered"), delivered=first_call)
    await delivery.finish(
        owner,
        record([ids["second_created"]], at, 400, "rejected"),
        dead=[DeadRows(ids=[ids["second_created"]], reason="Segment refused the message with 400")],
    )
    retried = record([ids["second_ringing"], ids["second_declined"]], at, 503, "retry")
    await delivery.finish(
        owner,
        retried,
        retry=RetryRows(
            ids=[ids["second_ringing"], ids["second_declined"]],
            # Due at NOW + 5 min (on PostgreSQL, as long after the database's clock's now).
            after=NOW + timedelta(minutes=5) - retried.finished_at,
            error="Segment answered 503",
        ),
    )
    assert {row.id for row in claimed} >= set(first_call)
    yield Populated(database, ids)
    await engine.dispose()


async def test_views(populated: Populated) -> None:
    database = populated.database
    backlog = await database.rows_async("SELECT * FROM outbox_backlog ORDER BY event")
    assert [(row["event"], row["status"], row["events"]) for row in backlog] == [
        ("call.agent_declined", "pending", 1),
        ("call.ringing_on_agent", "pending", 1),
    ]
    # NOW is fixed when the module is imported, perhaps minutes before this test runs: the
    # views measure ages from the database's clock at query time.
    expected_age = (datetime.now(UTC) - (NOW - timedelta(minutes=30))).total_seconds()
    # The second call's rows were received a minute after the first call's.
    assert all(abs(row["oldest_age_seconds"] - (expected_age - 60)) <= 5 for row in backlog)
    dead = await database.rows_async("SELECT * FROM outbox_dead")
    assert [(row["id"], row["last_http_status"]) for row in dead] == [
        (populated.ids["second_created"], 400)
    ]
    awaiting = await database.rows_async("SELECT * FROM calls_awaiting_call_ended")
    assert [(row["ordering_key"], row["call_id"]) for row in awaiting] == [
        (f"call:{CALL}", str(CALL))
    ]
    assert abs(awaiting[0]["waiting_seconds"] - expected_age) <= 5
    recent = await database.rows_async("SELECT * FROM recent_delivery_requests")
    assert sorted(row["outcome"] for row in recent) == ["delivered", "rejected", "retry"]


def operations_queries(dialect: str) -> list[str]:
    document = (ROOT / "docs" / "operations.md").read_text()
    blocks = re.findall(r"```sql\n(.*?)```", document, flags=re.DOTALL)
    assert len(blocks) >= 15
    chosen = []
    for block in blocks:
        first = block.strip().splitlines()[0].strip()
        if first in ("-- sqlite", "-- postgresql") and first != f"-- {dialect}":
            continue
        if first.startswith("UPDATE"):  # the repairs: tests/integration/test_row_states.py
            continue
        chosen.append(block.strip().rstrip(";"))
    return chosen


async def test_every_query_of_the_operations_guide_runs(populated: Populated) -> None:
    database = populated.database
    queries = operations_queries(database.kind)
    engine = create_engine(database.url, timeout_seconds=2.0)
    results: dict[str, list[dict[str, object]]] = {}
    try:
        async with engine.connect() as connection:
            for query in queries:
                rows = await connection.execute(text(query))
                results[query] = [dict(row._mapping) for row in rows]
    finally:
        await engine.dispose()
    history = next(rows for query, rows in results.items() if "received_count, status" in query)
    assert [row["event"] for row in history] == [
        "call.created",
        "call.ringing_on_agent",
        "call.agent_declined",
        "call.answered",
        "call.transferred",
        "call.hungup",
        "call.hold",  # skipped (not forwarded), still on record
    ]
    assert history[-1]["status"] == "skipped"
    assert history[0]["received_count"] == 2
    agents = next(rows for query, rows in results.items() if "AS agent" in query)
    assert {row["agent"] for row in agents} >= {"Nora Lindqvist"}
    answers = next(
        rows for query, rows in results.items() if "FROM recent_delivery_requests" in query
    )
    assert {(row["http_status"], row["outcome"]) for row in answers} == {
        (200, "delivered"),
        (400, "rejected"),
        (503, "retry"),
    }
    missing = next(rows for query, rows in results.items() if "waiting_seconds > 600" in query)
    assert [row["ordering_key"] for row in missing] == [f"call:{CALL}"]


async def test_inspector_filters_requeue_and_purge(populated: Populated) -> None:
    engine = create_engine(populated.database.url, timeout_seconds=2.0)
    inspector = OutboxInspector(engine)
    try:
        pending = await inspector.list_events(EventFilter(statuses=("pending",)), limit=10)
        assert {row["id"] for row in pending} == {
            populated.ids["second_ringing"],
            populated.ids["second_declined"],
        }
        by_key = await inspector.list_events(EventFilter(ordering_key=f"call:{CALL}"), limit=50)
        assert len(by_key) == 7
        found = await inspector.find(str(populated.ids["second_created"]))
        assert found is not None
        assert [request["http_status"] for request in found["delivery_requests"]] == [400]
        by_message = await inspector.find(found["message_id"])
        assert by_message is not None and by_message["id"] == found["id"]
        assert await inspector.find("999999") is None

        assert await inspector.requeue(EventFilter(), NOW, dry_run=True) == 1
        assert await inspector.requeue(EventFilter(), NOW, dry_run=False) == 1
        requeued = await inspector.find(str(populated.ids["second_created"]))
        assert requeued is not None
        assert requeued["status"] == "pending"
        assert requeued["last_error"].startswith("requeued by an operator (was dead)")
        with pytest.raises(ValueError, match="cannot requeue pending"):
            await inspector.requeue(EventFilter(statuses=("pending",)), NOW, dry_run=False)

        cut_off = NOW - timedelta(days=30)
        assert await inspector.purge("delivered", cut_off, dry_run=True) == 1
        assert await inspector.purge("delivered", cut_off, dry_run=False, batch_size=1) == 1
        assert await inspector.find(str(populated.ids["old_user"])) is None
        with pytest.raises(ValueError, match="cannot purge pending"):
            await inspector.purge("pending", cut_off, dry_run=False)
    finally:
        await engine.dispose()


async def test_retention_keeps_dead_and_pending_rows_by_default(populated: Populated) -> None:
    engine = create_engine(populated.database.url, timeout_seconds=2.0)
    try:
        policy = RetentionPolicy(delivered_days=10, skipped_days=0.01)
        deleted = await purge_once(OutboxInspector(engine), policy, NOW)
    finally:
        await engine.dispose()
    assert deleted == {"delivered": 1, "skipped": 1}
    statuses = await populated.database.rows_async(
        "SELECT status, count(*) AS n FROM outbox GROUP BY status ORDER BY status"
    )
    assert statuses == [
        {"status": "dead", "n": 1},
        {"status": "delivered", "n": 6},
        {"status": "pending", "n": 2},
    ]
    assert RetentionPolicy().enabled is False


async def test_outbox_command(populated: Populated) -> None:
    env = relay_env(populated.database.url)
    stats = run_relay("outbox", "stats", "--json", env=env)
    assert stats.returncode == 0, stats.stderr
    report = json.loads(stats.stdout)
    assert report["by_status"] == {"delivered": 7, "dead": 1, "pending": 2, "skipped": 1}
    assert report["dead"] == 1
    assert report["calls_awaiting_call_ended"] == 1
    assert report["oldest_pending_age_seconds"] > 1700
    human = run_relay("outbox", "stats", env=env)
    assert "dead rows:        1" in human.stdout

    listed = run_relay("outbox", "list", "--status", "pending", "--json", env=env)
    assert listed.returncode == 0
    lines = [json.loads(line) for line in listed.stdout.splitlines()]
    assert {line["event"] for line in lines} == {"call.ringing_on_agent", "call.agent_declined"}
    table = run_relay("outbox", "list", "--key", f"call:{CALL}", "--since", "2h", env=env)
    assert table.stdout.count("call.") == 7

    shown = run_relay("outbox", "show", str(populated.ids["call.hungup"]), env=env)
    assert shown.returncode == 0
    assert '"raw_digits"' in shown.stdout and "delivery requests (1)" in shown.stdout
    assert run_relay("outbox", "show", "424242", env=env).returncode == 4

    dry = run_relay("outbox", "requeue", "--dry-run", env=env)
    assert dry.stdout.strip() == "would requeue 1 row(s)"
    assert run_relay("outbox", "purge", env=env).returncode == 2
    purged = run_relay("outbox", "purge", "--delivered-older-than", "30", env=env)
    assert purged.stdout.strip() == "deleted 1 delivered row(s) older than 30 day(s)"
    bad = run_relay("outbox", "list", "--since", "yesterday", env=env)
    assert bad.returncode == 2 and "--since" in bad.stderr


@pytest.mark.postgres
async def test_copy_an_sqlite_outbox_to_postgresql(
    sqlite_database: OutboxDatabase, postgres_database: OutboxDatabase
) -> None:
    """Moving to PostgreSQL: every row, id, status and request comes over, and new receipts
    continue after the largest id."""
    engine = create_engine(sqlite_database.url, timeout_seconds=2.0)
    store, delivery = OutboxStore(engine), DeliveryStore(engine)
    bodies = [body for call in (1, 2) for body in call_lifecycle(call)]
    bodies[0]["data"]["id"] = 2**64 + 3  # a big id keeps its digits across databases
    await store.insert_events([incoming(body, NOW - timedelta(minutes=5)) for body in bodies])
    claimed = await delivery.claim("x", NOW, timedelta(0), LEASE, 5, 5)
    ids = [row.id for row in claimed]
    for row_id in ids:  # one request each: several pages of delivery_requests below
        await delivery.finish("x", record([row_id], NOW, 200, "delivered"), delivered=[row_id])
    await engine.dispose()

    env = relay_env(postgres_database.url)
    # Pages of 2 rows: every row must come over once, whatever the page boundaries.
    copied = run_relay(
        "outbox", "copy", "--from", sqlite_database.url, "--batch-size", "2", env=env
    )
    assert copied.returncode == 0, copied.stderr
    assert copied.stdout.strip() == (
        f"copied {len(bodies)} outbox row(s) and {len(ids)} delivery request(s)"
    )
    request_ids = "SELECT id FROM delivery_requests ORDER BY id"
    assert await postgres_database.rows_async(request_ids) == (
        await sqlite_database.rows_async(request_ids)
    )
    columns = "id, event, status, dedup_key, message_id, ordering_key, occurred_at, received_count"
    source_rows = await sqlite_database.rows_async(f"SELECT {columns} FROM outbox ORDER BY id")
    target_rows = await postgres_database.rows_async(f"SELECT {columns} FROM outbox ORDER BY id")
    for rows in (source_rows, target_rows):  # raw SQL: SQLite gives text, PostgreSQL datetimes
        for row in rows:
            row["occurred_at"] = utc_datetime(row["occurred_at"])
    assert target_rows == source_rows
    payload = await postgres_database.rows_async(
        "SELECT payload -> 'data' ->> 'id' AS call_id FROM outbox ORDER BY outbox.id LIMIT 1"
    )
    assert payload[0]["call_id"] == str(2**64 + 3)
    again = run_relay("outbox", "copy", "--from", sqlite_database.url, env=env)
    assert again.returncode == 2 and "already holds" in again.stderr
    target = create_engine(postgres_database.url, timeout_seconds=2.0)
    try:
        [new] = await OutboxStore(target).insert_events([incoming(sample_body(), NOW)])
    finally:
        await target.dispose()
    assert new.id > max(row["id"] for row in source_rows)


def sample_body() -> dict[str, object]:
    body = sample("contact.created")
    del body["token"]
    return body
