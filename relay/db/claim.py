"""Claim planning: which rows one claim takes, read a page of heads at a time, and the rows
of expired leases given back first. The statements are `relay/db/delivery_sql.py`; the claim
runs as one write transaction of `DeliveryStore` (`relay/db/delivery.py`).

A claim takes the heads of keys and, behind each head, the run of following events of the same
key that are also deliverable now, so that one request can carry a call's settled events in
order. On SQLite it runs in a `BEGIN IMMEDIATE` transaction (one writer at a time); on
PostgreSQL heads are locked with `FOR UPDATE SKIP LOCKED`, so several drainers never claim the
same key.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import sqlalchemy as sa

from relay.db.delivery_sql import CLAIM_COLUMNS, Statements


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


# Heads of keys read by a claim's first query; the next pages are sized on the events per head
# seen so far (a backlog's keys carry several settled events each, live ones about one). Heads
# are locked as they are read on PostgreSQL (SKIP LOCKED), so reading no more than the claim
# will take leaves the other keys to another drainer claiming at the same moment.
FIRST_HEADS_PAGE = 8
MAX_HEADS_PAGE = 500
# How often a claim first gives back the rows of expired leases. Finding them reads every row in
# flight (the lease's expiry is in no index), so a busy drainer does it at most this often, not
# at each claim (docs/performance.md, "Figures behind the code", has its cost). A row whose
# drainer died waits at most this much longer than its lease for it.
RELEASE_EXPIRED_EVERY = timedelta(seconds=1)

# A guard for whoever edits one and not the other:
if tuple(column.name for column in CLAIM_COLUMNS) != ClaimedEvent._fields:  # pragma: no cover
    raise RuntimeError("CLAIM_COLUMNS must list ClaimedEvent's fields, in order")


class ClaimOrder(NamedTuple):
    """What one claim asks for (`DeliveryStore.claim` says what each means)."""

    owner: str
    # The caller's clock: SQLite's moments, and the pace of the look for expired leases.
    now: datetime
    settle: timedelta
    lease: timedelta
    # How many rows in all, and in one key's run.
    max_events: int
    max_per_key: int


class ClaimPlanner:
    """Plans and takes claims for one drainer (it remembers when it last gave back expired
    leases)."""

    def __init__(self, statements: Statements) -> None:
        self._statements = statements
        self._released_expired_at: datetime | None = None

    def claim(self, order: ClaimOrder, connection: sa.Connection) -> list[ClaimedEvent]:
        """See `DeliveryStore.claim`; run inside its write transaction."""
        owner, now, settle, lease, max_events, max_per_key = order
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


def _heads_wanted(room: int, heads_read: int, events_planned: int) -> int:
    """How many heads of keys to read next, for `room` more events."""
    if heads_read == 0:
        return min(room, FIRST_HEADS_PAGE)
    events_per_head = max(events_planned / heads_read, 1.0)
    return max(1, min(room, MAX_HEADS_PAGE, math.ceil(room / events_per_head)))
