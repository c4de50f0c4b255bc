"""Delivery policies: verdicts, backoff, Retry-After, token buckets, adaptive concurrency."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.drainer.policy import (
    Concurrency,
    TokenBucket,
    Verdict,
    backoff_seconds,
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


def test_token_bucket_spaces_reservations_at_the_rate() -> None:
    bucket = TokenBucket.per_second(100.0, now=0.0, largest_request=100)
    assert bucket.reserve(100, now=0.0) == 0.0  # starts full: one second's worth
    assert bucket.reserve(50, now=0.0) == pytest.approx(0.5)
    assert bucket.reserve(50, now=0.0) == pytest.approx(1.0)
    # After waiting, tokens come back at the rate, never above capacity.
    assert bucket.reserve(10, now=10.0) == 0.0
    assert bucket.level == pytest.approx(90.0)


def test_token_bucket_rate_over_time() -> None:
    bucket = TokenBucket.per_second(20.0, now=0.0)
    clock = 0.0
    sent = 0
    while clock < 10.0:
        wait = bucket.reserve(1, clock)
        clock += wait
        if clock < 10.0:
            sent += 1
    assert 20 * 10 <= sent <= 20 * 10 + 20  # the rate, plus one second's burst


def test_zero_rate_means_no_limit() -> None:
    bucket = TokenBucket.per_second(0.0, now=0.0)
    assert all(bucket.reserve(1000, now=0.0) == 0.0 for _ in range(100))


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
