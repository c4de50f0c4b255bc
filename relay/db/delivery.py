"""The drainer's statements on the outbox: claim, renew, finish, release, and the questions the
drainer asks (calls awaiting `call.ended`, backlog); and on `rate_limits`, the deployment's budget
toward Segment that every drainer takes from before it sends.

Ordering lives here, in SQL, because it must hold across processes: an event may be claimed only
when no earlier event of its ordering key (by Aircall timestamp, then call life-cycle rank, then
receipt id) is still pending or in flight, and no event of its key is in flight. A claim takes the
heads of keys and, behind each head, the run of following events of the same key that are also
deliverable now, so that one request can carry a call's settled events in order.

On SQLite the claim runs in a `BEGIN IMMEDIATE` transaction (one writer at a time); on PostgreSQL
heads are locked with `FOR UPDATE SKIP LOCKED`, so several drainers never claim the same key.

Time (`_Clock`): on PostgreSQL every moment the statements compare or write (settled, due, a
lease's end and its expiry, a retry's due time) is the database server's, so that drainers on
hosts whose clocks disagree still agree on them; the caller gives durations. On SQLite every
process is on one host, whose clock is the database's: the caller's moment is used.
"""

from __future__ import annotations

import functools
import json
import math
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, NamedTuple, TypeVar, cast

import anyio
import anyio.to_thread
import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql import operators as sa_operators

from relay.aircall import CALL_LIFECYCLE, OTHER_EVENTS_RANK
from relay.db.engine import not_abandoned, sqlite_writer_connector, writer
from relay.db.notify import notify_statement
from relay.db.reconcile import SkipRule, skip_second_call_ended
from relay.db.store import row_specific_error
from relay.db.tables import (
    awaiting_call_ended,
    delivery_requests,
    outbox,
    rate_limits,
    utc_datetime,
)

Result = TypeVar("Result")


class ClaimedEvent(NamedTuple):
    """An outbox row claimed for delivery, with what mapping needs. (A named tuple: a claim
    makes one per row, and a tuple is made from the row without a call per field.)"""

    id: int
    message_id: str
    resource: str
    event: str
    resource_id: str | None
    ordering_key: str
    occurred_at: datetime
    received_at: datetime
    # The stored JSON text, as read: parsing it is the mapping's work (relay.segment), outside
    # the claim's transaction, and a payload that does not parse makes its row dead, not the
    # claim fail.
    payload: str
    attempts: int
    origin: str = "webhook"  # or "reconciled": a call.ended back-filled by `reconcile`


@dataclass(frozen=True, slots=True)
class RetryRows:
    """Rows back to `pending`, due again `after` the request's end (`next_attempt_at`: on
    PostgreSQL `after` the database's clock at the record, on SQLite `after` the request's
    `finished_at`). `failed_attempt`: the request failed to deliver them (5xx, timeout,
    connection error) and counts in `attempts`; a 429 or a configuration pause
    (401/403/404/405) judged the sender, not the rows, and does not."""

    ids: Sequence[int]
    after: timedelta
    error: str
    failed_attempt: bool = True


@dataclass(frozen=True, slots=True)
class DeadRows:
    ids: Sequence[int]
    reason: str


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One HTTP request to Segment, as written to `delivery_requests`."""

    id: str
    started_at: datetime
    finished_at: datetime
    event_count: int
    body_bytes: int
    outbox_ids: Sequence[int]
    http_status: int | None
    outcome: str
    error: str | None

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class FinishResult:
    delivered: int
    late: int
    retried: int
    dead: int
    lost_lease: int


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


@dataclass(frozen=True, slots=True)
class AwaitingCallEnded:
    ordering_key: str
    hungup_received_at: datetime


@dataclass(frozen=True, slots=True)
class Backlog:
    pending: int
    delivering: int
    dead: int
    oldest_pending_received_at: datetime | None


def lifecycle_rank(event_column: Any) -> Any:
    """SQL for `relay.aircall.lifecycle_rank`: the tie-break between events of one timestamp."""
    return sa.case(
        {event: rank for rank, event in enumerate(CALL_LIFECYCLE)},
        value=event_column,
        else_=OTHER_EVENTS_RANK,
    )


def precedes(first: Any, second: Any) -> Any:
    """SQL: row `first` comes before row `second` in its key's delivery order."""
    first_rank, second_rank = lifecycle_rank(first.c.event), lifecycle_rank(second.c.event)
    return sa.or_(
        first.c.occurred_at < second.c.occurred_at,
        sa.and_(
            first.c.occurred_at == second.c.occurred_at,
            sa.or_(
                first_rank < second_rank,
                sa.and_(first_rank == second_rank, first.c.id < second.c.id),
            ),
        ),
    )


# Heads of keys read by a claim's first query; the next pages are sized on the events per head
# seen so far (a backlog's keys carry several settled events each, live ones about one). Heads
# are locked as they are read on PostgreSQL (SKIP LOCKED), so reading no more than the claim
# will take leaves the other keys to another drainer claiming at the same moment.
FIRST_HEADS_PAGE = 8
MAX_HEADS_PAGE = 500
# How often a claim first gives back the rows of expired leases. Finding them reads every row in
# flight (the lease's expiry is in no index): 600 rows for each claim of a busy drainer, about a
# twentieth of its CPU when it claimed many times a second. A lease lasts a minute; a row whose
# drainer died waits at most this much longer for it.
RELEASE_EXPIRED_EVERY = timedelta(seconds=1)

# What a claim returns for the rows it claimed.
_CLAIM_COLUMNS = (
    outbox.c.id,
    outbox.c.message_id,
    outbox.c.resource,
    outbox.c.event,
    outbox.c.resource_id,
    outbox.c.ordering_key,
    outbox.c.occurred_at,
    outbox.c.received_at,
    # As text (a no-op on SQLite; `json::text` on PostgreSQL is the text as stored).
    sa.cast(outbox.c.payload, sa.Text()).label("payload"),
    outbox.c.attempts,
    outbox.c.origin,
)


def _not_indexed(column: Any, dialect: str) -> Any:
    """`column`, kept from choosing an index on SQLite (its unary `+`, the documented way).

    Without statistics SQLite would read pending rows through (status, next_attempt_at), an
    index that matches more of the heads' conditions, and then sort the whole backlog by id; the
    claim wants (status, id), which yields the first heads in order and stops there.
    """
    if dialect != "sqlite":
        return column
    return sa.type_coerce(
        sa.UnaryExpression(column, operator=sa_operators.custom_op("+")), column.type
    )


def _param(name: str, column: Any = None) -> Any:
    """A named bind parameter (typed like `column`, for the conversions dates need)."""
    return sa.bindparam(name, type_=None if column is None else column.type)


class _ValueList(sa.types.TypeDecorator[list[Any]]):
    """A list of ids or keys bound as one parameter: a JSON array on SQLite (read with
    `json_each`), an array on PostgreSQL.

    An IN list of one parameter per value (SQLAlchemy's "expanding" parameters) costs
    SQLAlchemy a rendering of the statement and a parameter name per value on every execution:
    with a claim of 600 rows and a record of 100 (twice), that was about a tenth of the
    drainer's CPU. One parameter renders nothing, and needs no cutting into chunks either.
    """

    impl = sa.types.String()
    cache_ok = True

    def __init__(self, element: sa.types.TypeEngine[Any]) -> None:
        super().__init__()
        self.element = element

    def load_dialect_impl(self, dialect: Any) -> Any:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.ARRAY(self.element))
        return dialect.type_descriptor(sa.types.String())

    def process_bind_param(self, value: list[Any] | None, dialect: Any) -> Any:
        if value is None or dialect.name == "postgresql":
            return value
        try:
            return orjson.dumps(value).decode("utf-8")
        except TypeError:  # a key that is no UTF-8 text (a lone surrogate): JSON escapes it
            return json.dumps(value)


def _in_list(column: Any, name: str, dialect: str, negate: bool = False) -> Any:
    """SQL: `column` is (`negate`: is not) one of the values of the list parameter `name`."""
    values = sa.bindparam(name, type_=_ValueList(column.type))
    if dialect == "postgresql":
        return column != sa.all_(values) if negate else column == sa.any_(values)
    listed = sa.select(sa.func.json_each(values).table_valued("value").c.value).scalar_subquery()
    return column.not_in(listed) if negate else column.in_(listed)


def _held_by_owner(dialect: str) -> tuple[Any, ...]:
    """Rows among `ids` that this owner still holds (a drainer that lost its lease changes
    nothing)."""
    return (
        _in_list(outbox.c.id, "ids", dialect),
        outbox.c.claimed_by == _param("owner", outbox.c.claimed_by),
        outbox.c.status == "delivering",
    )


class _Clock:
    """The moments the drainer's statements compare and write, as SQL.

    PostgreSQL: the server's clock. The checks (is a row settled, due, its lease expired) read
    `now()`, the start of the transaction: one moment for every check of a claim, and never
    later than the real time, so a claim that waited for a lock decides as if earlier and
    takes nothing early. The moments written (a lease's end, a retry's due time) are
    `statement_timestamp()`, the start of the writing statement, plus a duration: a lease
    lasts its full length from when it is taken, and every row of one statement gets the same
    moment (`clock_timestamp()`, read row by row, would make a request's rows due microseconds
    apart, and a claim between them would split the run). The durations are `interval`
    parameters.

    SQLite: parameters, the caller's moments (one host: its clock is the database's), as
    cheap as before (no date arithmetic in SQL, and the claim's index choice unchanged).
    """

    def __init__(self, dialect: str) -> None:
        self.database = dialect == "postgresql"

    def now(self) -> Any:
        """The moment the checks compare with (parameter `now`)."""
        if self.database:
            return sa.func.now()
        return _param("now", outbox.c.next_attempt_at)

    def settled_before(self) -> Any:
        """Rows received at or before this are settled (parameter `settled_before`, or the
        duration `settle`)."""
        if self.database:
            return sa.func.now() - sa.bindparam("settle", type_=sa.Interval())
        return _param("settled_before", outbox.c.received_at)

    def later(self, name: str) -> Any:
        """A moment to write: the duration `name` from now on PostgreSQL; on SQLite, the
        parameter `name` + `_at` (the moment, computed by the caller)."""
        if self.database:
            return sa.func.statement_timestamp() + sa.bindparam(name, type_=sa.Interval())
        return _param(f"{name}_at", outbox.c.claimed_until)


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


class _BudgetStatements:
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


# A guard for whoever edits one and not the other:
if tuple(column.name for column in _CLAIM_COLUMNS) != ClaimedEvent._fields:  # pragma: no cover
    raise RuntimeError("_CLAIM_COLUMNS must list ClaimedEvent's fields, in order")


class _Statements:
    """The drainer's statements, built once per dialect with named parameters: executing the
    same statement object again costs SQLAlchemy a cache lookup, not a construction, a cache key
    and a compilation."""

    def __init__(self, dialect: str) -> None:
        one = sa.literal_column("1", sa.Integer())
        clock = _Clock(dialect)
        self.release_expired = (
            sa.update(outbox)
            .where(outbox.c.status == "delivering", outbox.c.claimed_until < clock.now())
            .values(status="pending", claimed_by=None, claimed_until=None)
        )

        candidate = outbox.alias("candidate")
        other = outbox.alias("other")
        # Two tests, each an equality on (ordering_key, status), rather than one with an OR of
        # the statuses: without fresh statistics (a new outbox, a burst, autovacuum off)
        # PostgreSQL planned the OR as a BitmapOr over the whole status index for every
        # candidate, and a claim behind a blocked backlog of 7,000 rows took 16 s instead of
        # 0.07 s, holding the locks of its first UPDATE all along (other drainers' records then
        # failed on lock_timeout, and their rows were sent again).
        in_flight = sa.exists(
            sa.select(one).where(
                other.c.ordering_key == candidate.c.ordering_key,
                other.c.status == "delivering",
            )
        )
        earlier_pending = sa.exists(
            sa.select(one).where(
                other.c.ordering_key == candidate.c.ordering_key,
                other.c.status == "pending",
                other.c.id != candidate.c.id,
                precedes(other, candidate),
            )
        )
        heads = (
            sa.select(candidate.c.id, candidate.c.ordering_key)
            .where(
                candidate.c.status == "pending",
                candidate.c.id > _param("after_id", outbox.c.id),
                _not_indexed(candidate.c.next_attempt_at, dialect) <= clock.now(),
                candidate.c.received_at <= clock.settled_before(),
                ~in_flight,
                ~earlier_pending,
            )
            .order_by(candidate.c.id)
            .limit(sa.bindparam("limit", type_=sa.Integer()))
        )
        # A key's pending rows in delivery order, each saying whether it is deliverable now:
        # what planning a run needs, and nothing to convert (no payload, no dates).
        ready = sa.and_(
            outbox.c.received_at <= clock.settled_before(),
            outbox.c.next_attempt_at <= clock.now(),
        )
        pending_of_keys = (
            sa.select(outbox.c.id, outbox.c.ordering_key, ready.label("ready"))
            .where(
                _in_list(outbox.c.ordering_key, "keys", dialect),
                outbox.c.status == "pending",
            )
            .order_by(
                outbox.c.ordering_key,
                outbox.c.occurred_at,
                lifecycle_rank(outbox.c.event),
                outbox.c.id,
            )
        )
        if dialect == "postgresql":
            heads = heads.with_for_update(skip_locked=True, of=candidate)
            pending_of_keys = pending_of_keys.with_for_update()
        self.heads = heads
        self.pending_of_keys = pending_of_keys
        # The rows planned are read, then claimed: on SQLite an `UPDATE ... RETURNING` of the
        # same rows cost about a third more (SQLite keeps what it returns in a temporary table
        # until the statement ends), and reading first brings their pages into the cache for
        # the update. The transaction holds the rows (SQLite's write lock; PostgreSQL's row
        # locks, taken by the planning queries), so what is read is what is claimed.
        self.claimed_rows = sa.select(*_CLAIM_COLUMNS).where(_in_list(outbox.c.id, "ids", dialect))
        self.claim = (
            sa.update(outbox)
            .where(_in_list(outbox.c.id, "ids", dialect))
            .values(
                status="delivering",
                claimed_by=_param("new_owner", outbox.c.claimed_by),
                claimed_until=clock.later("lease"),
            )
        )

        self.renew = (
            sa.update(outbox)
            .where(*_held_by_owner(dialect))
            .values(claimed_until=clock.later("lease"))
        )
        self.release = (
            sa.update(outbox)
            .where(*_held_by_owner(dialect))
            .values(status="pending", claimed_by=None, claimed_until=None)
        )

        self.insert_request = sa.insert(delivery_requests)
        later = outbox.alias("later")
        # Late: a later event of the same key was delivered before this one (by an earlier
        # request; the rows of this request are excluded, they are delivered together in order).
        late = sa.exists(
            sa.select(one).where(
                later.c.ordering_key == outbox.c.ordering_key,
                later.c.status == "delivered",
                _in_list(later.c.id, "request_ids", dialect, negate=True),
                precedes(outbox, later),
            )
        )
        self.delivered = (
            sa.update(outbox)
            .where(*_held_by_owner(dialect))
            .values(
                status="delivered",
                delivered_at=_param("finished_at", outbox.c.delivered_at),
                request_id=_param("request", outbox.c.request_id),
                attempts=outbox.c.attempts + 1,
                last_http_status=_param("http_status", outbox.c.last_http_status),
                last_error=None,
                next_attempt_at=None,
                claimed_by=None,
                claimed_until=None,
                late=late,
            )
            .returning(outbox.c.late)
        )
        self.retry = (
            sa.update(outbox)
            .where(*_held_by_owner(dialect))
            .values(
                status="pending",
                attempts=outbox.c.attempts + _param("failed_attempt", outbox.c.attempts),
                next_attempt_at=clock.later("retry"),
                last_error=_param("error", outbox.c.last_error),
                last_http_status=_param("http_status", outbox.c.last_http_status),
                request_id=_param("request", outbox.c.request_id),
                claimed_by=None,
                claimed_until=None,
            )
        )
        dead_values = {
            "status": "dead",
            "last_error": _param("reason", outbox.c.last_error),
            "next_attempt_at": None,
            "claimed_by": None,
            "claimed_until": None,
        }
        self.dead_unsent = sa.update(outbox).where(*_held_by_owner(dialect)).values(**dead_values)
        self.dead = (
            sa.update(outbox)
            .where(*_held_by_owner(dialect))
            .values(
                **dead_values,
                attempts=outbox.c.attempts + 1,
                request_id=_param("request", outbox.c.request_id),
                last_http_status=_param("http_status", outbox.c.last_http_status),
            )
        )


class DeliveryStore:
    """The drainer's statements. Every write is one transaction run by a plain function on a
    synchronous connection (`_write`): on a SQLite file, in a worker thread on a connection of
    its own, so that a claim or a finish is one round trip from the event loop instead of one
    per statement and fetch through aiosqlite (and writes that queue meanwhile share the next
    transaction); elsewhere, on the async engine through `run_sync`. The same statements run on
    both."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._writer = writer(engine)
        self.dialect = engine.dialect.name
        self._statements = _Statements(self.dialect)
        self._budget = _BudgetStatements(self.dialect)
        self._sqlite_writes: _SqliteWrites | None = None
        self._sqlite_checked = False
        self._released_expired_at: datetime | None = None

    async def close(self) -> None:
        """Close the connection the writes opened for themselves, if any (they open it again
        when needed); the engine is the caller's to dispose of."""
        sqlite_writes, self._sqlite_writes = self._sqlite_writes, None
        self._sqlite_checked = False
        if sqlite_writes is not None:
            await sqlite_writes.close()

    async def _write(self, work: Callable[[sa.Connection], Result]) -> Result:
        """Run `work` in a write transaction (BEGIN IMMEDIATE on SQLite)."""
        if not self._sqlite_checked:
            self._sqlite_checked = True
            self._sqlite_writes = _SqliteWrites.for_engine(self.engine)
        if self._sqlite_writes is not None:
            return await self._sqlite_writes.run(work)
        with not_abandoned(self.engine):  # as in the worker thread: it runs to its end
            async with self._writer.begin() as connection:
                result = await connection.run_sync(work)
        return result

    # -- claiming ----------------------------------------------------------------------------

    async def claim(
        self,
        owner: str,
        now: datetime,
        settle: timedelta,
        lease: timedelta,
        max_events: int,
        max_per_key: int,
    ) -> list[ClaimedEvent]:
        """Claim deliverable runs of keys (each at most `max_per_key` events), `max_events` in
        all, returned in delivery order within each key, keys in order of their head's receipt.

        Deliverable: due, and received at least `settle` ago; the lease lasts `lease`. Both are
        measured on the database's clock on PostgreSQL, from `now` (the caller's clock) on
        SQLite; `now` also paces the look for expired leases (`RELEASE_EXPIRED_EVERY`).

        Heads are read a page at a time, in order of receipt, and only as many pages as it takes
        to fill `max_events`; the runs behind them are planned from a few light columns, and
        only the rows claimed are read whole (payload included), by the claiming UPDATE itself.
        """
        return await self._write(
            functools.partial(
                self._claim,
                owner=owner,
                now=now,
                settle=settle,
                lease=lease,
                max_events=max_events,
                max_per_key=max_per_key,
            )
        )

    def _claim(
        self,
        connection: sa.Connection,
        *,
        owner: str,
        now: datetime,
        settle: timedelta,
        lease: timedelta,
        max_events: int,
        max_per_key: int,
    ) -> list[ClaimedEvent]:
        statements = self._statements
        # Every moment: `_Clock` takes the ones it needs (durations on PostgreSQL).
        moments = {"now": now, "settled_before": now - settle, "settle": settle}
        # Rows of a drainer that died (or lost touch) go back to pending when the lease ends.
        last = self._released_expired_at
        if last is None or not timedelta(0) <= now - last < RELEASE_EXPIRED_EVERY:
            connection.execute(statements.release_expired, moments)
            self._released_expired_at = now
        planned: list[int] = []
        after = 0
        heads_read = 0
        while len(planned) < max_events:
            wanted = _heads_wanted(max_events - len(planned), heads_read, len(planned))
            heads = connection.execute(
                statements.heads,
                {**moments, "after_id": after, "limit": wanted},
            ).all()
            heads_read += len(heads)
            if not heads:
                break
            keys = [row.ordering_key for row in heads]
            by_key: dict[str, list[Any]] = {}
            parameters = {**moments, "keys": keys}
            for row in connection.execute(statements.pending_of_keys, parameters):
                by_key.setdefault(row.ordering_key, []).append(row)
            for key in keys:
                for taken, row in enumerate(by_key.get(key, ()), start=1):
                    if not row.ready:
                        break  # an earlier event is not deliverable yet: the rest wait
                    planned.append(row.id)
                    if taken >= max_per_key or len(planned) >= max_events:
                        break
                if len(planned) >= max_events:
                    break
            if len(heads) < wanted:
                break
            after = heads[-1].id
        if not planned:
            return []
        claimed = [
            ClaimedEvent._make(row)
            for row in connection.execute(statements.claimed_rows, {"ids": planned})
        ]
        connection.execute(
            statements.claim,
            {"ids": planned, "new_owner": owner, "lease": lease, "lease_at": now + lease},
        )
        position = {row_id: index for index, row_id in enumerate(planned)}
        claimed.sort(key=lambda event: position[event.id])
        return claimed

    # -- while in flight ---------------------------------------------------------------------

    async def renew(self, owner: str, ids: Sequence[int], now: datetime, lease: timedelta) -> int:
        """Extend the lease of rows still held by `owner` to `lease` from now (the database's
        clock on PostgreSQL, `now` on SQLite); returns how many are still held."""

        def work(connection: sa.Connection) -> int:
            return self._update_held(
                connection,
                self._statements.renew,
                owner,
                ids,
                {"lease": lease, "lease_at": now + lease},
            )

        return await self._write(work)

    async def release(self, owner: str, ids: Sequence[int], *, announce: bool = False) -> int:
        """Give rows back untouched (not sent): shutdown, pause, or a key run cut short.

        `announce` (a drainer stopping): on PostgreSQL the transaction also notifies the other
        drainers that the rows are deliverable now (`ready:<count>`, `relay/db/notify.py`), so
        that one of them takes them at once rather than at its next poll."""
        if not ids:
            return 0

        def work(connection: sa.Connection) -> int:
            released = self._update_held(connection, self._statements.release, owner, ids, {})
            if announce and released and self.dialect == "postgresql":
                sql, parameters = notify_statement(released, ready=True)
                connection.exec_driver_sql(sql, parameters)
            return released

        return await self._write(work)

    async def mark_dead_unsent(self, owner: str, dead: Sequence[DeadRows]) -> int:
        """Rows that can never be sent (they fail mapping or validation): dead, with why."""

        def work(connection: sa.Connection) -> int:
            return sum(
                self._update_held(
                    connection,
                    self._statements.dead_unsent,
                    owner,
                    group.ids,
                    {"reason": group.reason},
                )
                for group in dead
            )

        return await self._write(work)

    async def skip_second_call_ended(
        self, owner: str, ids: Sequence[int], rule: SkipRule
    ) -> dict[int, str]:
        """Claimed `call.ended` rows whose call has its one: skipped (relay/db/reconcile.py)."""
        return await self._write(
            functools.partial(skip_second_call_ended, owner=owner, ids=ids, rule=rule)
        )

    # -- the deployment's budget toward Segment ----------------------------------------------

    async def take_send_budget(self, limits: SendLimits, events: int) -> TakenBudget:
        """Take from the deployment's budget what one request of `events` events sends: the
        events and the request, each only while its limit is on. One statement, on the
        database's clock; what it returns says how long the request waits for its turn."""
        parameters = {
            "events": float(events) if limits.events_per_second > 0 else 0.0,
            "requests": 1.0 if limits.requests_per_second > 0 else 0.0,
            "events_per_second": limits.events_per_second,
            "requests_per_second": limits.requests_per_second,
            "events_burst": limits.events_burst,
            "requests_burst": limits.requests_burst,
        }

        def work(connection: sa.Connection) -> TakenBudget:
            row = connection.execute(self._budget.take, parameters).one()
            return TakenBudget(float(row[0]), float(row[1]), float(row[2]))

        return await self._write(work)

    # -- after a request ---------------------------------------------------------------------

    async def finish(
        self,
        owner: str,
        record: RequestRecord,
        delivered: Sequence[int] = (),
        retry: RetryRows | None = None,
        dead: Sequence[DeadRows] = (),
        pause_seconds: float | None = None,
    ) -> FinishResult:
        """Record one request and what it did to its rows, in one transaction; with
        `pause_seconds` (a 429), also pause the deployment's sending for that long from now,
        by the database's clock (it only ever lengthens a pause, and needs the budget's row, which
        exists once a drainer has sent with a limit on)."""
        return await self._write(
            functools.partial(
                self._finish,
                owner=owner,
                record=record,
                delivered=delivered,
                retry=retry,
                dead=dead,
                pause_seconds=pause_seconds,
            )
        )

    def _finish(
        self,
        connection: sa.Connection,
        *,
        owner: str,
        record: RequestRecord,
        delivered: Sequence[int],
        retry: RetryRows | None,
        dead: Sequence[DeadRows],
        pause_seconds: float | None,
    ) -> FinishResult:
        statements = self._statements
        if pause_seconds is not None:
            connection.execute(self._budget.pause, {"seconds": pause_seconds})
        connection.execute(
            statements.insert_request,
            {
                "id": record.id,
                "drainer": owner,
                "started_at": record.started_at,
                "finished_at": record.finished_at,
                "duration_ms": int((record.finished_at - record.started_at).total_seconds() * 1000),
                "event_count": record.event_count,
                "body_bytes": record.body_bytes,
                "outbox_ids": list(record.outbox_ids),
                "http_status": record.http_status,
                "outcome": record.outcome,
                "error": record.error,
            },
        )
        delivered_count = late_count = retried = dead_count = 0
        if delivered:
            this_request = list(delivered)
            result = connection.execute(
                statements.delivered,
                {
                    "ids": this_request,
                    "owner": owner,
                    "request_ids": this_request,
                    "finished_at": record.finished_at,
                    "request": record.id,
                    "http_status": record.http_status,
                },
            )
            flags = result.scalars().all()
            delivered_count = len(flags)
            late_count = sum(1 for flag in flags if flag)
        if retry is not None and retry.ids:
            retried = self._update_held(
                connection,
                statements.retry,
                owner,
                retry.ids,
                {
                    "retry": retry.after,
                    "retry_at": record.finished_at + retry.after,
                    "failed_attempt": int(retry.failed_attempt),
                    "error": retry.error,
                    "http_status": record.http_status,
                    "request": record.id,
                },
            )
        for group in dead:
            dead_count += self._update_held(
                connection,
                statements.dead,
                owner,
                group.ids,
                {"reason": group.reason, "request": record.id, "http_status": record.http_status},
            )
        expected = len(delivered) + (len(retry.ids) if retry else 0) + sum(len(g.ids) for g in dead)
        return FinishResult(
            delivered=delivered_count,
            late=late_count,
            retried=retried,
            dead=dead_count,
            lost_lease=expected - delivered_count - retried - dead_count,
        )

    @staticmethod
    def _update_held(
        connection: sa.Connection,
        statement: Any,
        owner: str,
        ids: Sequence[int],
        parameters: dict[str, Any],
    ) -> int:
        """Run an UPDATE of rows still held by `owner` among `ids`; how many it changed."""
        if not ids:
            return 0
        result = connection.execute(statement, {**parameters, "ids": list(ids), "owner": owner})
        return int(result.rowcount)

    # -- questions ---------------------------------------------------------------------------

    async def calls_awaiting_ended(self, received_before: datetime) -> list[AwaitingCallEnded]:
        """Calls whose `call.hungup` was received before the cut-off and no `call.ended` since."""
        # Each hung-up call looks for its `call.ended` among its own key's rows
        # (`awaiting_call_ended`). Before migration 0005, SQLite without statistics searched the
        # event index instead, every `call.ended` row of the outbox for each hung-up call: a
        # minute of CPU on an outbox of 100,000 rows; that index is gone.
        statement = (
            sa.select(outbox.c.ordering_key, sa.func.min(outbox.c.received_at).label("received_at"))
            .where(awaiting_call_ended(received_before))
            .group_by(outbox.c.ordering_key)
            .order_by(sa.func.min(outbox.c.received_at))
        )
        with not_abandoned(self.engine):  # a stop waits for the answer (milliseconds)
            async with self.engine.connect() as connection:
                rows = (await connection.execute(statement)).all()
        return [
            AwaitingCallEnded(
                ordering_key=row.ordering_key,
                hungup_received_at=_as_datetime(row.received_at),
            )
            for row in rows
        ]

    async def backlog(self) -> Backlog:
        statement = sa.select(
            sa.func.count().filter(outbox.c.status == "pending").label("pending"),
            sa.func.count().filter(outbox.c.status == "delivering").label("delivering"),
            sa.func.count().filter(outbox.c.status == "dead").label("dead"),
            sa.func.min(outbox.c.received_at)
            .filter(outbox.c.status.in_(("pending", "delivering")))
            .label("oldest"),
        ).where(outbox.c.status.in_(("pending", "delivering", "dead")))
        with not_abandoned(self.engine):
            async with self.engine.connect() as connection:
                row = (await connection.execute(statement)).one()
        return Backlog(
            pending=int(row.pending),
            delivering=int(row.delivering),
            dead=int(row.dead),
            oldest_pending_received_at=None if row.oldest is None else _as_datetime(row.oldest),
        )

    async def next_due(self) -> tuple[datetime | None, datetime | None]:
        """The earliest receipt and the earliest retry time among pending rows (for sleeping)."""
        statement = sa.select(
            sa.func.min(outbox.c.received_at), sa.func.min(outbox.c.next_attempt_at)
        ).where(outbox.c.status == "pending")
        with not_abandoned(self.engine):
            async with self.engine.connect() as connection:
                row = (await connection.execute(statement)).one()
        received, retry = row
        return (
            None if received is None else _as_datetime(received),
            None if retry is None else _as_datetime(retry),
        )


class _Queued(Generic[Result]):
    """A write waiting for its turn in `_SqliteWrites`, then its outcome."""

    __slots__ = ("done", "error", "result", "work")

    def __init__(self, work: Callable[[sa.Connection], Result]) -> None:
        self.work = work
        self.done = False
        self.result: Result | None = None
        self.error: BaseException | None = None


# The drainer's own SQLite connection, beyond the engine's settings (relay/db/engine.py):
# - temp_store=MEMORY: `UPDATE ... RETURNING` holds the rows it returns (payloads included,
#   about 2 MB for a claim of 600) in a temporary table until the statement ends, which by
#   default is a file; written and read back through the kernel, that cost about a fifth of the
#   drainer's CPU. In memory it is bounded by the claim's size.
# - cache_size: 16 MiB of page cache instead of 2 MiB, so that a request's rows, read when they
#   were claimed, are still cached when they are recorded (a claim reads about 3 MB of pages).
_SQLITE_WRITER_PRAGMAS: tuple[str, ...] = ("PRAGMA temp_store=MEMORY", "PRAGMA cache_size=-16384")


class _SqliteWrites:
    """The drainer's write transactions on a SQLite file, run whole in a worker thread on a
    synchronous SQLAlchemy engine over one plain `sqlite3` connection set up like the async
    engine's (`sqlite_writer_connector`), kept between transactions and opened again after an
    error of the database (not after an error of one row's values: a constraint).

    One transaction at a time, and group commit: writes that queue while a transaction runs
    (the finishes of requests that came back meanwhile, the next claim) share the next one, in
    the order they were asked for. So the drainer's writers never wait on SQLite's busy handler
    for each other, and a commit (its WAL writes and fsync) serves several requests. If that
    transaction fails, every write in it fails and nothing of any of them is kept, as when each
    had its own; the drainer retries them.
    """

    def __init__(self, connect: Callable[[], sqlite3.Connection]) -> None:
        # hide_parameters: a database error must never put a payload in a log line.
        self._engine = sa.create_engine(
            "sqlite://",
            creator=connect,
            poolclass=sa.pool.QueuePool,
            pool_size=1,
            max_overflow=0,
            hide_parameters=True,
        )

        @sa.event.listens_for(self._engine, "connect")
        def on_connect(dbapi_connection: Any, connection_record: Any) -> None:
            for pragma in _SQLITE_WRITER_PRAGMAS:
                dbapi_connection.execute(pragma)

        @sa.event.listens_for(self._engine, "begin")
        def on_begin(connection: sa.Connection) -> None:
            # The connection is in autocommit mode: the transaction is ours to begin.
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        self._queue: list[_Queued[Any]] = []
        self._lock: anyio.Lock | None = None

    @classmethod
    def for_engine(cls, engine: AsyncEngine) -> _SqliteWrites | None:
        connect = sqlite_writer_connector(engine)
        return None if connect is None else cls(connect)

    async def run(self, work: Callable[[sa.Connection], Result]) -> Result:
        if self._lock is None:
            self._lock = anyio.Lock()
        queued = _Queued(work)
        self._queue.append(queued)
        try:
            async with self._lock:
                if not queued.done:  # else an earlier transaction took it along
                    batch, self._queue = self._queue, []
                    # Not abandoned on cancellation: the transaction runs to its end.
                    await anyio.to_thread.run_sync(self._transaction, batch)
        finally:
            if not queued.done and queued in self._queue:  # cancelled while waiting
                self._queue.remove(queued)
        if queued.error is not None:
            raise queued.error
        return cast(Result, queued.result)

    def _transaction(self, batch: list[_Queued[Any]]) -> None:
        try:
            with self._engine.begin() as connection:
                for queued in batch:
                    queued.result = queued.work(connection)
        except BaseException as error:
            for queued in batch:
                queued.error = error
            if not isinstance(error, Exception):
                raise
            if not row_specific_error(error):
                # An error of the database: the next transaction opens a new connection, which
                # a database read-only for a while needs (relay/db/engine.py says why).
                self._engine.dispose()
        finally:
            for queued in batch:
                queued.done = True

    async def close(self) -> None:
        await anyio.to_thread.run_sync(self._engine.dispose)


def _heads_wanted(room: int, heads_read: int, events_planned: int) -> int:
    """How many heads of keys to read next, for `room` more events."""
    if heads_read == 0:
        return min(room, FIRST_HEADS_PAGE)
    events_per_head = max(events_planned / heads_read, 1.0)
    return max(1, min(room, MAX_HEADS_PAGE, math.ceil(room / events_per_head)))


def _as_datetime(value: Any) -> datetime:
    return utc_datetime(value)
