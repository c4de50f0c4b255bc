"""The statements on the deployment's budget toward Segment (`rate_limits`), which every drainer
takes from before it sends ([architecture.md](../../docs/architecture.md), the limits toward
Segment)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from relay.db.tables import rate_limits


@dataclass(frozen=True, slots=True)
class SendLimits:
    """The limits toward Segment as one drainer is configured: events and requests per second
    (0: no limit), and the most of each the deployment's bucket holds (its burst)."""

    events_per_second: float
    requests_per_second: float
    events_burst: float
    requests_burst: float


@dataclass(frozen=True, slots=True)
class TakenBudget:
    """The deployment's budget once a request's share is taken: the events and requests left
    (negative: promised ahead to requests that wait their turn), counted from the end of a 429's
    pause when one lasts `paused_seconds` longer."""

    events_available: float
    requests_available: float
    paused_seconds: float


# The row of `rate_limits` that holds the budget toward Segment.
SEGMENT_RATE_LIMIT = "segment"


def _database_clock(dialect: str) -> Any:
    """SQL: the database's own clock, now (not the transaction's start), so that drainers on
    hosts whose clocks disagree share one budget. On SQLite it is written as the relay writes
    every timestamp there, UTC text with microseconds (`strftime`'s `%f` gives milliseconds)."""
    if dialect == "postgresql":
        return sa.func.clock_timestamp(type_=sa.DateTime(timezone=True))
    return _sqlite_timestamp(sa.literal_column("'now'"))


def _sqlite_timestamp(moment: Any) -> Any:
    return sa.func.strftime(sa.literal_column("'%Y-%m-%d %H:%M:%f'"), moment).concat(
        sa.literal_column("'000'")
    )


_ZERO: Any = sa.literal_column("0.0", sa.Double())
_SECONDS_PER_DAY: Any = sa.literal_column("86400.0", sa.Double())


def _number(name: str) -> Any:
    """A named bind parameter holding a float."""
    return sa.bindparam(name, type_=sa.Double())


def _seconds_later(moment: Any, seconds: Any, dialect: str) -> Any:
    """SQL: `seconds` (a number) after the timestamp `moment`."""
    if dialect == "postgresql":
        return moment + seconds * sa.literal_column("interval '1 second'", sa.Interval())
    return _sqlite_timestamp(sa.func.julianday(moment) + seconds / _SECONDS_PER_DAY)


def _seconds_between(start: Any, end: Any, dialect: str) -> Any:
    """SQL: the seconds from the timestamp `start` to the timestamp `end`, as a float."""
    if dialect == "postgresql":
        return sa.cast(sa.extract("epoch", end - start), sa.Double())
    return (sa.func.julianday(end) - sa.func.julianday(start)) * _SECONDS_PER_DAY


def _greatest(dialect: str, *values: Any) -> Any:
    return (sa.func.greatest if dialect == "postgresql" else sa.func.max)(*values)


def _least(dialect: str, *values: Any) -> Any:
    return (sa.func.least if dialect == "postgresql" else sa.func.min)(*values)


class BudgetStatements:
    """The statements on the deployment's budget toward Segment (`rate_limits`): a token bucket
    per limit, whose level is that of `updated_at`, refilled at the limit's rate (up to its burst)
    from then, or from the end of a 429's pause, whichever is later, on the database's clock."""

    def __init__(self, dialect: str) -> None:
        limits = rate_limits.c
        clock = _database_clock(dialect)
        events = _number("events")
        requests = _number("requests")
        events_rate = _number("events_per_second")
        requests_rate = _number("requests_per_second")
        events_burst = _number("events_burst")
        requests_burst = _number("requests_burst")
        refilled_from = _greatest(
            dialect, limits.updated_at, sa.func.coalesce(limits.paused_until, limits.updated_at)
        )
        # Never negative: a clock that steps back, or a pause that has not ended, adds nothing.
        seconds = _greatest(dialect, _ZERO, _seconds_between(refilled_from, clock, dialect))
        paused_seconds = sa.func.coalesce(
            _greatest(dialect, _ZERO, _seconds_between(clock, limits.paused_until, dialect)), _ZERO
        )
        insert = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(rate_limits)
        insert = insert.values(
            name=SEGMENT_RATE_LIMIT,
            events_per_second=events_rate,
            requests_per_second=requests_rate,
            events_available=events_burst - events,
            requests_available=requests_burst - requests,
            updated_at=clock,
        )
        # A request's share taken in one statement, the row locked only for its short
        # transaction: the first drainer to send creates the row (full), the others update it.
        self.take = insert.on_conflict_do_update(
            index_elements=[limits.name],
            set_={
                "events_per_second": insert.excluded.events_per_second,
                "requests_per_second": insert.excluded.requests_per_second,
                "events_available": _least(
                    dialect, events_burst, limits.events_available + events_rate * seconds
                )
                - events,
                "requests_available": _least(
                    dialect, requests_burst, limits.requests_available + requests_rate * seconds
                )
                - requests,
                "updated_at": _greatest(dialect, limits.updated_at, clock),
            },
        ).returning(limits.events_available, limits.requests_available, paused_seconds)
        until = _seconds_later(clock, _number("seconds"), dialect)
        self.pause = (
            sa.update(rate_limits)
            .where(limits.name == SEGMENT_RATE_LIMIT)
            .values(
                paused_until=_greatest(dialect, sa.func.coalesce(limits.paused_until, until), until)
            )
        )
