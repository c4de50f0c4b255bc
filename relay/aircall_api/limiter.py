"""The pace of requests to Aircall's Public API.

Aircall limits requests per company and per minute (60 in its help centre, 120 in readings of
its API reference: shared/reference/aircall-webhooks.md §7), and answers 429 past it. Its
`X-AircallApi-Limit`, `-Remaining` and `-Reset` headers say where a company stands, but may be
sent only once the limit is reached. So the limiter:

- spaces requests evenly at the configured rate (60 a minute unless told otherwise), one at a
  time, with no burst: over any minute the client sends at most the rate (plus one);
- takes the rate the API states in `X-AircallApi-Limit` when no rate was given explicitly (an
  explicit rate is a cap the operator chose, kept when the API states a higher one);
- waits for `X-AircallApi-Reset` once `X-AircallApi-Remaining` reaches 0, and for `Retry-After`
  after a 429 (`hold_for`).

`-Reset` is read as a UNIX time when it is one (a value past the year 2001), else as seconds from
now. Every wait is capped (`max_wait_seconds`), so a wrong header cannot stall a command for
hours.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from email.utils import parsedate_to_datetime
from typing import Final

import anyio

DEFAULT_REQUESTS_PER_MINUTE: Final[float] = 60.0
# A `Reset` value above this is a UNIX time (2001-09-09), below it a number of seconds.
_EPOCH_THRESHOLD: Final[float] = 1_000_000_000.0


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if number == number and number not in (float("inf"), float("-inf")) else None


def seconds_until_reset(value: str | None, now: float) -> float | None:
    """Seconds until an `X-AircallApi-Reset` value (a UNIX time, or a number of seconds)."""
    number = _number(value)
    if number is None:
        return None
    return max(0.0, number - now if number > _EPOCH_THRESHOLD else number)


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """Seconds a `Retry-After` asks for: a number of seconds or an HTTP date; None when absent
    or unreadable."""
    if value is None:
        return None
    number = _number(value)
    if number is not None:
        return max(0.0, number)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError, IndexError):
        return None


class RateLimiter:
    """Requests at most `requests_per_minute` (None: Aircall's documented 60, adjusted to
    `X-AircallApi-Limit` when the API states one; 0 or less: no pacing of our own, though the
    API's headers and 429s are still honoured)."""

    def __init__(
        self,
        requests_per_minute: float | None = None,
        *,
        max_wait_seconds: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self.explicit = requests_per_minute is not None
        self.requests_per_minute = (
            DEFAULT_REQUESTS_PER_MINUTE if requests_per_minute is None else requests_per_minute
        )
        self.max_wait_seconds = max_wait_seconds
        self._clock = clock
        self._wall_clock = wall_clock
        self._sleep = sleep
        self._next = clock()  # when the next request may start
        self._lock = anyio.Lock()
        self.waited_seconds = 0.0  # in total, for the record

    @property
    def interval(self) -> float:
        return 60.0 / self.requests_per_minute if self.requests_per_minute > 0 else 0.0

    async def wait_turn(self) -> None:
        """Wait until the next request may start, and take that turn."""
        async with self._lock:
            delay = self._next - self._clock()
            if delay > 0:
                self.waited_seconds += delay
                await self._sleep(delay)
            self._next = max(self._next, self._clock()) + self.interval

    def hold_for(self, seconds: float) -> float:
        """No request before `seconds` from now (capped); returns the wait applied."""
        seconds = min(max(0.0, seconds), self.max_wait_seconds)
        self._next = max(self._next, self._clock() + seconds)
        return seconds

    def observe(self, headers: Mapping[str, str]) -> None:
        """Read the `X-AircallApi-*` headers of an answer, when present."""
        limit = _number(headers.get("x-aircallapi-limit"))
        if limit is not None and limit > 0 and not self.explicit:
            self.requests_per_minute = limit
        elif limit is not None and limit > 0 and 0 < limit < self.requests_per_minute:
            self.requests_per_minute = limit  # the API allows less than the cap we were given
        remaining = _number(headers.get("x-aircallapi-remaining"))
        if remaining is not None and remaining <= 0:
            reset = seconds_until_reset(headers.get("x-aircallapi-reset"), self._wall_clock())
            self.hold_for(60.0 if reset is None else reset)
