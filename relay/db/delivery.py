"""The drainer's store: every statement of the drainer run, each write in one transaction
(claim, renew, release, record a request, dead rows, the budget toward Segment), and the
questions the drainer asks (calls awaiting `call.ended`, backlog, when rows fall due).

What a claim takes is planned in `relay/db/claim.py`; the statements themselves are built in
`relay/db/delivery_sql.py` (the outbox) and `relay/db/send_budget.py` (`rate_limits`). Here they
are executed: on a SQLite file through its writer (`relay/db/sqlite_writer.py`), elsewhere on the
async engine.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from relay.db.claim import RELEASE_EXPIRED_EVERY, ClaimedEvent, ClaimOrder, ClaimPlanner
from relay.db.delivery_sql import Statements
from relay.db.engine import not_abandoned, writer
from relay.db.gauges import BACKLOG_COUNTS
from relay.db.notify import notify_statement
from relay.db.reconcile import SkipRule, skip_second_call_ended
from relay.db.send_budget import BudgetStatements, SendLimits, TakenBudget
from relay.db.sqlite_writer import SqliteWriter
from relay.db.tables import awaiting_call_ended, outbox, utc_datetime

# The drainer takes these from here, with the store.
__all__ = [
    "RELEASE_EXPIRED_EVERY",
    "AwaitingCallEnded",
    "Backlog",
    "ClaimedEvent",
    "DeadRows",
    "DeliveryStore",
    "FinishResult",
    "RequestRecord",
    "RetryRows",
    "SendLimits",
    "TakenBudget",
]

Result = TypeVar("Result")


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
class AwaitingCallEnded:
    ordering_key: str
    hungup_received_at: datetime


@dataclass(frozen=True, slots=True)
class Backlog:
    pending: int
    delivering: int
    dead: int
    oldest_pending_received_at: datetime | None


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
        self._statements = Statements(self.dialect)
        self._budget = BudgetStatements(self.dialect)
        self._planner = ClaimPlanner(self._statements)
        self._sqlite_writes: SqliteWriter | None = None
        self._sqlite_checked = False

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
            self._sqlite_writes = SqliteWriter.for_engine(
                self.engine, pragmas=_SQLITE_WRITER_PRAGMAS, thread_name="drainer-writer"
            )
        with not_abandoned(self.engine):  # a transaction begun runs to its end
            if self._sqlite_writes is not None:
                return await self._sqlite_writes.run(work)
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
        order = ClaimOrder(owner, now, settle, lease, max_events, max_per_key)
        return await self._write(functools.partial(self._planner.claim, order))

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
        finish = functools.partial(
            self._finish, owner, record, delivered, retry, dead, pause_seconds
        )
        return await self._write(finish)

    def _finish(
        self,
        owner: str,
        record: RequestRecord,
        delivered: Sequence[int],
        retry: RetryRows | None,
        dead: Sequence[DeadRows],
        pause_seconds: float | None,
        connection: sa.Connection,
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
        # (`awaiting_call_ended`), never every `call.ended` row of the outbox for each hung-up
        # call, as SQLite without statistics did through the event index that migration 0005
        # dropped (docs/performance.md has what that cost).
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
                hungup_received_at=utc_datetime(row.received_at),
            )
            for row in rows
        ]

    async def backlog(self) -> Backlog:
        with not_abandoned(self.engine):
            async with self.engine.connect() as connection:
                row = (await connection.execute(BACKLOG_COUNTS)).one()
        return Backlog(
            pending=int(row.pending),
            delivering=int(row.delivering),
            dead=int(row.dead),
            oldest_pending_received_at=None if row.oldest is None else utc_datetime(row.oldest),
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
            None if received is None else utc_datetime(received),
            None if retry is None else utc_datetime(retry),
        )


# The drainer's own SQLite connection, beyond the engine's settings (relay/db/engine.py):
# - temp_store=MEMORY: `UPDATE ... RETURNING` and large reads keep what they return in a
#   temporary table until the statement ends, by default a file written and read back through
#   the kernel; in memory it is bounded by the claim's size.
# - cache_size: 16 MiB of page cache instead of 2 MiB, so that a request's rows, read when they
#   were claimed, are still cached when they are recorded (a claim reads a few MB of pages).
# (What each saves: docs/performance.md, the drainer.)
_SQLITE_WRITER_PRAGMAS: tuple[str, ...] = ("PRAGMA temp_store=MEMORY", "PRAGMA cache_size=-16384")
