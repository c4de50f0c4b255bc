"""Reconciliation's statements: what the outbox holds of Aircall's calls, the back-filled
`call.ended` rows, the `reconcile_runs` audit trail, and the drainer's look at a claimed
`call.ended` whose call may already have its one (docs/architecture.md, "Reconciliation").

- `calls_in_outbox`: for a batch of call ids, whether the outbox has any row of each call and
  whether one of them is a `call.ended`. One statement per `LOOKUP_BATCH` calls, read from the
  index `ix_outbox_ordering_key_status` (ordering key first, `event` in it: no table row read).
- `backfill_call_ended`: one `call.ended` row built from Aircall's call object, origin
  `reconciled`, inserted only if the call has no `call.ended` row of any status, in the same
  statement (`INSERT ... SELECT ... WHERE NOT EXISTS`), with a dedup key of its own that depends
  on the call id alone, so that a second run adds nothing (`ON CONFLICT (dedup_key) DO NOTHING`).
- `skip_second_call_ended`: in the drainer's write transaction, right after a claim, the claimed
  `call.ended` rows that lose to another `call.ended` of their call (the rule is the drainer's,
  `relay.drainer.policy.second_call_ended`) become `skipped`, with the reason naming the row
  that goes (or went) instead. Two `call.ended` rows of one call can both exist when a real one
  arrives after a back-filled one, or when a receiver and reconcile insert at once on
  PostgreSQL (neither sees the other's uncommitted row); this is where exactly one is chosen.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from relay.aircall import canonical_json, message_id_for, payload_json
from relay.db.engine import writer
from relay.db.tables import outbox, reconcile_runs

ORIGIN_WEBHOOK: Final = "webhook"
ORIGIN_RECONCILED: Final = "reconciled"
# `outbox.source` of a back-filled row: it came with no token, so with no token's label.
RECONCILE_SOURCE: Final = "reconcile"
CALL_ENDED: Final = "call.ended"
# Calls looked up per statement: a few hundred bound values, well within both databases' limits.
LOOKUP_BATCH: Final = 500


def reconciled_dedup_key(call_id: str) -> str:
    """The identity of the back-filled `call.ended` of a call: the SHA-256 of the canonical JSON
    of `{"origin": "reconciled", "resource": "call", "event": "call.ended", "id": "<call id>"}`.
    It depends on the call alone (not on the call object, whose recording URLs change on every
    read), so every run computes the same one; its messageId is `aircall-` + it, as for any row.
    """
    identity = {"origin": ORIGIN_RECONCILED, "resource": "call", "event": CALL_ENDED}
    text = canonical_json({**identity, "id": call_id})
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def call_key(call_id: str) -> str:
    return f"call:{call_id}"


@dataclass(frozen=True, slots=True)
class CallInOutbox:
    has_rows: bool
    has_call_ended: bool


@dataclass(frozen=True, slots=True)
class CallEndedRow:
    """A `call.ended` row, as the drainer's rule compares them."""

    id: int
    ordering_key: str
    origin: str
    status: str
    attempts: int


# (claimed call.ended ids, every call.ended row of their calls) -> {id to skip: reason}
SkipRule = Callable[[Sequence[int], Sequence[CallEndedRow]], Mapping[int, str]]


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One reconcile run, as written to `reconcile_runs`."""

    window_since: datetime
    window_until: datetime
    backfill: bool
    calls_seen: int
    missing: int
    awaiting_call_ended: int
    not_yet_due: int
    backfilled: int
    errors: int
    started_at: datetime
    finished_at: datetime
    outcome: str
    error: str | None = None


def _keys_param() -> Any:
    return sa.bindparam("keys", expanding=True, type_=outbox.c.ordering_key.type)


_CALLS_IN_OUTBOX = (
    sa.select(
        outbox.c.ordering_key,
        sa.func.max(sa.case((outbox.c.event == CALL_ENDED, 1), else_=0)).label("ended"),
    )
    .where(outbox.c.ordering_key.in_(_keys_param()))
    .group_by(outbox.c.ordering_key)
)

_CALL_ENDED_OF_CLAIMED = sa.select(
    outbox.c.id, outbox.c.ordering_key, outbox.c.origin, outbox.c.status, outbox.c.attempts
).where(
    outbox.c.ordering_key.in_(
        sa.select(outbox.c.ordering_key)
        .where(outbox.c.id.in_(sa.bindparam("ids", expanding=True)))
        .scalar_subquery()
    ),
    outbox.c.event == CALL_ENDED,
)

_SKIP = (
    sa.update(outbox)
    .where(
        outbox.c.id == sa.bindparam("row_id"),
        outbox.c.claimed_by == sa.bindparam("owner"),
        outbox.c.status == "delivering",
    )
    .values(
        status="skipped",
        last_error=sa.bindparam("reason"),
        claimed_by=None,
        claimed_until=None,
    )
)


def skip_second_call_ended(
    connection: sa.Connection, *, owner: str, ids: Sequence[int], rule: SkipRule
) -> dict[int, str]:
    """Of the claimed `call.ended` rows `ids` (held by `owner`), skip those `rule` says lose to
    another `call.ended` of their call; returns {id: reason} of the rows skipped. Runs in the
    drainer's write transaction (a row it no longer holds is left alone)."""
    rows = [
        CallEndedRow(row.id, row.ordering_key, row.origin, row.status, row.attempts)
        for row in connection.execute(_CALL_ENDED_OF_CLAIMED, {"ids": list(ids)})
    ]
    skipped: dict[int, str] = {}
    for row_id, reason in rule(ids, rows).items():
        changed = connection.execute(_SKIP, {"row_id": row_id, "owner": owner, "reason": reason})
        if changed.rowcount:
            skipped[row_id] = reason
    return skipped


class ReconcileStore:
    """Reconcile's statements, on the engine (a command of its own: no shared writer)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self._backfill = _backfill_statement(self.dialect)

    async def calls_in_outbox(self, call_ids: Sequence[str]) -> dict[str, CallInOutbox]:
        """What the outbox holds of each call (absent from the result: no row at all), read
        `LOOKUP_BATCH` calls per statement on one connection."""
        found: dict[str, CallInOutbox] = {}
        async with self.engine.connect() as connection:
            for start in range(0, len(call_ids), LOOKUP_BATCH):
                keys = [call_key(call_id) for call_id in call_ids[start : start + LOOKUP_BATCH]]
                result = await connection.execute(_CALLS_IN_OUTBOX, {"keys": keys})
                for key, ended in result:
                    found[key.removeprefix("call:")] = CallInOutbox(True, bool(ended))
        return found

    async def backfill_call_ended(
        self, call_id: str, call: dict[str, Any], timestamp: int, now: datetime
    ) -> int | None:
        """Store the `call.ended` of `call` (Aircall's call object, `id` = `call_id`) as a
        pending row of origin `reconciled`, occurring at `timestamp` (UNIX seconds); returns its
        id, or None when the call already has a `call.ended` row (of any status) or this very
        row exists. `now` is the receipt on SQLite (PostgreSQL uses its own clock)."""
        dedup = reconciled_dedup_key(call_id)
        envelope = {"resource": "call", "event": CALL_ENDED, "timestamp": timestamp, "data": call}
        parameters = {
            "dedup_key": dedup,
            "message_id": message_id_for(dedup),
            "resource_id": call_id,
            "ordering_key": call_key(call_id),
            "occurred_at": datetime.fromtimestamp(timestamp, UTC),
            "payload": payload_json(envelope),
            "now": now,
        }
        async with writer(self.engine).begin() as connection:
            inserted = (await connection.execute(self._backfill, parameters)).scalar()
        return None if inserted is None else int(inserted)

    async def record_run(self, run: RunRecord) -> int:
        async with writer(self.engine).begin() as connection:
            result = await connection.execute(
                sa.insert(reconcile_runs).values(**run_values(run)).returning(reconcile_runs.c.id)
            )
            return int(result.scalar_one())

    async def last_run(self) -> dict[str, Any] | None:
        """The latest run, as a row of `reconcile_runs`, or None when none was recorded."""
        async with self.engine.connect() as connection:
            return await last_run(connection)


async def last_run(connection: AsyncConnection) -> dict[str, Any] | None:
    """The latest row of `reconcile_runs` (its id is the largest), or None."""
    statement = sa.select(reconcile_runs).order_by(reconcile_runs.c.id.desc()).limit(1)
    row = (await connection.execute(statement)).first()
    return None if row is None else dict(row._mapping)


def run_values(run: RunRecord) -> dict[str, Any]:
    return {name: getattr(run, name) for name in RunRecord.__slots__}


def has_call_ended(table: Any, key: Any) -> Any:
    """SQL: the outbox (or `table`, an alias of it) has a `call.ended` row of the ordering key
    `key`. `SELECT id` (the rowid, in every index): SQLite answers from the index alone."""
    return (
        sa.select(table.c.id)
        .where(table.c.ordering_key == key, table.c.event == CALL_ENDED)
        .exists()
    )


def _backfill_statement(dialect: str) -> Any:
    """`INSERT ... SELECT ... WHERE NOT EXISTS (a call.ended of the call) ON CONFLICT DO
    NOTHING RETURNING id`: the condition and the insert are one statement."""
    if dialect == "postgresql":
        moment: Any = sa.func.now()
        payload: Any = sa.cast(sa.bindparam("payload", type_=sa.Text()), postgresql.JSON())
    else:
        moment = sa.bindparam("now", type_=outbox.c.received_at.type)
        payload = sa.bindparam("payload", type_=sa.Text())
    ended = outbox.alias("ended")
    values: dict[str, Any] = {
        "dedup_key": sa.bindparam("dedup_key", type_=outbox.c.dedup_key.type),
        "message_id": sa.bindparam("message_id", type_=outbox.c.message_id.type),
        "source": sa.literal(RECONCILE_SOURCE, outbox.c.source.type),
        "resource": sa.literal("call", outbox.c.resource.type),
        "event": sa.literal(CALL_ENDED, outbox.c.event.type),
        "resource_id": sa.bindparam("resource_id", type_=outbox.c.resource_id.type),
        "ordering_key": sa.bindparam("ordering_key", type_=outbox.c.ordering_key.type),
        "occurred_at": sa.bindparam("occurred_at", type_=outbox.c.occurred_at.type),
        "received_at": moment,
        "last_received_at": moment,
        "received_count": sa.literal(1),
        "payload": payload,
        "status": sa.literal("pending", outbox.c.status.type),
        "next_attempt_at": moment,
        "origin": sa.literal(ORIGIN_RECONCILED, outbox.c.origin.type),
    }
    select = sa.select(*values.values()).where(~has_call_ended(ended, sa.bindparam("ordering_key")))
    insert = postgresql.insert(outbox) if dialect == "postgresql" else sqlite.insert(outbox)
    return (
        insert.from_select(list(values), select)
        .on_conflict_do_nothing(index_elements=[outbox.c.dedup_key])
        .returning(outbox.c.id)
    )
