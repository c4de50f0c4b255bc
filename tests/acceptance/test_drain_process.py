"""The drainer as a real process (`aircall-relay drain`, and `run`) against the fake Segment:
SIGKILL at random moments loses nothing, re-sends only with the same `messageId`s and keeps each
call's order; SIGTERM exits 0 within the grace period with no re-sends, also while retention
purges; and the small contracts of the commands (no write key, `--once`, `run` with and without
a write key).

The fake runs in a thread of this process (`FakeSegment`); the drainer is a separate process
that reaches it over HTTP on loopback and shares only the database with this test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from relay import aircall
from relay.db.engine import create_engine, sqlite_path
from relay.db.store import OutboxStore
from relay.testing import ChaosEntry, FakeSegment, Fault, SourceConfig
from tests.acceptance.processes import (
    RelayProcess,
    held_by,
    relay_env,
    run_relay,
    statuses,
    wait_until,
)
from tests.support import (
    SAMPLE_TOKEN,
    Backlog,
    OutboxDatabase,
    aircall_call,
    assert_accepted_exactly,
    assert_resends_are_copies,
    incoming_event,
    sample,
)

WRITE_KEY = "wk_drain_process_Q7v2Lx9Rk4Tz"
TOKENS = f"main:{SAMPLE_TOKEN}"
WEBHOOK = "/aircall/webhook"
BATCH_SIZE = 50

KILLS = 12
# Long enough that the requests in flight at SIGTERM are answered (300 ms each at the fake) and
# recorded even on a loaded machine (4 s was too short once in three runs under a load of 5):
# a drainer that finishes sooner exits sooner, so this costs nothing when all is well.
GRACE_SECONDS = 10.0
# Time the process may take past the grace period to close its connections and exit.
EXIT_MARGIN_SECONDS = 2.0

# While the drainer is being killed, every request is slowed (so kills land mid-request and each
# run delivers a bounded share of the backlog), some after the fake accepted the batch (a kill
# then makes a re-send), and some fail after acceptance or before it.
KILL_PHASE_CHAOS = [
    ChaosEntry(Fault.latency(300, jitter_ms=400), 0.55),
    ChaosEntry(Fault.latency(300, jitter_ms=400, accept="after_accept"), 0.30),
    ChaosEntry(Fault.status(500, accept="after_accept"), 0.05),
    ChaosEntry(Fault.reset("mid_response", accept="after_accept"), 0.05),
    ChaosEntry(Fault.status(503), 0.05),
]
# The last run, left to finish: fast, with a few failures after acceptance still.
FINAL_RUN_CHAOS = [
    ChaosEntry(Fault.status(500, accept="after_accept"), 0.05),
    ChaosEntry(Fault.status(502), 0.05),
]


@pytest.fixture
def fake() -> Iterator[FakeSegment]:
    with FakeSegment(write_keys={WRITE_KEY: SourceConfig()}) as server:
        yield server


def drainer_env(database: OutboxDatabase, fake: FakeSegment, **overrides: str) -> dict[str, str]:
    settings = {
        "segment_write_key": WRITE_KEY,
        "segment_base_url": fake.base_url,
        "settle_seconds": "0",
        "poll_seconds": "0.02",
        "lease_seconds": "2",
        "retry_base_seconds": "0.05",
        "retry_cap_seconds": "0.5",
        "segment_events_per_second": "0",
        "segment_requests_per_second": "0",
        "segment_batch_size": str(BATCH_SIZE),
        "shutdown_grace_seconds": str(GRACE_SECONDS),
    }
    settings.update(overrides)
    return relay_env(database.url, **settings)


# --- the backlog ------------------------------------------------------------------------------


def build_backlog(count: int, first_call: int, seed: int) -> Backlog:
    """`count` webhooks of about count/12 calls, overlapping in time, received in random order."""
    expected: dict[int, list[str]] = {}
    bodies: list[dict[str, Any]] = []
    for n in range(math.ceil(count / 12)):
        call_id = first_call + n
        # Never more than `count` in all: the last call keeps the start of its life.
        events = aircall_call(call_id, shift_seconds=n * 37)[: count - len(bodies)]
        bodies.extend(events)
        expected[call_id] = [aircall.validate_envelope(body).message_id for body in events]
    random.Random(seed).shuffle(bodies)
    return Backlog(bodies, expected)


def fill_outbox(database: OutboxDatabase, bodies: list[dict[str, Any]]) -> None:
    """Store `bodies` as the receiver would have, a minute ago (the settle window is over)."""
    received_at = datetime.now(UTC) - timedelta(minutes=1)
    before = database.count()

    async def insert() -> None:
        engine = create_engine(database.url, timeout_seconds=2.0)
        try:
            store = OutboxStore(engine)
            for start in range(0, len(bodies), 500):
                chunk = bodies[start : start + 500]
                stored = await store.insert_events(
                    [incoming_event(body, received_at) for body in chunk]
                )
                assert not any(event.duplicate for event in stored)
        finally:
            await engine.dispose()

    asyncio.run(insert())
    assert database.count() == before + len(bodies)


# --- the processes ----------------------------------------------------------------------------


def drain_to_the_end(
    database: OutboxDatabase, fake: FakeSegment, env: dict[str, str], total: int
) -> RelayProcess:
    """Run a drainer until every row is delivered, then stop it with SIGTERM (exit 0)."""
    drainer = RelayProcess("drain", env=env)
    try:
        wait_until(
            lambda: statuses(database) == {"delivered": total},
            f"all {total} rows delivered",
            timeout=120,
            process=drainer,
            detail=lambda: f"outbox: {statuses(database)}; fake: {fake.stats()}",
        )
        drainer.signal(signal.SIGTERM)
        code = drainer.wait(GRACE_SECONDS + EXIT_MARGIN_SECONDS + 10)
        assert code == 0, f"exit {code} after SIGTERM:\n{drainer.tail()}"
    finally:
        drainer.stop()
    return drainer


# --- SIGKILL ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kill:
    pid: int
    after_seconds: float  # after its first claim
    exit_code: int
    held: int  # rows it held under lease when it died
    delivered: int  # rows delivered in the whole outbox when it died


def run_and_kill(database: OutboxDatabase, env: dict[str, str], rng: random.Random) -> Kill:
    """Start a drainer, wait for its first claim, let it work a random while, SIGKILL it."""
    drainer = RelayProcess("drain", env=env)
    try:
        drainer.wait_for_log("drainer_started")
        wait_until(
            lambda: held_by(database, drainer.pid) > 0,
            "the drainer's first claim (the backlog should not be exhausted yet)",
            timeout=30,
            process=drainer,
            detail=lambda: f"outbox: {statuses(database)}",
        )
        delay = rng.uniform(0.0, 0.8)
        time.sleep(delay)
        code = drainer.kill()
    finally:
        drainer.stop()
    assert code == -signal.SIGKILL, f"exit {code}:\n{drainer.tail()}"
    return Kill(
        pid=drainer.pid,
        after_seconds=round(delay, 3),
        exit_code=code,
        held=held_by(database, drainer.pid),
        delivered=statuses(database).get("delivered", 0),
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("database", "total"),
    [
        ("sqlite", 5000),
        # Smaller on PostgreSQL, whose drainer is slower here, to keep the file's run short.
        pytest.param("postgresql", 1500, marks=pytest.mark.postgres),
    ],
    indirect=["database"],
    ids=["sqlite", "postgresql"],
)
def test_sigkill_at_random_moments_loses_nothing_and_keeps_each_calls_order(
    database: OutboxDatabase, fake: FakeSegment, total: int
) -> None:
    backlog = build_backlog(total, first_call=6_100_000_000, seed=20261123)
    fill_outbox(database, backlog.bodies)
    env = drainer_env(database, fake)
    rng = random.Random(4242)

    fake.set_chaos(KILL_PHASE_CHAOS, seed=7)
    kills = [run_and_kill(database, env, rng) for _ in range(KILLS)]
    report = "\n".join(str(kill) for kill in kills)
    # The kills hit a drainer at work: most of them with requests or a claim in flight.
    assert sum(1 for kill in kills if kill.held) >= KILLS // 2, report
    assert kills[-1].delivered < total, f"the backlog ran out before the last kill:\n{report}"

    fake.set_chaos(FINAL_RUN_CHAOS, seed=8)
    drain_to_the_end(database, fake, env, total)

    assert_accepted_exactly(fake, backlog)
    # A re-send is the same event with the same messageId.
    resent = assert_resends_are_copies(fake)
    assert resent, "no re-send at all: the kills and after-accept faults should cause some"
    assert statuses(database) == {"delivered": total}
    late = database.rows("SELECT count(*) AS n FROM outbox WHERE late")
    assert int(late[0]["n"]) == 0


# --- SIGTERM ----------------------------------------------------------------------------------


def test_sigterm_finishes_in_flight_requests_exits_zero_and_nothing_is_resent(
    database: OutboxDatabase, fake: FakeSegment
) -> None:
    total = 2000
    backlog = build_backlog(total, first_call=6_200_000_000, seed=99)
    fill_outbox(database, backlog.bodies)
    # A lease far longer than the test: any re-send would come from the shutdown, not from a
    # lease that ran out under load.
    env = drainer_env(database, fake, lease_seconds="60")
    fake.set_chaos([ChaosEntry(Fault.latency(300), 1.0)], seed=1)

    drainer = RelayProcess("drain", env=env)
    try:
        drainer.wait_for_log("segment_request")
        # Several requests in flight: more rows held than one batch carries.
        wait_until(
            lambda: held_by(database, drainer.pid) > BATCH_SIZE,
            "several requests in flight",
            timeout=30,
            process=drainer,
        )
        signalled_at = datetime.now(UTC)
        started = time.monotonic()
        drainer.signal(signal.SIGTERM)
        code = drainer.wait(GRACE_SECONDS + EXIT_MARGIN_SECONDS + 20)
        elapsed = time.monotonic() - started
    finally:
        drainer.stop()
    assert code == 0, f"exit {code} after SIGTERM:\n{drainer.tail()}"
    assert elapsed <= GRACE_SECONDS + EXIT_MARGIN_SECONDS, (
        f"exited {elapsed:.1f} s after SIGTERM, grace {GRACE_SECONDS} s:\n{drainer.tail()}"
    )
    events = [record.get("event") for record in drainer.records()]
    assert "drainer_stopped" in events, drainer.tail()
    assert "grace_period_over" not in events, drainer.tail()

    after_first = statuses(database)
    assert "delivering" not in after_first, f"rows left under lease: {after_first}"
    assert 0 < after_first.get("delivered", 0) < total, after_first
    # What the fake accepted is exactly what the drainer recorded as delivered: the requests in
    # flight at SIGTERM finished and were recorded, nothing was cut off mid-request.
    delivered = database.rows("SELECT message_id FROM outbox WHERE status = 'delivered'")
    accepted = {message["messageId"] for message in fake.accepted()}
    assert accepted == {row["message_id"] for row in delivered}
    log = fake.requests(include_bodies=False)
    assert not [entry for entry in log if "client_disconnected" in entry["flags"]]
    finished_after = [
        entry
        for entry in log
        if entry["status"] == 200 and datetime.fromisoformat(entry["received_at"]) > signalled_at
    ]
    assert finished_after, "no request in flight at SIGTERM was completed"

    fake.set_chaos([])
    drain_to_the_end(database, fake, env, total)
    assert fake.stats()["duplicates"] == 0, fake.duplicates()[:3]
    assert_accepted_exactly(fake, backlog)


def _hanging_fake_and_sigterm(
    database: OutboxDatabase, fake: FakeSegment, lease_seconds: str
) -> tuple[int, float, RelayProcess]:
    """A drainer whose requests hang at the fake when SIGTERM comes, with a 1 s grace."""
    backlog = build_backlog(36, first_call=6_300_000_000, seed=5)
    fill_outbox(database, backlog.bodies)
    fake.set_chaos([ChaosEntry(Fault.latency(30_000), 1.0)], seed=1)
    env = drainer_env(database, fake, lease_seconds=lease_seconds, shutdown_grace_seconds="1")
    drainer = RelayProcess("drain", env=env)
    try:
        wait_until(
            lambda: fake.connections_opened() > 0 and held_by(database, drainer.pid) > 0,
            "a request in flight",
            timeout=30,
            process=drainer,
        )
        time.sleep(0.2)  # the request is at the fake, waiting for its answer
        started = time.monotonic()
        drainer.signal(signal.SIGTERM)
        code = drainer.wait(30)
        elapsed = time.monotonic() - started
    finally:
        drainer.stop()
    return code, elapsed, drainer


def test_sigterm_with_requests_hanging_exits_zero_within_the_grace_period(
    sqlite_database: OutboxDatabase, fake: FakeSegment
) -> None:
    code, elapsed, drainer = _hanging_fake_and_sigterm(sqlite_database, fake, lease_seconds="2")
    assert code == 0, f"exit {code}:\n{drainer.tail()}"
    assert elapsed <= 1 + EXIT_MARGIN_SECONDS, f"{elapsed:.1f} s:\n{drainer.tail()}"
    assert "grace_period_over" in [record.get("event") for record in drainer.records()]
    assert fake.accepted() == []  # the abandoned requests were never accepted
    # Nothing is lost: once the lease is over, the next run delivers everything, once.
    fake.set_chaos([])
    drain_to_the_end(sqlite_database, fake, drainer_env(sqlite_database, fake), 36)
    assert len(fake.accepted()) == 36
    assert fake.stats()["duplicates"] == 0


def test_sigterm_past_the_grace_period_releases_the_rows_of_abandoned_requests(
    sqlite_database: OutboxDatabase, fake: FakeSegment
) -> None:
    code, _, drainer = _hanging_fake_and_sigterm(sqlite_database, fake, lease_seconds="60")
    assert code == 0, drainer.tail()
    left = statuses(sqlite_database)
    assert "delivering" not in left, f"rows still under the dead drainer's lease: {left}"


# Work done by a trigger each time a purge deletes the last row of a batch of 1,000 (ids are
# consecutive): a three-way join of this many rows, about a second, stands for a batch that takes
# long (a slow disk, a large outbox). 280**3 = 22 million rows counted.
SLOW_BATCH_JOIN_ROWS = 280


def _slow_purge_batches(database: OutboxDatabase) -> None:
    """Make every delivered row purgeable (delivered long ago) and each batch of 1,000 that a
    purge deletes take about a second."""
    path = sqlite_path(database.url)
    assert path is not None
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as connection:
        connection.execute(
            "UPDATE outbox SET status = 'delivered', attempts = 1, next_attempt_at = NULL, "
            "delivered_at = '2000-01-01 00:00:00.000000'"
        )
        connection.execute("CREATE TABLE slow_batch (x INTEGER NOT NULL)")
        connection.executemany(
            "INSERT INTO slow_batch VALUES (?)", [(n,) for n in range(SLOW_BATCH_JOIN_ROWS)]
        )
        connection.execute(
            "CREATE TRIGGER slow_purge_batch AFTER DELETE ON outbox WHEN OLD.id % 1000 = 0 "
            "BEGIN SELECT count(*) FROM slow_batch a, slow_batch b, slow_batch c "
            "WHERE a.x + b.x + c.x >= 0; END"
        )


def _write_lock_taken(path: str) -> bool:
    """Whether another connection holds SQLite's write lock now (BEGIN IMMEDIATE is refused at
    once); takes nothing if not."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None, timeout=0)) as connection:
        try:
            connection.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as error:
            if "locked" in str(error) or "busy" in str(error):
                return True
            raise
        connection.execute("ROLLBACK")
        return False


def _wait_for_a_write_in_progress(database: OutboxDatabase, timeout: float) -> None:
    """Wait until a write transaction has held the database for two checks 0.1 s apart (a slow
    purge batch, not a passing write)."""
    path = sqlite_path(database.url)
    assert path is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _write_lock_taken(path):
            time.sleep(0.1)
            if _write_lock_taken(path):
                return
        time.sleep(0.01)
    raise AssertionError(f"no write in progress within {timeout} s")


def test_sigterm_during_a_retention_purge_stops_it_after_the_batch_in_hand_and_exits_zero(
    sqlite_database: OutboxDatabase, fake: FakeSegment
) -> None:
    """SIGTERM while retention deletes a batch: the batch runs to its end, the purge stops
    there, and the drainer exits 0.

    The batch's transaction used to be abandoned halfway (its task cancelled while aiosqlite's
    thread ran the DELETE): SQLAlchemy then closed that connection from a task of its own,
    which waited for the DELETE, and when the process ended first `asyncio.run` waited for that
    task forever. The drainer logged `drainer_stopped` and never exited."""
    total = 2500  # three batches: two slow ones (ids 1,000 and 2,000), then 500 rows
    fill_outbox(sqlite_database, build_backlog(total, first_call=6_400_000_000, seed=17).bodies)
    _slow_purge_batches(sqlite_database)
    env = drainer_env(sqlite_database, fake, retention_delivered_days="1")
    drainer = RelayProcess("drain", env=env)
    try:
        drainer.wait_for_log("drainer_started")
        # Retention began at start: SIGTERM once a slow batch is seen under way (its DELETE
        # holds SQLite's write lock for about a second), not after a guessed delay, which a
        # busy or a fast machine gets wrong.
        _wait_for_a_write_in_progress(sqlite_database, timeout=10)
        drainer.signal(signal.SIGTERM)
        try:
            code = drainer.wait(20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 20 s after SIGTERM:\n{drainer.tail()}")
    finally:
        drainer.stop()
    assert code == 0, f"exit {code} after SIGTERM:\n{drainer.tail()}"
    events = [record.get("event") for record in drainer.records()]
    assert "drainer_stopped" in events, drainer.tail()
    assert "retention_purge" not in events, "the purge was over before SIGTERM"
    # The stop came between two batches: whole batches were deleted, the rest is kept.
    assert sqlite_database.count() in (total - 1000, total - 2000), drainer.tail()
    assert fake.requests(include_bodies=False) == []


# --- the commands' small contracts ------------------------------------------------------------


def test_drain_without_a_write_key_exits_2_naming_the_setting() -> None:
    password = "pg_Pw_8Hs2Kq0Zx"  # a made-up secret that must not be shown
    env = relay_env(
        f"postgresql://relay:{password}@127.0.0.1:1/relay",
        aircall_tokens=TOKENS,
    )
    result = run_relay("drain", env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "RELAY_SEGMENT_WRITE_KEY" in result.stderr
    for secret in (SAMPLE_TOKEN, password):
        assert secret not in output


def test_drain_once_delivers_a_settled_outbox_and_prints_a_summary(
    sqlite_database: OutboxDatabase, fake: FakeSegment
) -> None:
    backlog = build_backlog(24, first_call=6_400_000_000, seed=3)
    unsendable = sample("user.created")
    del unsendable["token"]
    unsendable["data"]["substatus"] = "y" * 40_000  # over 32 KB even trimmed: goes dead
    fill_outbox(sqlite_database, [*backlog.bodies, unsendable])
    env = relay_env(
        sqlite_database.url, segment_write_key=WRITE_KEY, segment_base_url=fake.base_url
    )  # the default settle window (5 s) is long over for rows received a minute ago
    result = run_relay("drain", "--once", env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert WRITE_KEY not in output
    summaries = [
        record
        for record in map(_json_or_none, result.stdout.splitlines())
        if isinstance(record, dict) and "event" not in record
    ]
    assert len(summaries) == 1, output
    summary = summaries[0]
    assert summary["delivered"] == 24, summary
    assert summary["dead"] == 1, summary
    assert summary["requests"] >= 1, summary
    assert (summary["late"], summary["retried"], summary["released"]) == (0, 0, 0), summary
    assert_accepted_exactly(fake, backlog)
    assert statuses(sqlite_database) == {"delivered": 24, "dead": 1}


def _json_or_none(line: str) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        return None


def test_run_without_a_write_key_receives_and_keeps_rows_pending(
    sqlite_database: OutboxDatabase,
) -> None:
    env = relay_env(sqlite_database.url, aircall_tokens=TOKENS, settle_seconds="0")
    relay = RelayProcess("run", "--port", "0", env=env)
    try:
        response = httpx.post(relay.url() + WEBHOOK, json=sample("call.created"), timeout=10)
        assert response.status_code == 200, response.text
        paused = relay.wait_for_log("delivery_paused")
        assert "RELAY_SEGMENT_WRITE_KEY" in json.dumps(paused)
        time.sleep(0.3)  # a drainer that did send would have claimed the row by now
        assert statuses(sqlite_database) == {"pending": 1}
        relay.signal(signal.SIGTERM)
        assert relay.wait(GRACE_SECONDS + EXIT_MARGIN_SECONDS + 10) == 0, relay.tail()
    finally:
        relay.stop()
    assert SAMPLE_TOKEN not in relay.output()
    assert statuses(sqlite_database) == {"pending": 1}


def test_run_with_a_write_key_delivers_a_webhook_end_to_end(
    sqlite_database: OutboxDatabase, fake: FakeSegment
) -> None:
    env = relay_env(
        sqlite_database.url,
        aircall_tokens=TOKENS,
        segment_write_key=WRITE_KEY,
        segment_base_url=fake.base_url,
        settle_seconds="0",
        poll_seconds="0.05",
        shutdown_grace_seconds=str(GRACE_SECONDS),
    )
    body = sample("call.created")
    relay = RelayProcess("run", "--port", "0", env=env)
    try:
        response = httpx.post(relay.url() + WEBHOOK, json=body, timeout=10)
        assert response.status_code == 200, response.text
        fake.wait_for(count=1, timeout=30)
        wait_until(
            lambda: statuses(sqlite_database) == {"delivered": 1},
            "the row recorded as delivered",
            timeout=30,
            process=relay,
        )
        relay.signal(signal.SIGTERM)
        assert relay.wait(GRACE_SECONDS + EXIT_MARGIN_SECONDS + 10) == 0, relay.tail()
    finally:
        relay.stop()
    [message] = fake.accepted()
    del body["token"]
    assert message["messageId"] == aircall.validate_envelope(body).message_id
    assert message["event"] == "call.created"
    assert message["writeKey"] == WRITE_KEY
    output = relay.output()
    assert WRITE_KEY not in output
    assert SAMPLE_TOKEN not in output
