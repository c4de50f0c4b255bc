"""The pieces of relay/aircall_api that need no server: the limiter's reading of the
`X-AircallApi-*` and `Retry-After` headers, and the matching of webhooks to labels."""

from __future__ import annotations

import pytest

from relay.aircall import KNOWN_EVENTS
from relay.aircall_api.limiter import RateLimiter, retry_after_seconds, seconds_until_reset
from relay.aircall_api.webhooks import webhook_health
from relay.settings import AircallToken, Secret

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1800000042", 42.0),  # a UNIX time
        ("17", 17.0),  # seconds from now
        ("1799999990", 0.0),  # already past
        ("soon", None),
        (None, None),
    ],
)
def test_reset_is_a_unix_time_or_seconds(value: str | None, expected: float | None) -> None:
    assert seconds_until_reset(value, NOW) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("30", 30.0),
        ("Fri, 15 Jan 2027 08:00:30 GMT", 30.0),
        ("nan", None),
        ("later", None),
        (None, None),
    ],
)
def test_retry_after_is_seconds_or_an_http_date(value: str | None, expected: float | None) -> None:
    now = 1_800_000_000.0  # Fri, 15 Jan 2027 08:00:00 GMT
    assert retry_after_seconds(value, now) == expected


def test_a_wait_is_capped() -> None:
    limiter = RateLimiter(0, max_wait_seconds=120, clock=lambda: 0.0)
    assert limiter.hold_for(7200) == 120
    limiter.observe({"x-aircallapi-remaining": "0", "x-aircallapi-reset": str(2**40)})
    assert limiter._next == 120


def test_webhooks_are_matched_to_labels_by_token_and_what_they_miss_is_named() -> None:
    tokens = (
        AircallToken("main", Secret("main-webhook-token-0123")),
        AircallToken("eu", Secret("eu-webhook-token-012345")),
    )
    listed = [
        {
            "webhook_id": "a",
            "url": "u",
            "active": True,
            "token": "eu-webhook-token-012345",
            "events": ["call.ended"],
        },
        {
            "webhook_id": "b",
            "url": "u",
            "active": False,
            "token": "main-webhook-token-0123",
            "events": sorted(KNOWN_EVENTS),
        },
        {
            "webhook_id": "c",
            "url": "u",
            "active": True,
            "token": "main-webhook-token-01234",
            "events": [],
        },
    ]
    health = webhook_health(listed, tokens, frozenset({"call.ended", "call.created"}))
    assert [hook.label for hook in health.webhooks] == ["eu", "main", None]
    assert health.webhooks[0].missing_events == ("call.created",)
    assert health.active_by_label() == {"main": False, "eu": True}
    assert [hook.webhook_id for hook in health.inactive_matched()] == ["b"]
    assert "token" not in health.webhooks[0].as_json()
    every = webhook_health(listed, tokens, None)  # RELAY_FORWARD_EVENTS=*: every known event
    assert len(every.webhooks[0].missing_events) == len(KNOWN_EVENTS) - 1
    assert every.webhooks[1].missing_events == ()
