"""The retry policy, and the drainer's other pure decisions: what a Segment answer means, how long
to wait before a retry (after a failed delivery, a 429, or a fault of the database), when to give
a row up, how long a request waits for its turn in the rate limits, and how far to slow down
after a 429. What the drainer then does with the rows is `verdicts.py`; the settings these take
are `config.py`.

Nothing here reads a clock or a random source of its own: both come in as arguments, so the
tests drive time and chance.
"""

from __future__ import annotations

import email.utils
import enum
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from relay.db.reconcile import CallEndedRow


class Verdict(enum.Enum):
    """What the drainer does with the rows of a request, given Segment's answer."""

    DELIVERED = "delivered"  # 200: Segment took the batch
    RETRY = "retry"  # transient: 5xx, timeout, connection error, odd 2xx, 408/425
    RATE_LIMITED = "rate_limited"  # 429: wait for all sending, and slow down
    REJECTED = "rejected"  # 400/413/422: a bad message inside; split to find it
    CONFIGURATION = "configuration"  # 401/403/404/405: wrong key or URL; pause, keep rows


_CONFIGURATION_STATUSES = frozenset({401, 403, 404, 405})
_REJECTED_STATUSES = frozenset({400, 413, 422})


def classify(status: int | None) -> Verdict:
    """The verdict for an HTTP status, or None when no answer came (timeout, reset, refused).

    Only 200 is a success: Segment answers 200, and a 202 or 204 from something in between does
    not say the batch reached Segment (re-sending is harmless, the messageIds are stable).
    Unknown 4xx are retried rather than dead-lettered: nothing is killed on a guess.
    """
    if status is None:
        return Verdict.RETRY
    if status == 200:
        return Verdict.DELIVERED
    if status == 429:
        return Verdict.RATE_LIMITED
    if status in _REJECTED_STATUSES:
        return Verdict.REJECTED
    if status in _CONFIGURATION_STATUSES:
        return Verdict.CONFIGURATION
    return Verdict.RETRY


def backoff_seconds(
    attempt: int, base_seconds: float, cap_seconds: float, random: Callable[[], float]
) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**(attempt - 1))].

    `attempt` counts from 1 (the first retry). `random()` returns a float in [0, 1).
    """
    exponent = min(max(attempt - 1, 0), 62)  # 2**62 seconds is far past any cap
    ceiling: float = min(cap_seconds, base_seconds * float(2**exponent))
    return ceiling * random()


def out_of_attempts(attempt: int, max_attempts: int) -> bool:
    """Whether failed delivery number `attempt` of a row is its last: the row goes `dead`. Never
    with `max_attempts` 0 (RELAY_MAX_ATTEMPTS's default: keep trying)."""
    return bool(max_attempts) and attempt >= max_attempts


# A fault of the database (a locked SQLite file, a PostgreSQL restart). A claim that fails is
# tried again after claim_retry_seconds; a write (a request's record, a release, a take from the
# budget) after WRITE_RETRY_FIRST_SECONDS, then next_write_retry_seconds, for as long as
# write_retry_window_seconds allows. Past that window the write fails, and its rows wait for
# their lease to expire, to be claimed again (re-sends keep their messageId).
WRITE_RETRY_FIRST_SECONDS = 0.05


def claim_retry_seconds(failures: int) -> float:
    """The wait after `failures` claims in a row failed: 0.2 s, doubling, at most 5 s."""
    return min(0.1 * 2.0**failures, 5.0)


def next_write_retry_seconds(previous: float) -> float:
    return min(previous * 2, 2.0)


def write_retry_window_seconds(lease_seconds: float) -> float:
    """How long a write is retried: half a lease, at least a second."""
    return max(lease_seconds / 2, 1.0)


def retry_after_seconds(
    headers: Mapping[str, str], now: datetime, default_seconds: float, cap_seconds: float
) -> float:
    """Seconds a 429 asks us to wait: the larger of `Retry-After` (seconds or an HTTP date) and
    `X-RateLimit-Reset` (seconds), else the default; never negative, never above the cap.

    Never raises: a value that does not parse is ignored (the other header, or the default,
    decides). `now` is an aware datetime (the moment the answer came)."""
    waits: list[float] = []
    lowered = {name.lower(): value for name, value in headers.items()}
    retry_after = lowered.get("retry-after")
    if retry_after is not None:
        waits.extend(_seconds_or_date(retry_after, now))
    reset = lowered.get("x-ratelimit-reset")
    if reset is not None:
        waits.extend(_seconds(reset))
    wait = max(waits) if waits else default_seconds
    return min(max(wait, 0.0), cap_seconds)


# A number of seconds: RFC 9110's delay-seconds (`1*DIGIT`), and, leniently, a sign and a
# fraction. ASCII digits only (Python's `float` would also take `1_0`, `1e3` or other scripts'
# digits).
_SECONDS = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


def _seconds(text: str) -> list[float]:
    text = text.strip()
    return [float(text)] if _SECONDS.fullmatch(text) else []


def _seconds_or_date(text: str, now: datetime) -> list[float]:
    seconds = _seconds(text)
    if seconds:
        return seconds
    moment = http_date(text, now)
    return [] if moment is None else [(moment - now).total_seconds()]


_MONTHS = {
    name: number
    for number, name in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"),
        start=1,
    )
}
_TIME = r"([0-9]{2}):([0-9]{2}):([0-9]{2})"
# RFC 9110 section 5.6.7's three forms (the day name is not checked against the date).
# IMF-fixdate: `Sun, 06 Nov 1994 08:49:37 GMT`.
_IMF_FIXDATE = re.compile(
    rf"[a-z]{{3}}, ([0-9]{{2}}) ([a-z]{{3}}) ([0-9]{{4}}) {_TIME} gmt", re.I | re.A
)
# Obsolete RFC 850 form: `Sunday, 06-Nov-94 08:49:37 GMT`.
_RFC850 = re.compile(
    rf"[a-z]{{6,9}}, ([0-9]{{2}})-([a-z]{{3}})-([0-9]{{2}}) {_TIME} gmt", re.I | re.A
)
# ANSI C's asctime() form: `Sun Nov  6 08:49:37 1994`.
_ASCTIME = re.compile(rf"[a-z]{{3}} ([a-z]{{3}}) ([ 0-9][0-9]) {_TIME} ([0-9]{{4}})", re.I | re.A)


def http_date(text: str, now: datetime) -> datetime | None:
    """An HTTP date (RFC 9110 section 5.6.7) as an aware UTC datetime, or None.

    The three forms a recipient must accept: IMF-fixdate, the obsolete RFC 850 form (its
    two-digit year is the latest year with those digits not more than 50 years after `now`'s)
    and asctime's (no zone: UTC, as every HTTP date). Other RFC 5322 dates are accepted too,
    leniently, with a zone of `-0000` or none read as UTC. Garbage gives None, never an error.
    """
    text = text.strip()
    fields: tuple[str, ...]
    if match := _IMF_FIXDATE.fullmatch(text):
        day, month, year, hour, minute, second = match.groups()
        fields = (year, month, day, hour, minute, second)
    elif match := _RFC850.fullmatch(text):
        day, month, short_year, hour, minute, second = match.groups()
        latest = now.year + 50
        year = str(latest - (latest - int(short_year)) % 100)
        fields = (year, month, day, hour, minute, second)
    elif match := _ASCTIME.fullmatch(text):
        month, day, hour, minute, second, year = match.groups()
        fields = (year, month, day, hour, minute, second)
    else:
        return _lenient_date(text)
    return _utc_moment(*fields)


def _utc_moment(
    year: str, month: str, day: str, hour: str, minute: str, second: str
) -> datetime | None:
    number = _MONTHS.get(month.lower())
    if number is None:
        return None
    leap = int(second) == 60  # a leap second (RFC 9110 allows it): the next second
    try:
        moment = datetime(
            int(year), number, int(day), int(hour), int(minute), int(second) - leap, tzinfo=UTC
        )
        return moment + timedelta(seconds=leap)
    except (ValueError, OverflowError):  # no such date or time (31 Feb, 25:00), or past 9999
        return None


def _lenient_date(text: str) -> datetime | None:
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    # A date without a zone, or with `-0000` ("zone unknown"), is naive: read it as UTC.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def budget_wait(available: float, per_second: float) -> float:
    """How long a request waits for its turn, given what a token bucket refilled at `per_second`
    holds once the request's tokens are taken: nothing while it holds enough (`available` not
    negative), else until the refill has paid the tokens promised ahead, this request's
    included. No wait without a limit (`per_second` 0).

    The bucket is the deployment's, in the database (`relay.db.delivery`), so that requests of
    every drainer that take from it in turn are spaced at the rate."""
    if per_second <= 0 or available >= 0:
        return 0.0
    return -available / per_second


@dataclass
class Concurrency:
    """How many requests may be in flight: halved by each 429, grown back by one every
    `recover_after` successes, never above `maximum` nor below 1."""

    maximum: int
    current: int
    recover_after: int = 20
    _successes: int = 0

    @classmethod
    def of(cls, maximum: int) -> Concurrency:
        return cls(maximum=maximum, current=maximum)

    def on_rate_limited(self) -> None:
        self.current = max(1, self.current // 2)
        self._successes = 0

    def on_success(self) -> None:
        if self.current >= self.maximum:
            return
        self._successes += 1
        if self._successes >= self.recover_after:
            self.current += 1
            self._successes = 0


def second_call_ended(claimed: Sequence[int], rows: Sequence[CallEndedRow]) -> dict[int, str]:
    """Which claimed `call.ended` rows to skip, so that exactly one `call.ended` per call reaches
    Segment when the outbox holds two: Aircall's own (origin `webhook`) and one back-filled by
    `reconcile --backfill` (origin `reconciled`). `rows` are every `call.ended` row of the
    claimed rows' calls; returns {claimed id: reason}.

    A claimed row gives way to a row of the other origin that may have reached Segment already
    (delivered, or retried after a failed attempt, whose request Segment may have taken), and a
    webhook row to a reconciled row that has not been sent yet either: the back-filled row came
    first (reconcile never back-fills a call that has a `call.ended`), so it is the one that
    goes, and the late webhook stays on record as `skipped`. Rows `dead` or `skipped` count for
    nothing. Two rows of the same origin are left alone: two webhooks of one call that differ
    are two events Aircall sent, as before reconciliation existed.
    """
    by_key: dict[str, list[CallEndedRow]] = {}
    for row in rows:
        by_key.setdefault(row.ordering_key, []).append(row)
    mine = set(claimed)
    skipped: dict[int, str] = {}
    for row in rows:
        if row.id not in mine:
            continue
        rivals = [
            other
            for other in by_key[row.ordering_key]
            if other.id != row.id and other.origin != row.origin
        ]
        sent = [other for other in rivals if _may_have_reached_segment(other)]
        waiting = [
            other
            for other in rivals
            if other.origin == "reconciled" and other.status in ("pending", "delivering")
        ]
        if sent:
            winner = sent[0]
        elif row.origin == "webhook" and row.attempts == 0 and waiting:
            winner = waiting[0]
        else:
            continue
        what = "back-filled by reconcile" if winner.origin == "reconciled" else "Aircall's own"
        skipped[row.id] = (
            f"a second call.ended of this call: outbox row {winner.id} ({what}, origin "
            f"{winner.origin}) is the one sent to Segment"
        )
    return skipped


def _may_have_reached_segment(row: CallEndedRow) -> bool:
    return row.status == "delivered" or (
        row.status in ("pending", "delivering") and row.attempts > 0
    )
