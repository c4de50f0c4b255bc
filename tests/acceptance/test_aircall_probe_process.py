"""The drainer's probe of Aircall's webhooks in real processes (`drain`, `run`) against the fake
Aircall and the fake Segment: `relay_aircall_webhook_active{label}` on the metrics, a warning for
a label without an active webhook, delivery that goes on while the probe fails, and the probe off
(saying which setting) without the API settings."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.testing import FakeSegment, SourceConfig
from relay.testing.fake_aircall import FakeAircall
from tests.acceptance.processes import RelayProcess, relay_env
from tests.support import SAMPLE_TOKEN, SECOND_TOKEN, OutboxDatabase, sample

WRITE_KEY = "wk_aircall_probe_Q8v2Lx5Tn3"
API_ID = "fake-api-id"
API_TOKEN = "fake-api-token-0123456789abcdef"
URL = "https://relay.example/aircall/webhook"


@pytest.fixture
def segment() -> Iterator[FakeSegment]:
    with FakeSegment(write_keys={WRITE_KEY: SourceConfig()}) as server:
        yield server


@pytest.fixture
def aircall() -> Iterator[FakeAircall]:
    with FakeAircall(api_id=API_ID, api_token=API_TOKEN) as server:
        yield server


def env_for(
    database: OutboxDatabase, segment: FakeSegment, aircall: FakeAircall, **overrides: str
) -> dict[str, str]:
    values = {
        "aircall_tokens": f"main:{SAMPLE_TOKEN},second:{SECOND_TOKEN}",
        "segment_write_key": WRITE_KEY,
        "segment_base_url": segment.base_url,
        "settle_seconds": "0",
        "poll_seconds": "0.02",
        "shutdown_grace_seconds": "2",
        "aircall_api_id": API_ID,
        "aircall_api_token": API_TOKEN,
        "aircall_api_url": aircall.base_url,
        "aircall_probe_seconds": "30",
        **overrides,
    }
    return relay_env(database.url, **values)


def gauges(url: str, name: str) -> dict[str, float]:
    text = httpx.get(url, timeout=10).text
    return {
        sample.labels.get("label") or sample.labels.get("reason", ""): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def stopped(process: RelayProcess) -> str:
    process.signal(signal.SIGTERM)
    assert process.wait(15) == 0, process.tail()
    return process.output()


def test_drain_exports_each_labels_webhook_state_and_warns(
    sqlite_database: OutboxDatabase, segment: FakeSegment, aircall: FakeAircall
) -> None:
    aircall.add_webhook(URL, SAMPLE_TOKEN)
    aircall.add_webhook(URL, SECOND_TOKEN, active=False)
    drainer = RelayProcess("drain", env=env_for(sqlite_database, segment, aircall))
    try:
        warning = drainer.wait_for_log("aircall_webhook_inactive")
        assert warning["label"] == "second" and warning["level"] == "warning"
        url = drainer.metrics_url()
        assert gauges(url, "relay_aircall_webhook_active") == {"main": 1.0, "second": 0.0}
        started = drainer.wait_for_log("aircall_probe_started")
        assert started["every_s"] == 30 and started["labels"] == ["main", "second"]
    finally:
        output = stopped(drainer)
    for secret in (API_TOKEN, SAMPLE_TOKEN, SECOND_TOKEN):
        assert secret not in output


def test_run_delivers_while_the_probe_fails_and_shows_the_failures(
    sqlite_database: OutboxDatabase, segment: FakeSegment, aircall: FakeAircall
) -> None:
    aircall.fail_next(1000, body=b"<html>down for maintenance</html>")
    env = env_for(sqlite_database, segment, aircall, receiver_metrics_port="0")
    relay = RelayProcess("run", "--port", "0", env=env)
    try:
        failed = relay.wait_for_log("aircall_probe_failed")
        assert "not JSON" in failed["error"]
        body = sample("call.created")
        assert httpx.post(f"{relay.url()}/aircall/webhook", json=body).status_code == 200
        segment.wait_for(count=1, timeout=15)
        failures = gauges(relay.metrics_url(), "relay_aircall_probe_failures_total")
        # Every reason is exported from the start (at 0), so that a rate over it has data.
        assert failures == {"api": 1.0, "credentials": 0.0, "error": 0.0}
    finally:
        stopped(relay)


def test_without_the_api_settings_the_probe_is_off_and_says_why(
    sqlite_database: OutboxDatabase, segment: FakeSegment, aircall: FakeAircall
) -> None:
    env = env_for(sqlite_database, segment, aircall, aircall_api_id="", aircall_api_token="")
    drainer = RelayProcess("drain", env=env)
    try:
        off = drainer.wait_for_log("aircall_probe_off")
        assert off["reason"] == "RELAY_AIRCALL_API_ID and RELAY_AIRCALL_API_TOKEN not set"
        drainer.wait_for_log("drainer_started")
        time.sleep(0.5)
        assert aircall.request_count() == 0
    finally:
        stopped(drainer)
