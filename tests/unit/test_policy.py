"""Delivery policies: verdicts, backoff, Retry-After, waits for the rate limits, adaptive
concurrency."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.db.delivery import SendLimits
from relay.drainer.loop import DrainerConfig
from relay.drainer.policy import (
    Concurrency,
    Verdict,
    backoff_seconds,
    budget_wait,
    classify,
    retry_after_seconds,
)

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (200, Verdict.DELIVERED),
        (None, Verdict.RETRY),
        (500, Verdict.RETRY),
        (502, Verdict.RETRY),
        (503, Verdict.RETRY),
        (504, Verdict.RETRY),
        (202, Verdict.RETRY),
        (204, Verdict.RETRY),
        (408, Verdict.RETRY),
        (418, Verdict.RETRY),
        (429, Verdict.RATE_LIMITED),
        (400, Verdict.REJECTED),
        (413, Verdict.REJECTED),
        (422, Verdict.REJECTED),
        (401, Verdict.CONFIGURATION),
        (403, Verdict.CONFIGURATION),
        (404, Verdict.CONFIGURATION),
    ],
)
def test_classify(status: int | None, verdict: Verdict) -> None:
    assert classify(status) is verdict


@given(attempt=st.integers(1, 200), draw=st.floats(0, 0.999999))
def test_backoff_is_full_jitter_below_the_capped_exponential(attempt: int, draw: float) -> None:
    delay = backoff_seconds(attempt, 1.0, 600.0, lambda: draw)
    ceiling = min(600.0, 2.0 ** (attempt - 1))
    assert 0 <= delay <= ceiling
    assert delay == pytest.approx(ceiling * draw)


def test_backoff_spreads_retries() -> None:
    source = random.Random(7)
    delays = [backoff_seconds(5, 1.0, 600.0, source.random) for _ in range(2000)]
    assert max(delays) <= 16
    assert 7 < sum(delays) / len(delays) < 9  # uniform on [0, 16): mean 8
    assert min(delays) < 0.5


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "2"}, 2.0),
        ({"retry-after": "2", "X-RateLimit-Reset": "7"}, 7.0),
        ({"X-RateLimit-Reset": "3"}, 3.0),
        ({}, 1.0),
        ({"Retry-After": "soon"}, 1.0),
        ({"Retry-After": "100000"}, 300.0),
        ({"Retry-After": "-5"}, 0.0),
        ({"Retry-After": format_datetime(NOW + timedelta(seconds=42), usegmt=True)}, 42.0),
    ],
)
def test_retry_after(headers: dict[str, str], expected: float) -> None:
    assert retry_after_seconds(headers, NOW, default_seconds=1.0, cap_seconds=300.0) == (
        pytest.approx(expected)
    )


def test_a_request_waits_until_the_refill_pays_what_was_promised_ahead() -> None:
    assert budget_wait(35.5, per_second=200.0) == 0.0  # enough left
    assert budget_wait(0.0, per_second=200.0) == 0.0  # exactly enough
    assert budget_wait(-100.0, per_second=200.0) == pytest.approx(0.5)
    assert budget_wait(-1.0, per_second=20.0) == pytest.approx(0.05)


@given(st.floats(min_value=-1e9, max_value=1e9, allow_nan=False))
def test_zero_rate_means_no_limit(available: float) -> None:
    assert budget_wait(available, per_second=0.0) == 0.0


@given(
    st.lists(st.integers(min_value=1, max_value=2500), min_size=1, max_size=50),
    st.floats(min_value=0.1, max_value=10_000.0),
)
def test_requests_taking_in_turn_are_spaced_at_the_rate(sizes: list[int], rate: float) -> None:
    # Taken at once from an empty bucket: each request goes its own size's time after the one
    # before it, so over any span the rate holds.
    available = 0.0
    waits = []
    for size in sizes:
        available -= size
        waits.append(budget_wait(available, rate))
    for before, after, size in zip([0.0, *waits], waits, sizes, strict=False):
        assert after - before == pytest.approx(size / rate)


def test_the_limits_a_drainer_takes_from_the_deployments_budget() -> None:
    # Both off: no budget at all (and no database work for it).
    assert DrainerConfig(events_per_second=0, requests_per_second=0).send_limits() is None
    # One request's worth of burst: a batch of events, one request.
    assert DrainerConfig(
        batch_size=50, events_per_second=500, requests_per_second=0
    ).send_limits() == SendLimits(
        events_per_second=500, requests_per_second=0, events_burst=50.0, requests_burst=1.0
    )
    assert DrainerConfig().send_limits() == SendLimits(
        events_per_second=500.0, requests_per_second=20.0, events_burst=100.0, requests_burst=1.0
    )


def test_concurrency_halves_on_429_and_recovers() -> None:
    concurrency = Concurrency.of(8)
    concurrency.on_rate_limited()
    assert concurrency.current == 4
    concurrency.on_rate_limited()
    concurrency.on_rate_limited()
    concurrency.on_rate_limited()
    assert concurrency.current == 1
    for _ in range(20):
        concurrency.on_success()
    assert concurrency.current == 2
    for _ in range(1000):
        concurrency.on_success()
    assert concurrency.current == 8
