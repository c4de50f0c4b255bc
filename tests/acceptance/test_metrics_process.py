"""Both processes' Prometheus metrics scraped over real HTTP: `aircall-relay serve` (webhooks,
outbox gauges read from the database) and `aircall-relay drain` (its own metrics port), then
`run` (one `/metrics` for both), each on a metrics port of its own, and a metrics port already in
use (exit 2, naming the setting).

The fake Segment runs in a thread of this process; the relay commands are real subprocesses.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.testing import FakeSegment, SourceConfig
from tests.acceptance.processes import RelayProcess, relay_env, run_relay
from tests.support import SAMPLE_TOKEN, OutboxDatabase, sample

WRITE_KEY = "wk_metrics_process_J3n8Tq2Vd6"
TOKENS = f"main:{SAMPLE_TOKEN}"
WEBHOOK = "/aircall/webhook"
FORWARDED = "call.created,call.answered,call.hungup,call.ended,user.created"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def fake() -> Iterator[FakeSegment]:
    with FakeSegment(write_keys={WRITE_KEY: SourceConfig()}) as server:
        yield server


def settings(fake: FakeSegment, **overrides: str) -> dict[str, str]:
    values = {
        "aircall_tokens": TOKENS,
        "forward_events": FORWARDED,
        "segment_write_key": WRITE_KEY,
        "segment_base_url": fake.base_url,
        "settle_seconds": "0",
        "poll_seconds": "0.02",
        "segment_events_per_second": "0",
        "segment_requests_per_second": "0",
        "call_ended_timeout_seconds": "1",
        "shutdown_grace_seconds": "2",
    }
    values.update(overrides)
    return values


def scrape(url: str) -> Samples:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels} not exported; have {sorted(n for n, _ in samples)}"
    return samples[key]


def total(samples: Samples, name: str) -> float:
    """The sum over every label combination of `name`."""
    return sum(v for (n, _), v in samples.items() if n == name)


def call_event(event: str, call_id: int) -> dict[str, Any]:
    body = sample(event)
    body["data"]["id"] = call_id
    return body


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waiting for {what}: not within {timeout} s")
        time.sleep(0.05)


def statuses(database: OutboxDatabase) -> dict[str, int]:
    rows = database.rows("SELECT status, count(*) AS n FROM outbox GROUP BY status")
    return {row["status"]: int(row["n"]) for row in rows}


def stop(process: RelayProcess) -> None:
    process.signal(signal.SIGTERM)
    code = process.wait(15)
    assert code == 0, f"exit {code} after SIGTERM:\n{process.tail()}"


def test_serve_and_drain_export_what_happened(
    sqlite_database: OutboxDatabase, fake: FakeSegment
) -> None:
    env = relay_env(sqlite_database.url, **settings(fake, drainer_metrics_port="0"))
    too_large = sample("user.created")
    too_large["data"]["substatus"] = "y" * 40_000  # over Segment's 32 KB even trimmed: dead
    webhooks = [
        # call 1 hangs up and its call.ended never comes; call 2 has its call.ended
        *(call_event(name, 1001) for name in ("call.created", "call.answered", "call.hungup")),
        *(call_event(name, 1002) for name in ("call.created", "call.hungup", "call.ended")),
        too_large,
    ]

    receiver = RelayProcess("serve", "--port", "0", env=env)
    drainer: RelayProcess | None = None
    try:
        base = receiver.url()
        with httpx.Client(base_url=base, timeout=10) as client:
            for body in webhooks:
                assert client.post(WEBHOOK, json=body).json()["status"] == "stored"
            assert client.post(WEBHOOK, json=webhooks[0]).json()["status"] == "duplicate"
            assert client.post(WEBHOOK, json=call_event("call.tagged", 1001)).status_code == 200
            assert client.post(WEBHOOK, json={"token": "x" * 20}).status_code == 401

        # Before any delivery: the backlog, read from the database.
        metrics = receiver.metrics_url()
        before = scrape(metrics)
        assert value(before, "relay_outbox_up") == 1
        assert value(before, "relay_outbox_rows", status="pending") == 7
        assert value(before, "relay_outbox_rows", status="dead") == 0
        assert value(before, "relay_outbox_oldest_pending_age_seconds") > 0

        drainer = RelayProcess("drain", env=env)
        port = int(drainer.wait_for_log("metrics_listening")["port"])
        wait_for(
            lambda: statuses(sqlite_database) == {"delivered": 6, "dead": 1, "skipped": 1},
            "every row delivered, dead or skipped",
        )
        drained = scrape(f"http://127.0.0.1:{port}/metrics")
        # Once call 1's call.hungup is older than the timeout (1 s), it awaits its call.ended.
        wait_for(
            lambda: (
                value(scrape(receiver.metrics_url()), "relay_outbox_calls_awaiting_call_ended") == 1
            ),
            "call 1 counted as awaiting call.ended",
        )
        received = scrape(metrics)
    finally:
        if drainer is not None:
            drainer.stop()
        receiver.stop()

    # The drainer's own port: what it sent to Segment.
    assert value(drained, "relay_events_delivered_total") == 6
    assert total(drained, "relay_events_dead_total") == 1
    assert value(drained, "relay_receipt_to_delivery_seconds_count") == 6
    assert value(drained, "relay_segment_requests_total", status="200", verdict="delivered") >= 1
    assert value(drained, "relay_events_late_total") == 0
    assert value(drained, "relay_segment_requests_in_flight") == 0
    assert len(fake.accepted()) == 6

    # The receiver: webhooks by event and outcome, duplicates, latency, and the outbox now.
    webhooks_total = "relay_webhooks_total"
    assert value(received, webhooks_total, event="call.created", outcome="stored") == 2
    assert value(received, webhooks_total, event="call.created", outcome="duplicate") == 1
    assert value(received, webhooks_total, event="call.tagged", outcome="skipped") == 1
    assert value(received, webhooks_total, event="user.created", outcome="stored") == 1
    assert value(received, webhooks_total, event="none", outcome="unauthorized") == 1
    assert value(received, "relay_webhook_duplicates_total") == 1
    assert value(received, "relay_webhook_duration_seconds_count", outcome="stored") == 7
    assert value(received, "relay_outbox_up") == 1
    assert value(received, "relay_outbox_rows", status="pending") == 0
    assert value(received, "relay_outbox_rows", status="delivering") == 0
    assert value(received, "relay_outbox_rows", status="dead") == 1
    assert value(received, "relay_outbox_oldest_pending_age_seconds") == 0
    # The receiver never shows the drainer's metrics, nor the other way round.
    assert total(received, "relay_events_delivered_total") == 0
    assert total(drained, "relay_webhooks_total") == 0

    # Both stopped with SIGTERM and exited 0; the drainer's port is closed.
    assert (receiver.process.returncode, drainer.process.returncode) == (0, 0)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_run_serves_the_drainers_metrics_on_the_receivers_port(
    sqlite_database: OutboxDatabase, fake: FakeSegment
) -> None:
    env = relay_env(sqlite_database.url, **settings(fake))
    relay = RelayProcess("run", "--port", "0", env=env)
    try:
        base = relay.url()
        for event in ("call.created", "call.answered"):
            response = httpx.post(base + WEBHOOK, json=call_event(event, 2001), timeout=10)
            assert response.json()["status"] == "stored"
        wait_for(lambda: statuses(sqlite_database) == {"delivered": 2}, "both delivered")
        samples = scrape(relay.metrics_url())
        stop(relay)
    finally:
        relay.stop()
    assert value(samples, "relay_webhooks_total", event="call.answered", outcome="stored") == 1
    assert value(samples, "relay_events_delivered_total") == 2
    assert value(samples, "relay_outbox_rows", status="pending") == 0
    # One metrics port, the receiver's: the drainer's own is not opened by `run`.
    events = [record.get("event") for record in relay.records()]
    assert events.count("metrics_listening") == 1


def test_drain_with_its_metrics_port_in_use_exits_2_naming_the_setting(
    sqlite_database: OutboxDatabase, fake: FakeSegment
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        env = relay_env(sqlite_database.url, **settings(fake, drainer_metrics_port=str(port)))
        result = run_relay("drain", env=env, timeout=30)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "RELAY_DRAINER_METRICS_PORT" in result.stderr
    assert f"127.0.0.1:{port} is already in use" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert statuses(sqlite_database) == {}  # it stopped before doing anything


def test_serve_with_its_metrics_port_in_use_exits_2_naming_the_setting(
    sqlite_database: OutboxDatabase, fake: FakeSegment
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        env = relay_env(sqlite_database.url, **settings(fake, receiver_metrics_port=str(port)))
        result = run_relay("serve", "--port", "0", env=env, timeout=30)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "RELAY_RECEIVER_METRICS_PORT" in result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
