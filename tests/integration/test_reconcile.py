"""Reconcile against the fake Aircall (real HTTP) and a real outbox, on SQLite and PostgreSQL:
the comparison, the grace, back-fill and its idempotence, the record of each run, Aircall
failing (5xx, garbage, bad credentials), a call object missing fields; and the drainer sending
exactly one `call.ended` per call when a back-filled row and Aircall's own meet."""

from __future__ import annotations

import copy
import json
import random
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest

from relay.aircall_api import AircallApi
from relay.db.engine import create_engine
from relay.db.gauges import read_outbox_gauges
from relay.db.reconcile import ReconcileStore, reconciled_dedup_key
from relay.db.store import OutboxStore
from relay.db.tables import utc_datetime
from relay.reconcile import (
    AWAITING,
    COMPLETE,
    EXIT_FAILURE,
    EXIT_INCOMPLETE,
    EXIT_OK,
    EXIT_USAGE,
    MISSING,
    NOT_YET_DUE,
    Report,
    reconcile,
)
from relay.testing import FakeSegment, SourceConfig
from relay.testing.fake_aircall import FakeAircall, sample_calls
from tests.acceptance.processes import relay_env, run_relay
from tests.integration.test_drainer import FAST, WRITE_KEY, Relay, draining
from tests.support import OutboxDatabase, call_lifecycle, execute_async
from tests.support import incoming_event as incoming

pytestmark = pytest.mark.anyio

API_ID = "reconcile-test-id"
API_TOKEN = "reconcile-test-token-0123456789"
GRACE = 3600.0
NOW = datetime.now(UTC).replace(microsecond=0)
# Calls of the fake: one a minute, the last ended two hours ago (all due).
START = int(NOW.timestamp()) - 3 * 86400 // 2


@pytest.fixture
def fake() -> Iterator[FakeSegment]:
    with FakeSegment(write_keys={WRITE_KEY: SourceConfig()}) as server:
        yield server


@pytest.fixture
def aircall() -> Iterator[FakeAircall]:
    with FakeAircall(api_id=API_ID, api_token=API_TOKEN, requests_per_minute=None) as fake_api:
        yield fake_api


@pytest.fixture
async def store(database: OutboxDatabase) -> AsyncIterator[ReconcileStore]:
    engine = create_engine(database.url, timeout_seconds=2.0)
    yield ReconcileStore(engine)
    await engine.dispose()


def api_of(aircall: FakeAircall, token: str = API_TOKEN) -> AircallApi:
    return AircallApi(
        aircall.base_url, API_ID, token, requests_per_minute=0, retry_base_seconds=0.01
    )


async def run(
    aircall: FakeAircall,
    store: ReconcileStore,
    *,
    backfill: bool = False,
    token: str = API_TOKEN,
    since: datetime | None = None,
) -> Report:
    async with api_of(aircall, token) as api:
        return await reconcile(
            api,
            store,
            since=since or NOW - timedelta(days=2),
            until=NOW,
            grace_seconds=GRACE,
            backfill=backfill,
            clock=lambda: NOW,
        )


def webhooks_of(call: dict[str, Any], events: tuple[str, ...]) -> list[dict[str, Any]]:
    """The webhooks of `call` (a fake's call object): the sample call's, with its id and times."""
    bodies = []
    for body in call_lifecycle(int(call["id"])):
        if body["event"] in events:
            body["timestamp"] = call["ended_at"] + (31 if body["event"] == "call.ended" else 0)
            bodies.append(body)
    return bodies


async def receive(store: ReconcileStore, bodies: list[dict[str, Any]]) -> None:
    outbox = OutboxStore(store.engine)
    try:
        await outbox.insert_events([incoming(body, None) for body in bodies])
    finally:
        await outbox.close_writer()


async def test_compares_aircalls_calls_with_the_outbox_and_records_the_run(
    aircall: FakeAircall, store: ReconcileStore, database: OutboxDatabase
) -> None:
    calls = sample_calls(6, start=START)
    ongoing = copy.deepcopy(calls[5])
    ongoing.update(id=2_000_000_001, started_at=int(NOW.timestamp()) - 120, ended_at=None)
    recent = copy.deepcopy(calls[5])
    recent.update(id=2_000_000_002, started_at=int(NOW.timestamp()) - 600)
    recent["ended_at"] = recent["started_at"] + 300  # ended 5 min ago: within the grace
    aircall.add_calls([*calls, ongoing, recent])
    # Calls 0 and 1 complete (one delivered-or-not call.ended is enough), 2 and 3 awaiting
    # call.ended (rows, but none), 4 and 5 missing.
    await receive(store, webhooks_of(calls[0], ("call.created", "call.hungup", "call.ended")))
    await receive(store, webhooks_of(calls[1], ("call.ended",)))
    await receive(store, webhooks_of(calls[2], ("call.created", "call.hungup")))
    await receive(store, webhooks_of(calls[3], ("call.created",)))
    await execute_async(
        database.url,
        "UPDATE outbox SET status = 'skipped', last_error = 'by hand', next_attempt_at = NULL"
        f" WHERE event = 'call.ended' AND resource_id = '{calls[1]['id']}'",
    )
    before = await database.rows_async()

    report = await run(aircall, store)

    assert report.calls_seen == 8
    ids = [str(call["id"]) for call in calls]
    assert report.verdicts[COMPLETE] == ids[:2]
    assert report.verdicts[AWAITING] == ids[2:4]
    assert report.verdicts[MISSING] == ids[4:6]
    assert sorted(report.verdicts[NOT_YET_DUE]) == ["2000000001", "2000000002"]
    assert report.exit_code == EXIT_INCOMPLETE and report.outcome == "incomplete"
    assert f"missing: {ids[4]}, {ids[5]}" in report.as_text()
    assert await database.rows_async() == before  # without --backfill, nothing stored
    [last] = await database.rows_async("SELECT * FROM last_reconcile_run")
    assert {
        key: last[key]
        for key in ("calls_seen", "missing", "awaiting_call_ended", "not_yet_due", "backfilled")
    } == {
        "calls_seen": 8,
        "missing": 2,
        "awaiting_call_ended": 2,
        "not_yet_due": 2,
        "backfilled": 0,
    }
    assert (last["errors"], last["outcome"], last["error"]) == (0, "incomplete", None)
    assert not last["backfill"]
    # `outbox stats` shows it too.
    env = relay_env(database.url)
    stats = json.loads(run_relay("outbox", "stats", "--json", env=env).stdout)
    assert stats["last_reconcile_run"]["missing"] == 2
    assert stats["last_reconcile_run"]["outcome"] == "incomplete"
    human = run_relay("outbox", "stats", env=env).stdout
    assert "last reconcile:   incomplete, " in human
    assert "8 calls, 2 missing, 2 awaiting call.ended, 0 back-filled, 0 errors" in human
    # And the receiver's gauges (its /metrics).
    gauges = await read_outbox_gauges(store.engine, NOW)
    assert gauges.last_reconcile is not None
    assert (gauges.last_reconcile.missing, gauges.last_reconcile.awaiting_call_ended) == (2, 2)
    assert not gauges.last_reconcile.complete


async def test_backfill_stores_one_call_ended_per_call_and_a_second_run_adds_nothing(
    aircall: FakeAircall, store: ReconcileStore, database: OutboxDatabase
) -> None:
    calls = sample_calls(120, start=START)  # more than one page, more than one look-up batch
    aircall.add_calls(calls)
    for call in calls[:40]:
        await receive(store, webhooks_of(call, ("call.hungup",)))

    first = await run(aircall, store, backfill=True)

    assert (len(first.verdicts[AWAITING]), len(first.verdicts[MISSING])) == (40, 80)
    assert len(first.backfilled) == 120 and first.exit_code == EXIT_OK
    assert first.outcome == "complete"
    rows = await database.rows_async(
        "SELECT * FROM outbox WHERE event = 'call.ended' ORDER BY resource_id"
    )
    assert len(rows) == 120
    row = rows[0]
    assert (row["origin"], row["source"], row["status"]) == ("reconciled", "reconcile", "pending")
    assert row["dedup_key"] == reconciled_dedup_key(str(calls[0]["id"]))
    assert row["message_id"] == "aircall-" + row["dedup_key"]
    assert row["ordering_key"] == f"call:{calls[0]['id']}"
    assert utc_datetime(row["occurred_at"]) == datetime.fromtimestamp(calls[0]["ended_at"], UTC)
    payload = row["payload"] if isinstance(row["payload"], dict) else json.loads(row["payload"])
    assert (payload["resource"], payload["event"]) == ("call", "call.ended")
    assert payload["timestamp"] == calls[0]["ended_at"]
    assert payload["data"] == calls[0]  # the call object of GET /v1/calls/{id}
    assert {r["origin"] for r in await database.rows_async()} == {"webhook", "reconciled"}

    second = await run(aircall, store, backfill=True)
    assert len(second.verdicts[COMPLETE]) == 120 and second.backfilled == []
    assert second.exit_code == EXIT_OK
    assert len(await database.rows_async("SELECT id FROM outbox WHERE event = 'call.ended'")) == 120
    runs = await database.rows_async("SELECT * FROM reconcile_runs ORDER BY id")
    assert [(r["backfilled"], r["outcome"]) for r in runs] == [(120, "complete"), (0, "complete")]


async def test_backfill_never_touches_a_call_with_a_call_ended_of_any_status(
    store: ReconcileStore, database: OutboxDatabase
) -> None:
    [call] = sample_calls(1, start=START)
    for status in ("dead", "skipped", "delivered", "pending"):
        await receive(store, webhooks_of(call, ("call.ended",)))
        if status != "pending":
            done = ", delivered_at = received_at" if status == "delivered" else ""
            await execute_async(
                database.url,
                f"UPDATE outbox SET status = '{status}', last_error = 'by hand'{done},"
                " next_attempt_at = NULL",
            )
        stored = await store.backfill_call_ended(str(call["id"]), call, call["ended_at"], NOW)
        assert stored is None, status
        assert len(await database.rows_async()) == 1
        await execute_async(database.url, "DELETE FROM outbox")
    # With no call.ended, it stores one, once.
    first = await store.backfill_call_ended(str(call["id"]), call, call["ended_at"], NOW)
    assert first is not None
    assert await store.backfill_call_ended(str(call["id"]), call, call["ended_at"], NOW) is None


async def test_aircall_failing_stores_nothing_and_says_why(
    aircall: FakeAircall, store: ReconcileStore, database: OutboxDatabase
) -> None:
    aircall.add_calls(sample_calls(3, start=START))
    aircall.fail_next(20, status=503)
    failed = await run(aircall, store, backfill=True)
    assert failed.exit_code == EXIT_FAILURE and failed.outcome == "failed"
    assert failed.error is not None and "503" in failed.error
    assert "FAILED" in failed.as_text()

    aircall.fail_next(1, body=b"<html>not json</html>")
    garbage = await run(aircall, store, backfill=True)
    assert garbage.exit_code == EXIT_FAILURE and garbage.error is not None

    refused = await run(aircall, store, backfill=True, token="a-wrong-token-0123456789")
    assert refused.exit_code == EXIT_USAGE and refused.outcome == "failed"
    assert "a-wrong-token" not in (refused.error or "") + refused.as_text()

    assert await database.rows_async() == []  # no outbox row
    runs = await database.rows_async("SELECT outcome, error FROM reconcile_runs ORDER BY id")
    assert [r["outcome"] for r in runs] == ["failed"] * 3 and all(r["error"] for r in runs)


async def test_a_call_object_missing_fields_is_back_filled_as_it_is_and_sent(
    aircall: FakeAircall, store: ReconcileStore, database: OutboxDatabase, fake: FakeSegment
) -> None:
    # Only what the client needs: no user, number, contact, recording, direction...
    bare = {"id": 3_000_000_001, "started_at": START, "ended_at": START + 40, "status": "done"}
    aircall.add_calls([bare])
    report = await run(aircall, store, backfill=True)
    assert report.backfilled == ["3000000001"]

    relay = Relay(database, fake, FAST)
    try:
        async with draining(relay.drainer()):
            await relay.wait_accepted(1)
    finally:
        await relay.engine.dispose()
    [message] = fake.accepted()
    assert message["event"] == "call.ended"
    assert message["anonymousId"] == "aircall-call-3000000001"
    assert message["properties"] == {
        "call_id": 3_000_000_001,
        "started_at": START,
        "ended_at": START + 40,
        "status": "done",
    }
    assert message["context"]["aircall_relay"] == {"origin": "reconciled"}


async def test_exactly_one_call_ended_reaches_segment_when_the_real_one_comes_late(
    aircall: FakeAircall, store: ReconcileStore, database: OutboxDatabase, fake: FakeSegment
) -> None:
    calls = sample_calls(10, start=START)
    aircall.add_calls(calls)
    relay = Relay(database, fake, FAST)
    try:
        async with draining(relay.drainer()):
            report = await run(aircall, store, backfill=True)
            assert len(report.backfilled) == 10
            await relay.wait_accepted(10)
            # Half the real call.ended arrive after the back-filled ones were sent; the other
            # half before (their back-filled rows pending still, as when they race).
            late = [webhooks_of(call, ("call.ended", "call.tagged")) for call in calls]
            for bodies in late:
                await receive(store, bodies)
            await relay.wait_accepted(20)  # the ten call.tagged
            await anyio.sleep(FAST.settle_seconds * 3)
    finally:
        await relay.engine.dispose()
    ended = [m for m in fake.accepted() if m["event"] == "call.ended"]
    assert sorted(int(m["properties"]["call_id"]) for m in ended) == [c["id"] for c in calls]
    assert all(m["context"]["aircall_relay"] == {"origin": "reconciled"} for m in ended)
    fake.assert_no_duplicates()
    skipped = await database.rows_async(
        "SELECT * FROM outbox WHERE event = 'call.ended' AND origin = 'webhook'"
    )
    assert len(skipped) == 10 and {row["status"] for row in skipped} == {"skipped"}
    reconciled = {
        row["ordering_key"]: row["id"]
        for row in await database.rows_async("SELECT * FROM outbox WHERE origin = 'reconciled'")
    }
    for row in skipped:
        assert f"outbox row {reconciled[row['ordering_key']]} " in row["last_error"]
        assert "origin reconciled" in row["last_error"]


@pytest.mark.postgres
async def test_several_drainers_and_a_reconcile_at_once_send_one_call_ended_per_call(
    aircall: FakeAircall, postgres_database: OutboxDatabase, fake: FakeSegment
) -> None:
    """The race of point 4 on PostgreSQL: reconcile back-fills while the real call.ended of the
    same calls arrive, in a random order, and four drainers claim with almost no settle window;
    whoever wins each call, Segment gets exactly one call.ended of it."""
    database = postgres_database
    calls = sample_calls(150, start=START)
    aircall.add_calls(calls)
    engine = create_engine(database.url, timeout_seconds=2.0)
    store = ReconcileStore(engine)
    bodies = [body for call in calls for body in webhooks_of(call, ("call.hungup", "call.ended"))]
    random.Random(12).shuffle(bodies)
    relay = Relay(database, fake, replace(FAST, settle_seconds=0.0, poll_seconds=0.005))
    try:
        async with AsyncExitStack() as drainers:
            for _ in range(4):
                await drainers.enter_async_context(draining(relay.drainer()))

            async def webhooks() -> None:
                for start in range(0, len(bodies), 5):
                    await receive(store, bodies[start : start + 5])

            async def reconciling() -> None:
                for _ in range(2):
                    await run(aircall, store, backfill=True)

            async with anyio.create_task_group() as group:
                group.start_soon(webhooks)
                group.start_soon(reconciling)
            with anyio.fail_after(60):
                while True:
                    [left] = await database.rows_async(
                        "SELECT count(*) AS n FROM outbox WHERE status IN ('pending', 'delivering')"
                    )
                    if left["n"] == 0:
                        break
                    await anyio.sleep(0.05)
    finally:
        await relay.engine.dispose()
        await engine.dispose()
    ended = [m for m in fake.accepted() if m["event"] == "call.ended"]
    assert sorted(int(m["properties"]["call_id"]) for m in ended) == [c["id"] for c in calls]
    fake.assert_no_duplicates()
    rows = await database.rows_async("SELECT * FROM outbox WHERE event = 'call.ended'")
    by_status: dict[str, int] = {}
    for row in rows:
        by_status[row["status"]] = by_status.get(row["status"], 0) + 1
    assert by_status.get("delivered") == 150 and set(by_status) <= {"delivered", "skipped"}
    reconciled = sum(1 for row in rows if row["origin"] == "reconciled")
    print(f"reconciled rows: {reconciled}, skipped: {by_status.get('skipped', 0)}")


class ChangingAircall:
    """The client, and the fake changing between the listing and the back-fill: Aircall deleted
    one call meanwhile (404), and another reads as not ended any more."""

    def __init__(self, api: AircallApi, fake: FakeAircall, gone: int, reopened: int) -> None:
        self.api, self.fake, self.gone, self.reopened = api, fake, gone, reopened

    async def calls(self, since: datetime, until: datetime, on_page: Any = None) -> Any:
        async for call in self.api.calls(since, until, on_page):
            yield call
        changed = copy.deepcopy(self.fake._calls[self.reopened])
        changed["ended_at"] = None
        self.fake.add_calls([changed])
        del self.fake._calls[self.gone]

    async def call(self, call_id: int) -> dict[str, Any]:
        return await self.api.call(call_id)


async def test_calls_that_cannot_be_back_filled_are_errors_and_the_others_are_stored(
    aircall: FakeAircall, store: ReconcileStore, database: OutboxDatabase
) -> None:
    calls = sample_calls(3, start=START)
    aircall.add_calls(calls)
    progress: list[tuple[str, int, int | None]] = []
    async with api_of(aircall) as api:
        changing = ChangingAircall(api, aircall, gone=calls[0]["id"], reopened=calls[1]["id"])
        report = await reconcile(
            changing,
            store,
            since=NOW - timedelta(days=2),
            until=NOW,
            grace_seconds=GRACE,
            backfill=True,
            clock=lambda: NOW,
            progress=lambda what, done, total: progress.append((what, done, total)),
        )
    assert report.backfilled == [str(calls[2]["id"])]
    assert report.errors == [
        f"call {calls[0]['id']}: Aircall no longer has it (404)",
        f"call {calls[1]['id']}: Aircall's call object has no ended_at",
    ]
    assert (report.exit_code, report.outcome) == (EXIT_FAILURE, "errors")
    assert "ERRORS: 2 call(s) could not be checked or back-filled" in report.as_text()
    rows = await database.rows_async("SELECT resource_id FROM outbox")
    assert [row["resource_id"] for row in rows] == [str(calls[2]["id"])]
    [run_row] = await database.rows_async("SELECT errors, backfilled, outcome FROM reconcile_runs")
    assert run_row == {"errors": 2, "backfilled": 1, "outcome": "errors"}
    # The progress a terminal shows: the listing, the comparison, the back-fill.
    assert ("calls listed", 3, 3) in progress
    assert ("calls compared", 3, 3) in progress
    assert [entry for entry in progress if entry[0] == "calls back-filled"] == [
        ("calls back-filled", done, 3) for done in (1, 2, 3)
    ]
