"""The limits toward Segment hold for the deployment, not per drainer (PRODUCT §10): three real
`aircall-relay drain` processes on one PostgreSQL database empty a backlog into the fake Segment
(in a thread of this process) with `RELAY_SEGMENT_EVENTS_PER_SECOND=200`, and what the fake
accepts over any 10 s stays within 10 s of that budget plus one batch.

Before the budget was shared through the database, each drainer had its own token bucket and
the three together sent about 600 events/s.

Every event of the backlog is a call of its own, so that every request carries a full batch:
requests then reach the fake half a second apart (a batch at 200/s), and the one batch the
bound allows beyond 10 s of budget also covers a request that reaches the fake a little later
than its turn (a busy machine), instead of the test failing on it.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from relay.testing import FakeSegment, SourceConfig
from tests.acceptance.processes import RelayProcess, relay_env, statuses, wait_until
from tests.acceptance.test_drain_process import fill_outbox
from tests.support import OutboxDatabase, sample

WRITE_KEY = "wk_deployment_rate_limit_R8t3Kq6Wz1"
DRAINERS = 3
EVENTS_PER_SECOND = 200
BATCH_SIZE = 100
WINDOW_SECONDS = 10.0
# 14 s of sending at the budget: more than one window, and at three times the budget (what the
# drainers sent before) the whole backlog would have gone within one window.
BACKLOG = 2_800


@pytest.fixture
def fake() -> Iterator[FakeSegment]:
    with FakeSegment(write_keys={WRITE_KEY: SourceConfig()}, keep_request_bodies=False) as server:
        yield server


def most_accepted_in_a_window(accepted: list[tuple[datetime, int]], seconds: float) -> int:
    """The most events accepted within `seconds` of any accepted request's receipt."""
    accepted = sorted(accepted)
    most = 0
    for index, (start, _) in enumerate(accepted):
        most = max(
            most,
            sum(
                count
                for moment, count in accepted[index:]
                if (moment - start).total_seconds() < seconds
            ),
        )
    return most


def backlog(count: int, first_call: int) -> list[dict[str, Any]]:
    """`count` `call.created` webhooks (token removed), each of a call of its own."""
    bodies = []
    for n in range(count):
        body = sample("call.created")
        del body["token"]
        body["data"]["id"] = first_call + n
        bodies.append(body)
    return bodies


@pytest.mark.postgres
@pytest.mark.slow
def test_three_drainers_together_stay_within_the_events_per_second_budget(
    postgres_database: OutboxDatabase, fake: FakeSegment
) -> None:
    database = postgres_database
    fill_outbox(database, backlog(BACKLOG, first_call=7_300_000_000))
    env = relay_env(
        database.url,
        segment_write_key=WRITE_KEY,
        segment_base_url=fake.base_url,
        settle_seconds="0",
        poll_seconds="0.05",
        segment_batch_size=str(BATCH_SIZE),
        segment_events_per_second=str(EVENTS_PER_SECOND),
        # RELAY_SEGMENT_REQUESTS_PER_SECOND stays at its default (20): both limits are on.
    )
    drainers = [RelayProcess("drain", env=env) for _ in range(DRAINERS)]
    try:
        for drainer in drainers:
            drainer.wait_for_log("drainer_started")
        wait_until(
            lambda: statuses(database) == {"delivered": BACKLOG},
            f"all {BACKLOG} rows delivered",
            timeout=120,
            detail=lambda: f"outbox: {statuses(database)}; fake: {fake.stats()}",
        )
        for drainer in drainers:
            drainer.signal(signal.SIGTERM)
        for drainer in drainers:
            assert drainer.wait(30) == 0, drainer.tail()
    finally:
        for drainer in drainers:
            drainer.stop()

    requests = fake.requests(include_bodies=False)
    assert {entry["status"] for entry in requests} == {200}
    accepted = [
        (datetime.fromisoformat(entry["received_at"]), int(entry["message_count"]))
        for entry in requests
    ]
    assert sum(count for _, count in accepted) == BACKLOG
    fake.assert_no_duplicates()
    # Each of the three drainers took its share: the budget was shared, not held by one.
    senders = database.rows("SELECT DISTINCT drainer FROM delivery_requests")
    assert len(senders) == DRAINERS
    most = most_accepted_in_a_window(accepted, WINDOW_SECONDS)
    budget = EVENTS_PER_SECOND * WINDOW_SECONDS + BATCH_SIZE
    span = (max(accepted)[0] - min(accepted)[0]).total_seconds()
    assert most <= budget, (
        f"{most} events accepted within {WINDOW_SECONDS:.0f} s by {DRAINERS} drainers "
        f"({BACKLOG / span:.0f} events/s over the whole drain); the deployment's budget is "
        f"{EVENTS_PER_SECOND}/s, so at most {budget:.0f} (one batch of burst)"
    )
