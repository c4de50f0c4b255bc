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
from relay.drainer.config import DrainerConfig
from relay.drainer.policy import (
    Concurrency,
    Verdict,
    backoff_seconds,
    budget_wait,
    classify,
    http_date,
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


# The same moment, NOW + 42 s, in every form a Retry-After date may take.
IN_42_SECONDS = NOW + timedelta(seconds=42)


@pytest.mark.parametrize(
    "value",
    [
        "Mon, 23 Nov 2026 12:00:42 GMT",  # IMF-fixdate
        "Monday, 23-Nov-26 12:00:42 GMT",  # obsolete RFC 850
        "Mon Nov 23 12:00:42 2026",  # asctime
        "Mon, 23 Nov 2026 12:00:42 -0000",  # RFC 5322's "zone unknown": was a TypeError
        "Mon, 23 Nov 2026 12:00:42 +0000",
        "Mon, 23 Nov 2026 13:00:42 +0100",
        "Mon, 23 Nov 2026 12:00:42",  # no zone: UTC
        "  mon, 23 nov 2026 12:00:42 gmt ",
        format_datetime(IN_42_SECONDS, usegmt=True),
    ],
)
def test_retry_after_takes_every_http_date_form(value: str) -> None:
    assert http_date(value, NOW) == IN_42_SECONDS
    assert retry_after_seconds({"Retry-After": value}, NOW, 1.0, 300.0) == 42.0


def test_asctime_pads_a_one_digit_day_with_a_space() -> None:
    assert http_date("Sun Nov  6 08:49:37 1994", NOW) == datetime(
        1994, 11, 6, 8, 49, 37, tzinfo=UTC
    )


@pytest.mark.parametrize(
    ("value", "year"),
    [("Sunday, 06-Nov-94 08:49:37 GMT", 1994), ("Friday, 06-Nov-76 08:49:37 GMT", 2076)],
)
def test_rfc850_two_digit_years_are_never_more_than_50_years_ahead(value: str, year: int) -> None:
    moment = http_date(value, NOW)
    assert moment is not None and moment.year == year


def test_a_leap_second_is_the_next_second() -> None:
    assert http_date("Thu, 31 Dec 2026 23:59:60 GMT", NOW) == datetime(2027, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "soon",
        "1e3",
        "1_0",
        "inf",
        "nan",
        "\u0663",  # ARABIC-INDIC DIGIT THREE: float() would read it
        "Mon, 31 Feb 2026 12:00:42 GMT",
        "Mon, 23 Nov 2026 25:00:42 GMT",
        "Mon, 23 Nov 2026 12:00:42 +9999",
        "Mon, 23 Foo 2026 12:00:42 GMT",
        "Fri, 31 Dec 9999 23:59:60 GMT",
        "Mon, 23 Nov 12:00:42",
        "12:00:42",
    ],
)
def test_a_retry_after_that_does_not_parse_is_ignored(value: str) -> None:
    assert retry_after_seconds({"Retry-After": value}, NOW, 1.0, 300.0) == 1.0
    assert (
        retry_after_seconds({"Retry-After": value, "X-RateLimit-Reset": "9"}, NOW, 1.0, 300.0)
        == 9.0
    )


HEADER_TEXT = st.one_of(
    st.text(),
    st.text(alphabet="0123456789 :,-+.GMTSunMonNovDec"),
    st.from_regex(
        r"[A-Za-z]{3}, [0-9]{2} [A-Za-z]{3} [0-9]{2,4} [0-9]{2}:[0-9]{2}:[0-9]{2} .{0,6}"
    ),
    # Nearly dates: real day and month names, any numbers, any zone (or none).
    st.builds(
        "{}, {:02d} {} {} {:02d}:{:02d}:{:02d}{}".format,
        st.sampled_from(["Mon", "Sunday", "xyz"]),
        st.integers(0, 40),
        st.sampled_from(["Jan", "Feb", "nov", "Foo"]),
        st.integers(0, 12000),
        st.integers(0, 99),
        st.integers(0, 99),
        st.integers(0, 99),
        st.sampled_from(
            ["", " GMT", " -0000", " +0000", " +0130", " -2359", " +9999", " UT", " x"]
        ),
    ),
    st.builds(
        "{} {} {:>2} {:02d}:{:02d}:{:02d} {}".format,
        st.sampled_from(["Sun", "Mon"]),
        st.sampled_from(["Nov", "Dec", "Foo"]),
        st.integers(0, 40),
        st.integers(0, 99),
        st.integers(0, 99),
        st.integers(0, 99),
        st.integers(0, 12000),
    ),
)


@given(
    retry_after=st.none() | HEADER_TEXT,
    reset=st.none() | HEADER_TEXT,
    default=st.floats(0, 1000),
    cap=st.floats(0, 1e6),
    now=st.datetimes(timezones=st.just(UTC)),
)
def test_retry_after_never_raises_and_stays_within_the_cap(
    retry_after: str | None, reset: str | None, default: float, cap: float, now: datetime
) -> None:
    headers = {
        name: value
        for name, value in (("Retry-After", retry_after), ("X-RateLimit-Reset", reset))
        if value is not None
    }
    wait = retry_after_seconds(headers, now, default_seconds=default, cap_seconds=cap)
    assert 0.0 <= wait <= cap


WIDE_CAP = 1e12


@given(
    now=st.datetimes(
        min_value=datetime(1900, 1, 1), max_value=datetime(9000, 1, 1), timezones=st.just(UTC)
    ),
    offset=st.integers(-(10**9), 10**9),
    form=st.sampled_from(["imf", "rfc850", "asctime", "-0000"]),
)
def test_a_well_formed_http_date_gives_the_exact_wait(
    now: datetime, offset: int, form: str
) -> None:
    now = now.replace(microsecond=0)
    moment = now + timedelta(seconds=offset)
    if form == "rfc850" and not now.year - 49 <= moment.year <= now.year + 50:
        moment = now + timedelta(seconds=offset % (40 * 365 * 86400))  # unambiguous years
    value = {
        "imf": moment.strftime("%a, %d %b %Y %H:%M:%S GMT"),
        "rfc850": moment.strftime("%A, %d-%b-%y %H:%M:%S GMT"),
        "asctime": f"{moment:%a %b} {moment.day:2d} {moment:%H:%M:%S %Y}",
        "-0000": moment.strftime("%a, %d %b %Y %H:%M:%S -0000"),
    }[form]
    if moment.year < 1000:  # four digits in every form
        return
    assert http_date(value, now) == moment
    expected = (moment - now).total_seconds()
    assert retry_after_seconds({"Retry-After": value}, now, 1.0, WIDE_CAP) == max(expected, 0.0)
    assert retry_after_seconds({"Retry-After": value}, now, 1.0, 300.0) == min(
        max(expected, 0.0), 300.0
    )


@given(seconds=st.integers(0, 10**9), reset=st.integers(0, 10**9))
def test_delay_seconds_are_exact(seconds: int, reset: int) -> None:
    headers = {"Retry-After": str(seconds), "X-RateLimit-Reset": str(reset)}
    assert retry_after_seconds(headers, NOW, 1.0, WIDE_CAP) == max(seconds, reset)


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
