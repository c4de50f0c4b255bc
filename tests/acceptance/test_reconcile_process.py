"""Issue 12's Done-when, as real processes on SQLite and PostgreSQL: `serve` and `drain`, the fake
Segment and the fake Aircall. The relay is stopped while 50 calls happen (the fake Aircall holds
them and marks the webhook inactive); after the restart `aircall webhooks` exits 3 and
`--reactivate` fixes it; `reconcile --backfill` stores 50 `call.ended` rows; Segment receives
exactly one `call.ended` per call, also when the real ones then arrive late, in any order, and
when reconcile runs twice; nothing else is sent twice."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from relay.testing import FakeSegment, SourceConfig
from relay.testing.fake_aircall import FakeAircall, sample_calls
from tests.acceptance.processes import RelayProcess, relay_env, run_relay, wait_until
from tests.support import SAMPLE_TOKEN, OutboxDatabase, call_lifecycle

API_ID = "acceptance-api-id"
API_TOKEN = "acceptance-api-token-0123456789"
WRITE_KEY = "wk_reconcile_process_0123456789"
WEBHOOK = "/aircall/webhook"
JSON = {"content-type": "application/json"}
CALLS = 50
# What the drainer forwards of a call here: its start, its end, and a tag that comes after.
FORWARDED = ("call.created", "call.hungup", "call.ended", "call.tagged")


@pytest.fixture
def segment() -> Iterator[FakeSegment]:
    with FakeSegment(write_keys={WRITE_KEY: SourceConfig()}) as server:
        yield server


@pytest.fixture
def aircall() -> Iterator[FakeAircall]:
    with FakeAircall(api_id=API_ID, api_token=API_TOKEN, requests_per_minute=None) as server:
        yield server


def webhooks(call: dict[str, Any], events: tuple[str, ...]) -> list[bytes]:
    """The webhooks Aircall sends for `call` (the fake's call object), as posted bodies."""
    bodies = []
    for body in call_lifecycle(int(call["id"])):
        if body["event"] in events:
            at = {"call.created": call["started_at"], "call.ended": call["ended_at"] + 31}
            body["timestamp"] = at.get(body["event"], call["ended_at"])
            body["token"] = SAMPLE_TOKEN
            bodies.append(json.dumps(body).encode())
    return bodies


def post_all(relay_url: str, bodies: list[bytes]) -> None:
    with httpx.Client(base_url=relay_url, headers=JSON, timeout=10) as client:
        for body in bodies:
            assert client.post(WEBHOOK, content=body).status_code == 200


def test_fifty_calls_while_the_relay_was_down_reach_segment_once_each(
    database: OutboxDatabase, segment: FakeSegment, aircall: FakeAircall
) -> None:
    env = relay_env(
        database.url,
        aircall_tokens=f"main:{SAMPLE_TOKEN}",
        forward_events=",".join(FORWARDED),
        segment_write_key=WRITE_KEY,
        segment_base_url=segment.base_url,
        settle_seconds="0.2",
        poll_seconds="0.05",
        aircall_api_id=API_ID,
        aircall_api_token=API_TOKEN,
        aircall_api_url=aircall.base_url,
        aircall_probe_seconds="0",
        reconcile_grace_seconds="600",
    )
    webhook = aircall.add_webhook("https://relay.example/aircall/webhook", SAMPLE_TOKEN)
    now = int(time.time())
    # Two calls before the outage reach the relay whole; 50 during it never do.
    before = sample_calls(2, first_id=1_500_000_001, start=now - 4 * 3600)
    during = sample_calls(CALLS, first_id=1_600_000_001, start=now - 3 * 3600, spacing=90)
    aircall.add_calls(before)
    serve = RelayProcess("serve", "--port", "0", env=env)
    drain = RelayProcess("drain", env=env)
    try:
        post_all(serve.url(), [body for call in before for body in webhooks(call, FORWARDED)])
        segment.wait_for(count=2 * len(FORWARDED), timeout=30)

        serve.stop()  # the outage: Aircall fails its webhooks, and disables the webhook
        aircall.add_calls(during)
        aircall.set_webhook_active(webhook["webhook_id"], False)
        serve = RelayProcess("serve", "--port", "0", env=env)
        relay_url = serve.url()

        inactive = run_relay("aircall", "webhooks", env=env)
        assert inactive.returncode == 3, inactive.stdout + inactive.stderr
        fixed = run_relay("aircall", "webhooks", "--reactivate", env=env)
        assert fixed.returncode == 0, fixed.stdout + fixed.stderr
        assert run_relay("aircall", "webhooks", env=env).returncode == 0

        reconcile = ("reconcile", "--since", "26h", "--backfill", "--json")
        first = run_relay(*reconcile, "--requests-per-minute", "0", env=env)
        assert first.returncode == 0, first.stdout + first.stderr
        report = json.loads(first.stdout)
        assert (report["calls_seen"], report["missing"], report["backfilled"]) == (52, 50, 50)
        assert report["complete"] == 2 and report["outcome"] == "complete"
        reconciled = database.rows(
            "SELECT resource_id FROM outbox WHERE event = 'call.ended' AND origin = 'reconciled'"
        )
        assert sorted(int(row["resource_id"]) for row in reconciled) == [
            call["id"] for call in during
        ]
        segment.wait_for(count=2 * len(FORWARDED) + CALLS, timeout=60)

        # Aircall retries its webhooks once the relay answers again: late, in any order.
        late = [body for call in during for body in webhooks(call, FORWARDED)]
        random.Random(5).shuffle(late)
        post_all(relay_url, late)
        second = run_relay(*reconcile, "--requests-per-minute", "0", env=env)
        assert second.returncode == 0, second.stdout + second.stderr
        assert json.loads(second.stdout)["backfilled"] == 0
        # Everything but the 50 real call.ended: sent; those: skipped.
        expected = 2 * len(FORWARDED) + CALLS * len(FORWARDED)
        segment.wait_for(count=expected, timeout=60)
        wait_until(
            lambda: (
                not database.rows("SELECT id FROM outbox WHERE status IN ('pending', 'delivering')")
            ),
            "the outbox drained",
            timeout=30,
            process=drain,
        )
    finally:
        serve.stop()
        drain.stop()

    accepted = segment.accepted()
    assert len(accepted) == expected
    segment.assert_no_duplicates()
    ended: dict[int, list[dict[str, Any]]] = {}
    for message in accepted:
        if message["event"] == "call.ended":
            ended.setdefault(int(message["properties"]["call_id"]), []).append(message)
    assert sorted(ended) == sorted(call["id"] for call in [*before, *during])
    assert all(len(messages) == 1 for messages in ended.values())
    for call in during:
        [message] = ended[call["id"]]
        assert message["context"]["aircall_relay"] == {"origin": "reconciled"}
    # Every other event once: one message per (call, event).
    pairs = [(int(m["properties"]["call_id"]), m["event"]) for m in accepted]
    assert len(pairs) == len(set(pairs))
    skipped = database.rows(
        "SELECT status, last_error FROM outbox WHERE event = 'call.ended' AND origin = 'webhook'"
        " AND resource_id >= '1600000001'"
    )
    assert len(skipped) == CALLS and {row["status"] for row in skipped} == {"skipped"}
    runs = database.rows("SELECT backfilled, outcome FROM reconcile_runs ORDER BY id")
    assert [(run["backfilled"], run["outcome"]) for run in runs] == [
        (50, "complete"),
        (0, "complete"),
    ]


def test_the_command_s_exit_codes_and_messages(
    sqlite_database: OutboxDatabase, aircall: FakeAircall
) -> None:
    env = relay_env(sqlite_database.url)
    unset = run_relay("reconcile", env=env)
    assert unset.returncode == 2
    assert "RELAY_AIRCALL_API_ID" in unset.stderr and "RELAY_AIRCALL_API_TOKEN" in unset.stderr

    env = relay_env(
        sqlite_database.url,
        aircall_api_id=API_ID,
        aircall_api_token=API_TOKEN,
        aircall_api_url=aircall.base_url,
    )
    fast = ("--requests-per-minute", "0")
    bad_since = run_relay("reconcile", "--since", "last week", env=env)
    assert bad_since.returncode == 2 and "--since 'last week'" in bad_since.stderr

    aircall.add_calls(sample_calls(3, start=int(time.time()) - 4 * 3600))
    found = run_relay("reconcile", *fast, env=env)
    assert found.returncode == 4, found.stdout + found.stderr
    assert "missing                          3" in found.stdout
    assert found.stdout.splitlines()[-1].startswith("INCOMPLETE: 3 ended call(s)")

    aircall.fail_next(30, status=502)
    failing = run_relay("reconcile", "--backfill", *fast, env=env)
    assert failing.returncode == 1, failing.stdout + failing.stderr
    assert "502" in failing.stderr
    assert sqlite_database.rows("SELECT id FROM outbox") == []

    wrong = relay_env(
        sqlite_database.url,
        aircall_api_id=API_ID,
        aircall_api_token="not-the-token-0123456789",
        aircall_api_url=aircall.base_url,
    )
    refused = run_relay("reconcile", *fast, env=wrong)
    assert refused.returncode == 2
    assert "Aircall refused the API credentials" in refused.stderr
    assert "RELAY_AIRCALL_API_TOKEN" in refused.stderr
    for done in (found, failing, refused):
        assert API_TOKEN not in done.stdout + done.stderr
        assert "not-the-token" not in done.stdout + done.stderr
    outcomes = sqlite_database.rows("SELECT outcome FROM reconcile_runs ORDER BY id")
    assert [row["outcome"] for row in outcomes] == ["incomplete", "failed", "failed"]
