"""The drainer's statements, as SQLAlchemy builds them once per dialect: claim (heads of keys,
their pending runs, the rows claimed), renew, release, record (delivered, retried, dead).
`relay/db/claim.py` plans a claim with them; `relay/db/delivery.py` runs them.

Ordering lives here, in SQL, because it must hold across processes: an event may be claimed only
when no earlier event of its ordering key (by Aircall timestamp, then call life-cycle rank, then
receipt id) is still pending or in flight, and no event of its key is in flight.

Time (`_Clock`): on PostgreSQL every moment the statements compare or write (settled, due, a
lease's end and its expiry, a retry's due time) is the database server's, so that drainers on
hosts whose clocks disagree still agree on them; the caller gives durations. On SQLite every
process is on one host, whose clock is the database's: the caller's moment is used.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql import operators as sa_operators

from relay.aircall import CALL_LIFECYCLE, OTHER_EVENTS_RANK
from relay.db.tables import delivery_requests, outbox


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


# What a claim returns for the rows it claimed.
CLAIM_COLUMNS = (
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
    SQLAlchemy a rendering of the statement and a parameter name per value on every execution
    (docs/performance.md, "Figures behind the code", has its cost). One parameter renders
    nothing, and needs no cutting into chunks either.
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


class Statements:
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
        # candidate: a claim behind a blocked backlog took seconds (docs/performance.md,
        # "Figures behind the code"), holding the locks of its first UPDATE all along (other
        # drainers' records then failed on lock_timeout, and their rows were sent again).
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
        # same rows costs more (SQLite keeps what it returns in a temporary table until the
        # statement ends; docs/performance.md, "Figures behind the code"), and reading first
        # brings their pages into the cache for the update. The transaction holds the rows
        # (SQLite's write lock; PostgreSQL's row locks, taken by the planning queries), so what
        # is read is what is claimed.
        self.claimed_rows = sa.select(*CLAIM_COLUMNS).where(_in_list(outbox.c.id, "ids", dialect))
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
