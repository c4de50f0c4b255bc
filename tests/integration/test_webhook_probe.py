"""The drainer's probe of Aircall's webhooks (relay/drainer/webhook_probe.py) against the fake
Aircall over real HTTP: the gauge per label, a warning when a label's state changes, and a
failing probe that is logged and counted and goes on."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest
import structlog

from relay.aircall_api import AircallApi
from relay.drainer.metrics import DrainerMetrics
from relay.drainer.webhook_probe import WebhookProbe
from relay.settings import AircallToken, Secret
from relay.testing.fake_aircall import FakeAircall

pytestmark = pytest.mark.anyio

API = ("fake-api-id", "fake-api-token-0123456789abcdef")
TOKENS = (
    AircallToken("main", Secret("main-webhook-token-0123456789")),
    AircallToken("second", Secret("second-webhook-token-0123456789")),
)
URL = "https://relay.example/aircall/webhook"


@pytest.fixture
def fake() -> Iterator[FakeAircall]:
    with FakeAircall(api_id=API[0], api_token=API[1], requests_per_minute=None) as server:
        yield server


def gauge(metrics: DrainerMetrics, label: str) -> float | None:
    return metrics.registry.get_sample_value("relay_aircall_webhook_active", {"label": label})


def failures(metrics: DrainerMetrics, reason: str) -> float | None:
    return metrics.registry.get_sample_value(
        "relay_aircall_probe_failures_total", {"reason": reason}
    )


def probe_events(logs: list[dict[str, object]]) -> list[tuple[object, object]]:
    return [(log["event"], log.get("label")) for log in logs if "aircall" in str(log["event"])]


async def test_the_gauge_follows_each_label_and_a_change_is_a_warning(fake: FakeAircall) -> None:
    main = fake.add_webhook(URL, TOKENS[0].token.reveal())
    second = fake.add_webhook(URL, TOKENS[1].token.reveal(), active=False)
    fake.add_webhook("https://elsewhere.example", "not-the-relays-token-000000")
    metrics = DrainerMetrics()
    async with AircallApi(fake.base_url, *API, requests_per_minute=0) as api:
        probe = WebhookProbe(api, TOKENS, None, metrics, period_seconds=60)
        with structlog.testing.capture_logs() as first:
            assert await probe.check() == {"main": True, "second": False}
        assert (gauge(metrics, "main"), gauge(metrics, "second")) == (1, 0)
        # At the first probe, only what is wrong is said.
        assert probe_events(first) == [("aircall_webhook_inactive", "second")]
        assert first[0]["log_level"] == "warning"
        assert "--reactivate" in str(first[0]["detail"])
        assert TOKENS[1].token.reveal() not in str(first)

        with structlog.testing.capture_logs() as unchanged:
            await probe.check()
        assert probe_events(unchanged) == []

        fake.set_webhook_active(main["webhook_id"], False)
        fake.set_webhook_active(second["webhook_id"], True)
        with structlog.testing.capture_logs() as changed:
            assert await probe.check() == {"main": False, "second": True}
        assert probe_events(changed) == [
            ("aircall_webhook_inactive", "main"),
            ("aircall_webhook_active", "second"),
        ]
        assert all(log["log_level"] == "warning" for log in changed)
        assert (gauge(metrics, "main"), gauge(metrics, "second")) == (0, 1)


async def test_a_label_no_webhook_carries_is_0_with_its_own_reason(fake: FakeAircall) -> None:
    fake.add_webhook(URL, TOKENS[0].token.reveal())
    metrics = DrainerMetrics()
    async with AircallApi(fake.base_url, *API, requests_per_minute=0) as api:
        with structlog.testing.capture_logs() as logs:
            await WebhookProbe(api, TOKENS, None, metrics, 60).check()
    assert gauge(metrics, "second") == 0
    assert "check RELAY_AIRCALL_TOKENS" in str(logs[0]["detail"])


async def test_a_failing_probe_is_logged_counted_and_tried_again(fake: FakeAircall) -> None:
    fake.add_webhook(URL, TOKENS[0].token.reveal())
    fake.add_webhook(URL, TOKENS[1].token.reveal())
    fake.fail_next(1, body=b"<html>down for maintenance</html>")
    metrics = DrainerMetrics()
    async with AircallApi(fake.base_url, *API, requests_per_minute=0) as api:
        probe = WebhookProbe(api, TOKENS, None, metrics, period_seconds=0.05)
        with structlog.testing.capture_logs() as logs:
            with anyio.move_on_after(10):
                async with anyio.create_task_group() as group:
                    group.start_soon(probe.run_forever)
                    while gauge(metrics, "second") is None:
                        await anyio.sleep(0.01)
                    group.cancel_scope.cancel()
    assert failures(metrics, "api") == 1
    [failed] = [log for log in logs if log["event"] == "aircall_probe_failed"]
    assert "not JSON" in str(failed["error"]) and failed["log_level"] == "warning"
    assert (gauge(metrics, "main"), gauge(metrics, "second")) == (1, 1)


async def test_refused_credentials_are_counted_apart(fake: FakeAircall) -> None:
    metrics = DrainerMetrics()
    async with AircallApi(fake.base_url, API[0], "a-wrong-token-0000000") as api:
        probe = WebhookProbe(api, TOKENS, None, metrics, period_seconds=0.05)
        with anyio.move_on_after(10):
            async with anyio.create_task_group() as group:
                group.start_soon(probe.run_forever)
                while failures(metrics, "credentials") is None:
                    await anyio.sleep(0.01)
                group.cancel_scope.cancel()
    assert gauge(metrics, "main") is None  # never known: not exported as 0
