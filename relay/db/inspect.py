"""The operator's statements on the outbox: statistics, listing, one row with its requests,
requeue, and purge (by hand or by the retention settings).

Purge deletes in small batches (one short transaction each), so that the receiver and the
drainer never wait long for the write lock while a large purge runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import anyio
import anyio.lowlevel
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from relay.aircall import MESSAGE_ID_PREFIX
from relay.db.engine import not_abandoned, writer
from relay.db.gauges import count_calls_awaiting_call_ended
from relay.db.notify import notify_statement
from relay.db.reconcile import last_run as last_reconcile_run
from relay.db.tables import delivery_requests, outbox, utc_datetime
from relay.progress import ProgressCallback

REQUEUABLE_STATUSES = ("dead", "skipped", "delivered")
PURGEABLE_STATUSES = ("delivered", "skipped", "dead")

LIST_COLUMNS = (
    outbox.c.id,
    outbox.c.status,
    outbox.c.event,
    outbox.c.ordering_key,
    outbox.c.occurred_at,
    outbox.c.received_at,
    outbox.c.received_count,
    outbox.c.attempts,
    outbox.c.last_http_status,
    outbox.c.delivered_at,
    outbox.c.late,
    outbox.c.last_error,
    outbox.c.message_id,
)

# Every column of a row, the payload as its stored JSON text.
_ROW_COLUMNS = tuple(
    sa.cast(column, sa.Text()).label("payload") if column.name == "payload" else column
    for column in outbox.c
)


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Which rows: every given criterion must hold."""

    statuses: tuple[str, ...] = ()
    events: tuple[str, ...] = ()
    ordering_key: str | None = None
    received_since: datetime | None = None
    received_until: datetime | None = None
    ids: tuple[int, ...] = ()

    def clauses(self) -> list[Any]:
        clauses: list[Any] = []
        if self.statuses:
            clauses.append(outbox.c.status.in_(self.statuses))
        if self.events:
            clauses.append(outbox.c.event.in_(self.events))
        if self.ordering_key is not None:
            clauses.append(outbox.c.ordering_key == self.ordering_key)
        if self.received_since is not None:
            clauses.append(outbox.c.received_at >= self.received_since)
        if self.received_until is not None:
            clauses.append(outbox.c.received_at < self.received_until)
        if self.ids:
            clauses.append(outbox.c.id.in_(self.ids))
        return clauses


@dataclass
class OutboxStats:
    by_status: dict[str, int] = field(default_factory=dict)
    by_event: dict[str, dict[str, int]] = field(default_factory=dict)
    oldest_pending_received_at: datetime | None = None
    dead: int = 0
    calls_awaiting_call_ended: int = 0
    delivery_requests_last_hour: dict[str, int] = field(default_factory=dict)
    last_reconcile_run: dict[str, Any] | None = None  # a row of reconcile_runs


class OutboxInspector:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._writer = writer(engine)
        self.dialect = engine.dialect.name

    async def stats(self, now: datetime, awaiting_since: datetime) -> OutboxStats:
        from datetime import timedelta

        result = OutboxStats()
        async with self.engine.connect() as connection:
            rows = await connection.execute(
                sa.select(outbox.c.event, outbox.c.status, sa.func.count().label("n"))
                .group_by(outbox.c.event, outbox.c.status)
                .order_by(outbox.c.event, outbox.c.status)
            )
            for row in rows:
                result.by_status[row.status] = result.by_status.get(row.status, 0) + int(row.n)
                result.by_event.setdefault(row.event, {})[row.status] = int(row.n)
            oldest = await connection.scalar(
                sa.select(sa.func.min(outbox.c.received_at)).where(
                    outbox.c.status.in_(("pending", "delivering"))
                )
            )
            result.oldest_pending_received_at = None if oldest is None else utc_datetime(oldest)
            result.dead = result.by_status.get("dead", 0)
            result.calls_awaiting_call_ended = int(
                await connection.scalar(count_calls_awaiting_call_ended(awaiting_since)) or 0
            )
            requests = await connection.execute(
                sa.select(delivery_requests.c.outcome, sa.func.count().label("n"))
                .where(delivery_requests.c.started_at >= now - timedelta(hours=1))
                .group_by(delivery_requests.c.outcome)
            )
            result.delivery_requests_last_hour = {row.outcome: int(row.n) for row in requests}
            result.last_reconcile_run = await last_reconcile_run(connection)
        return result

    async def list_events(self, where: EventFilter, limit: int) -> list[dict[str, Any]]:
        statement = (
            sa.select(*LIST_COLUMNS)
            .where(*where.clauses())
            .order_by(outbox.c.id.desc())
            .limit(limit)
        )
        async with self.engine.connect() as connection:
            return [dict(row._mapping) for row in await connection.execute(statement)]

    async def find(self, reference: str) -> dict[str, Any] | None:
        """A row by receipt id (digits) or by messageId, with the requests that carried it.

        A messageId is found through its dedup key (`aircall-` + the key), which is indexed;
        `message_id` itself is not (migration 0004). The payload is the JSON text stored, not
        parsed: any stored row can be shown, however deeply it nests (`relay/json_text.py`).
        """
        if reference.isdigit():
            condition = outbox.c.id == int(reference)
        elif reference.startswith(MESSAGE_ID_PREFIX):
            dedup_key = reference.removeprefix(MESSAGE_ID_PREFIX)
            condition = sa.and_(outbox.c.dedup_key == dedup_key, outbox.c.message_id == reference)
        else:
            return None
        async with self.engine.connect() as connection:
            row = (await connection.execute(sa.select(*_ROW_COLUMNS).where(condition))).first()
            if row is None:
                return None
            found = dict(row._mapping)
            found["delivery_requests"] = [
                dict(request._mapping)
                for request in await connection.execute(
                    sa.select(delivery_requests)
                    .where(self._request_carried(found["id"]))
                    .order_by(delivery_requests.c.started_at)
                )
            ]
            return found

    def _request_carried(self, row_id: int) -> Any:
        if self.dialect == "sqlite":
            return sa.text(
                "EXISTS (SELECT 1 FROM json_each(delivery_requests.outbox_ids) "
                "WHERE json_each.value = :row_id)"
            ).bindparams(row_id=row_id)
        return sa.text(
            "CAST(delivery_requests.outbox_ids AS jsonb) @> CAST(:ids AS jsonb)"
        ).bindparams(ids=f"[{int(row_id)}]")

    async def requeue(self, where: EventFilter, now: datetime, dry_run: bool) -> int:
        """Put rows back to `pending`, due now (dead, skipped or delivered rows only; `now` is
        this host's clock, used on SQLite: PostgreSQL uses its own). On PostgreSQL the commit
        also notifies the drainers (`relay/db/notify.py`)."""
        statuses = where.statuses or ("dead",)
        invalid = set(statuses) - set(REQUEUABLE_STATUSES)
        if invalid:
            raise ValueError(
                f"cannot requeue {', '.join(sorted(invalid))} rows: only "
                f"{', '.join(REQUEUABLE_STATUSES)}"
            )
        clauses = EventFilter(
            statuses=statuses,
            events=where.events,
            ordering_key=where.ordering_key,
            received_since=where.received_since,
            received_until=where.received_until,
            ids=where.ids,
        ).clauses()
        async with self._writer.begin() as connection:
            if dry_run:
                count = await connection.scalar(
                    sa.select(sa.func.count()).select_from(outbox).where(*clauses)
                )
                return int(count or 0)
            result = await connection.execute(
                sa.update(outbox)
                .where(*clauses)
                .values(
                    status="pending",
                    # Due now: on PostgreSQL by the database's clock, which the drainers'
                    # claims compare with (this host's may be off); on SQLite, one host.
                    next_attempt_at=sa.func.now() if self.dialect == "postgresql" else now,
                    claimed_by=None,
                    claimed_until=None,
                    last_error=sa.literal("requeued by an operator (was ")
                    + outbox.c.status
                    + "): "
                    + sa.func.coalesce(outbox.c.last_error, ""),
                )
            )
            requeued = int(result.rowcount)
            if requeued and self.dialect == "postgresql":
                # Wake the drainers now rather than at their next poll; sent with the commit.
                sql, parameters = notify_statement(requeued, ready=True)
                await connection.exec_driver_sql(sql, parameters)
            return requeued

    async def purge(
        self,
        status: str,
        older_than: datetime,
        dry_run: bool,
        batch_size: int = 1000,
        progress: ProgressCallback | None = None,
    ) -> int:
        """Delete rows of `status` (delivered, skipped or dead) older than the cut-off, in
        batches; delivered rows are aged by `delivered_at`, the others by `received_at`.
        With delivered rows go the `delivery_requests` records older than the cut-off, except
        those that rejected a message (they explain dead rows, which are kept). `progress`
        hears ("<status> rows" or "delivery requests", deleted, total) before the first batch
        and after each."""
        if status not in PURGEABLE_STATUSES:
            raise ValueError(f"cannot purge {status} rows")
        age = outbox.c.delivered_at if status == "delivered" else outbox.c.received_at
        condition = sa.and_(outbox.c.status == status, age < older_than)
        if dry_run:
            return await self._count(outbox, condition)
        select_rows = (
            sa.select(outbox.c.id).where(condition).order_by(outbox.c.id).limit(batch_size)
        )
        deleted = await self._delete_all(select_rows, outbox.c.id, progress, f"{status} rows")
        if status == "delivered":
            select_requests = (
                sa.select(delivery_requests.c.id)
                .where(
                    delivery_requests.c.started_at < older_than,
                    delivery_requests.c.outcome != "rejected",
                )
                .limit(batch_size)
            )
            await self._delete_all(
                select_requests, delivery_requests.c.id, progress, "delivery requests"
            )
        return deleted

    async def _count(self, table: sa.Table, condition: Any) -> int:
        with not_abandoned(self.engine):
            async with self.engine.connect() as connection:
                count = await connection.scalar(
                    sa.select(sa.func.count()).select_from(table).where(condition)
                )
        return int(count or 0)

    async def _delete_all(
        self,
        select_ids: sa.Select[Any],
        id_column: Any,
        progress: ProgressCallback | None,
        what: str,
    ) -> int:
        """Delete, batch after batch, the rows whose ids `select_ids` reads (a batch's worth at
        a time) until it reads none; how many. With `progress`, they are counted first."""
        total = None
        if progress is not None:
            total = await self._count(id_column.table, select_ids.whereclause)
        deleted = 0
        while True:
            if progress is not None:
                progress(what, deleted, total)
            count = await self._delete_batch(select_ids, id_column)
            if not count:
                return deleted
            deleted += count

    async def _delete_batch(self, select_ids: Any, id_column: Any) -> int:
        """One batch of a purge, in a transaction of its own: the rows whose ids `select_ids`
        reads are deleted; returns how many. A purge that is cancelled (the drainer stopping
        while retention runs) stops between two batches: the batch in hand runs to its end
        (`not_abandoned`)."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        with not_abandoned(self.engine):
            async with self._writer.begin() as connection:
                ids = list(await connection.scalars(select_ids))
                if ids:
                    await connection.execute(sa.delete(id_column.table).where(id_column.in_(ids)))
        return len(ids)
