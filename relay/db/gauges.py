"""The outbox as gauges: what the receiver's `/metrics` reads from the database at each scrape.

Three short read statements on one connection, all answered from indexes: the rows not yet
delivered and the dead rows (`ix_outbox_status_id`), the calls whose `call.hungup` is older
than the timeout with no `call.ended` (`ix_outbox_call_hungup_received_at`, then
`ix_outbox_ordering_key_status` per call), and the last `reconcile` run (`reconcile_runs`' key).
Delivered and skipped rows, the bulk of a long-lived outbox, are never counted.

On SQLite, the space of the filesystem that holds the database file too: one `statvfs` call.
The relay's only gauge of calls awaiting `call.ended` is this one (the drainer logs each such
call but exports no gauge of its own): docs/operations.md, "Metrics".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from relay.db.reconcile import last_run
from relay.db.tables import awaiting_call_ended, outbox, utc_datetime

# The statuses the gauges count (delivered and skipped only grow, and the SQL answers them).
GAUGE_STATUSES = ("pending", "delivering", "dead")


@dataclass(frozen=True, slots=True)
class FilesystemSpace:
    """Bytes of the filesystem holding the SQLite file: available to the relay's (unprivileged)
    user, as `df` and node_exporter's `node_filesystem_avail_bytes` count them, and in all."""

    avail_bytes: int
    size_bytes: int


@dataclass(frozen=True, slots=True)
class LastReconcile:
    """The latest row of `reconcile_runs`, as the gauges show it."""

    finished_at: datetime
    complete: bool  # outcome `complete`: every due call had (or got) its call.ended
    missing: int
    awaiting_call_ended: int
    backfilled: int


@dataclass(frozen=True, slots=True)
class OutboxGauges:
    pending: int
    delivering: int
    dead: int
    oldest_undelivered_received_at: datetime | None  # of pending and delivering rows
    calls_awaiting_call_ended: int
    # The SQLite file's filesystem; None on PostgreSQL (whose disk is the server's own business).
    filesystem: FilesystemSpace | None = None
    last_reconcile: LastReconcile | None = None  # None: no run recorded


def sqlite_filesystem_space(engine: AsyncEngine) -> FilesystemSpace | None:
    """The space of the filesystem holding `engine`'s SQLite file; None for another database
    or an in-memory one."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        return None
    space = os.statvfs(Path(database).absolute().parent)
    return FilesystemSpace(
        avail_bytes=space.f_bavail * space.f_frsize, size_bytes=space.f_blocks * space.f_frsize
    )


# SQL: the rows not yet delivered and the dead rows, counted (`pending`, `delivering`, `dead`),
# and the earliest receipt of the undelivered ones (`oldest`); answered from
# `ix_outbox_status_id`. The gauges' and the drainer's backlog (`DeliveryStore.backlog`).
BACKLOG_COUNTS: Final = sa.select(
    *(sa.func.count().filter(outbox.c.status == status).label(status) for status in GAUGE_STATUSES),
    sa.func.min(outbox.c.received_at)
    .filter(outbox.c.status.in_(("pending", "delivering")))
    .label("oldest"),
).where(outbox.c.status.in_(GAUGE_STATUSES))


def count_calls_awaiting_call_ended(received_before: datetime) -> sa.Select[Any]:
    """SQL: how many calls hung up before the cut-off still have no `call.ended`."""
    return sa.select(sa.func.count(sa.distinct(outbox.c.ordering_key))).where(
        awaiting_call_ended(received_before)
    )


async def read_outbox_gauges(engine: AsyncEngine, awaiting_before: datetime) -> OutboxGauges:
    """The gauges now; `awaiting_before` is the cut-off of `call.hungup` receipts (now minus
    `RELAY_CALL_ENDED_TIMEOUT_SECONDS`), as the drainer's `call_ended_missing` check uses."""
    async with engine.connect() as connection:
        row = (await connection.execute(BACKLOG_COUNTS)).one()
        calls = await connection.scalar(count_calls_awaiting_call_ended(awaiting_before))
        run = await last_run(connection)
    return OutboxGauges(
        pending=int(row.pending),
        delivering=int(row.delivering),
        dead=int(row.dead),
        oldest_undelivered_received_at=None if row.oldest is None else utc_datetime(row.oldest),
        calls_awaiting_call_ended=int(calls or 0),
        filesystem=sqlite_filesystem_space(engine),
        last_reconcile=None
        if run is None
        else LastReconcile(
            finished_at=utc_datetime(run["finished_at"]),
            complete=run["outcome"] == "complete",
            missing=int(run["missing"]),
            awaiting_call_ended=int(run["awaiting_call_ended"]),
            backfilled=int(run["backfilled"]),
        ),
    )
