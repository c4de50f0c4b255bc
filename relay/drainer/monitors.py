"""What the drainer watches beside delivery:

- `HeldRows`, `renew_leases_forever`: the rows it holds a lease on, renewed every third of a lease
  while their requests are in flight.
- `CallEndedWatch`: calls that got `call.hungup` and no `call.ended` within the timeout (a
  warning per call; their number is the receiver's gauge `relay_outbox_calls_awaiting_call_ended`,
  read from the database at each scrape).
- `Reachability`: Segment giving no answer at all (`segment_unreachable`, once per outage, and
  `segment_reachable` at its end).
- `report_paused_without_write_key`: without a write key, the backlog, every 5 minutes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import anyio

from relay.db.delivery import DeliveryStore
from relay.drainer.metrics import DrainerMetrics
from relay.drainer.sender import SendResult
from relay.logs import get_logger

log = get_logger("relay.drainer")

NO_WRITE_KEY_REMINDER_SECONDS = 300.0


@dataclass
class HeldRows:
    """Rows this drainer holds a lease on, by batch."""

    batches: dict[int, list[int]] = field(default_factory=dict)
    next_batch: int = 0

    def add(self, ids: list[int]) -> int:
        self.next_batch += 1
        self.batches[self.next_batch] = ids
        return self.next_batch

    def all_ids(self) -> list[int]:
        return [row_id for ids in self.batches.values() for row_id in ids]


async def renew_leases_forever(
    store: DeliveryStore,
    owner: str,
    held: HeldRows,
    clock: Callable[[], datetime],
    lease_seconds: float,
) -> None:
    period = lease_seconds / 3
    lease = timedelta(seconds=lease_seconds)
    while True:
        await anyio.sleep(period)
        ids = held.all_ids()
        if not ids:
            continue
        try:
            still = await store.renew(owner, ids, clock(), lease)
        except Exception as error:  # the database may be briefly away; try next period
            log.warning("lease_renewal_failed", error=f"{type(error).__name__}: {error}")
            continue
        # Rows recorded while the renewal waited for the database are no longer held, and were
        # not renewed: they are not lost.
        now_held = set(held.all_ids())
        expected = sum(1 for row_id in ids if row_id in now_held)
        if still < expected:
            log.warning("lease_lost", rows=expected - still, owner=owner)


@dataclass
class CallEndedWatch:
    store: DeliveryStore
    clock: Callable[[], datetime]
    timeout_seconds: float
    period_seconds: float
    _reported: set[str] = field(default_factory=set, init=False)

    async def run_forever(self) -> None:
        while True:
            try:
                # A stop waits for a check under way (its query is not abandoned: see
                # `relay.db.engine.not_abandoned`).
                await self.check()
            except Exception as error:
                log.warning("call_ended_check_failed", error=f"{type(error).__name__}: {error}")
            await anyio.sleep(self.period_seconds)

    async def check(self) -> list[str]:
        """Log each call newly found waiting for `call.ended` past the timeout."""
        cutoff = self.clock() - timedelta(seconds=self.timeout_seconds)
        awaiting = await self.store.calls_awaiting_ended(cutoff)
        keys = {call.ordering_key for call in awaiting}
        for call in awaiting:
            if call.ordering_key not in self._reported:
                log.warning(
                    "call_ended_missing",
                    ordering_key=call.ordering_key,
                    hungup_received_at=call.hungup_received_at.isoformat(),
                    timeout_s=self.timeout_seconds,
                    detail="call.hungup received but no call.ended: a webhook to chase while "
                    "Aircall still retries (up to 12 h)",
                )
        self._reported = keys
        return sorted(keys)


@dataclass
class Reachability:
    """Once requests have had no answer for `alert_seconds`, says so at error level, once; an
    answer ends the outage (logged), and a later one is reported again. Checked at each failure,
    so with long backoffs the alert comes with the first failure past `alert_seconds`."""

    base_url: str
    clock: Callable[[], datetime]
    alert_seconds: float
    _unanswered_since: datetime | None = field(default=None, init=False)  # no answer since
    _reported: bool = field(default=False, init=False)

    def note(self, result: SendResult, started: datetime) -> None:
        if result.status is not None:
            if self._reported:
                log.info("segment_reachable", segment_base_url=self.base_url)
            self._unanswered_since = None
            self._reported = False
            return
        if self._unanswered_since is None:
            self._unanswered_since = started
        failing = (self.clock() - self._unanswered_since).total_seconds()
        if not self._reported and failing >= self.alert_seconds:
            self._reported = True
            log.error(
                "segment_unreachable",
                segment_base_url=self.base_url,
                since=self._unanswered_since.isoformat(),
                failing_s=round(failing, 1),
                error=result.error,
                detail="no answer from Segment: check RELAY_SEGMENT_BASE_URL and the network; "
                "rows are kept and retried",
            )


async def report_paused_without_write_key(
    store: DeliveryStore, metrics: DrainerMetrics, stop: anyio.Event, once: bool
) -> None:
    metrics.paused.labels(reason="no_write_key").set(1)
    while True:
        backlog = await store.backlog()
        log.warning(
            "delivery_paused",
            reason="RELAY_SEGMENT_WRITE_KEY is not set: events stay in the outbox",
            pending=backlog.pending,
        )
        if once:
            return
        with anyio.move_on_after(NO_WRITE_KEY_REMINDER_SECONDS):
            await stop.wait()
        if stop.is_set():
            return
