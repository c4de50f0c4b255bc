"""The drainer's writes to the outbox, and its tally.

Each write (a request's record with its rows' fate, rows given back, rows dead before any
request, a take from the deployment's budget) is retried through a passing fault of the database
(a locked SQLite file, a PostgreSQL restart) as `policy.py` says; past that the error propagates
and the rows wait for their lease to expire, to be claimed again (re-sends keep their messageId).
The store changes a row only while this drainer still holds its lease. What the writes did adds
up in `DrainSummary` and the drainer's metrics.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import anyio

from relay.db.delivery import (
    DeadRows,
    DeliveryStore,
    FinishResult,
    RequestRecord,
    RetryRows,
    SendLimits,
    TakenBudget,
)
from relay.drainer.metrics import DrainerMetrics
from relay.drainer.policy import (
    WRITE_RETRY_FIRST_SECONDS,
    next_write_retry_seconds,
    second_call_ended,
    write_retry_window_seconds,
)
from relay.logs import get_logger

log = get_logger("relay.drainer")

Result = TypeVar("Result")


@dataclass
class DrainSummary:
    requests: int = 0
    delivered: int = 0
    late: int = 0
    retried: int = 0
    dead: int = 0
    released: int = 0


class Ledger:
    def __init__(
        self,
        store: DeliveryStore,
        owner: str,
        lease_seconds: float,
        metrics: DrainerMetrics,
        wake_after: Callable[[float], None],
    ) -> None:
        self.store = store
        self.owner = owner
        self.summary = DrainSummary()
        self._retry_window = write_retry_window_seconds(lease_seconds)
        self._metrics = metrics
        self._wake_after = wake_after  # a look when retried rows fall due

    async def retrying(self, operation: str, call: Callable[[], Awaitable[Result]]) -> Result:
        """Run a store write, retrying faults of the database for the window of `policy.py`."""
        deadline = anyio.current_time() + self._retry_window
        delay = WRITE_RETRY_FIRST_SECONDS
        while True:
            try:
                return await call()
            except Exception as error:
                if anyio.current_time() + delay > deadline:
                    raise
                log.warning(
                    "database_retry",
                    operation=operation,
                    error=f"{type(error).__name__}: {error}"[:300],
                    retry_in_s=delay,
                )
                await anyio.sleep(delay)
                delay = next_write_retry_seconds(delay)

    async def record_delivered(self, record: RequestRecord) -> FinishResult:
        """Record a request Segment accepted: its rows delivered."""
        return await self._record(
            lambda: self.store.finish(self.owner, record, delivered=record.outbox_ids)
        )

    async def record_retry(
        self, record: RequestRecord, retry: RetryRows, pause_seconds: float | None = None
    ) -> FinishResult:
        """Record a request whose rows go back to `pending` until `retry.after`, and look again
        then, whatever the poll interval; with `pause_seconds` (a 429), pause the deployment's
        sending as long."""
        outcome = await self._record(
            lambda: self.store.finish(self.owner, record, retry=retry, pause_seconds=pause_seconds)
        )
        self._wake_after(retry.after.total_seconds())
        return outcome

    async def record_dead(self, record: RequestRecord, reason: str) -> FinishResult:
        """Record a request whose rows go `dead` with `reason`."""
        dead = [DeadRows(ids=record.outbox_ids, reason=reason)]
        return await self._record(lambda: self.store.finish(self.owner, record, dead=dead))

    async def record_split(self, record: RequestRecord) -> None:
        """Record a request split in halves: the halves' own requests judge its rows."""
        await self._record(lambda: self.store.finish(self.owner, record))

    async def _record(self, finish: Callable[[], Awaitable[FinishResult]]) -> FinishResult:
        """Record a request and its rows' fate (one transaction), and count what it did."""
        outcome = await self.retrying("finish", finish)
        self.summary.delivered += outcome.delivered
        self.summary.late += outcome.late
        self.summary.retried += outcome.retried
        self.summary.dead += outcome.dead
        self._metrics.delivered.inc(outcome.delivered)
        self._metrics.late.inc(outcome.late)
        self._metrics.retried.inc(outcome.retried)
        if outcome.lost_lease:
            log.warning("lease_lost", rows=outcome.lost_lease, owner=self.owner)
        return outcome

    async def release(self, ids: Sequence[int], announce: bool = False) -> int:
        """Give rows back, unsent (counted as released); `announce`: tell the other drainers
        (PostgreSQL's NOTIFY) that they can take them at once."""
        released = await self.retrying(
            "release", lambda: self.store.release(self.owner, ids, announce=announce)
        )
        self.summary.released += released
        return released

    async def mark_dead_unsent(self, groups: list[DeadRows]) -> int:
        """Rows that can never be sent, dead before any request (counted as dead)."""
        dead = await self.retrying(
            "mark_dead", lambda: self.store.mark_dead_unsent(self.owner, groups)
        )
        self.summary.dead += dead
        return dead

    async def skip_second_call_ended(self, ids: Sequence[int]) -> dict[int, str]:
        """Of the claimed `call.ended` rows `ids`, skip those whose call has its one already
        (`policy.second_call_ended`); returns {id: reason} of the rows skipped."""
        return await self.retrying(
            "skip_call_ended",
            lambda: self.store.skip_second_call_ended(self.owner, ids, second_call_ended),
        )

    async def take_send_budget(self, limits: SendLimits, events: int) -> TakenBudget:
        return await self.retrying(
            "take_send_budget", lambda: self.store.take_send_budget(limits, events)
        )
