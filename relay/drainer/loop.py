"""The drainer's loop: claims deliverable outbox rows, maps them, sends them to Segment in
batches, and hands each answer to `verdicts.py`. It knows no SQL (that is `DeliveryStore`) and
no HTTP details (that is the sender).

Life of a request: claim (lease) -> map (unsendable rows go dead at once) -> plan batches
(`batching.py`: a key's run stays in one request) -> wait for any pause and for the request's
turn in the deployment's budget (`pacing.py`) -> POST -> record the request and its rows' fate in
one transaction (`verdicts.py`, through `ledger.py`, which retries the drainer's writes). Leases
are renewed while requests are in flight (`monitors.py`, with the other watches). On stop
(SIGTERM), nothing new is claimed, in-flight requests get the grace period to finish, and any
row still held is released.

An idle drainer claims again when a request of its own is recorded, when a wake-up it scheduled
comes (a receiver's commit, announced by `notifications` on PostgreSQL, has settled; a retry
falls due), or after its poll interval, longer while it hears of every commit.
"""

from __future__ import annotations

import gc
import os
import random as random_module
import socket
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Protocol

import anyio
import anyio.abc

from relay.db.delivery import ClaimedEvent, DeadRows, DeliveryStore
from relay.db.notify import READY_PREFIX
from relay.drainer.batching import Prepared, encoded_size, plan_batches
from relay.drainer.config import DrainerConfig
from relay.drainer.ledger import DrainSummary, Ledger
from relay.drainer.metrics import DrainerMetrics
from relay.drainer.monitors import (
    CallEndedWatch,
    HeldRows,
    Reachability,
    renew_leases_forever,
    report_paused_without_write_key,
)
from relay.drainer.pacing import Pacing
from relay.drainer.policy import Concurrency, claim_retry_seconds
from relay.drainer.sender import SendResult
from relay.drainer.verdicts import Verdicts
from relay.drainer.wakeups import WakeSchedule
from relay.logs import get_logger
from relay.segment import (
    MappingOptions,
    OutboxEvent,
    UnsendableEvent,
    batch_overhead_bytes,
    encode_batch,
    to_track_message,
)

log = get_logger("relay.drainer")

# Batches claimed ahead of the request slots, ready to go when one frees.
LOOKAHEAD_BATCHES = 2


_startup_frozen = False


def _freeze_startup_objects() -> None:
    """Move every object alive now (modules, SQLAlchemy's tables and compiled statements, the
    settings) out of the cyclic garbage collector's sight, once per process.

    Each claimed event brings a few dozen short-lived containers (its payload, parsed), which
    survive long enough to be promoted and so trigger full collections every few hundred events;
    each full collection walked every object of the process. Without the long-lived ones it
    walks only the work in hand (docs/performance.md has what that saves). Reference counting
    still frees everything; only cycles among frozen objects are never collected, and they are
    collected once here, first.
    """
    global _startup_frozen
    if not _startup_frozen:
        _startup_frozen = True
        gc.collect()
        gc.freeze()


class Sender(Protocol):
    base_url: str  # where requests go, for the logs

    async def post(self, body: bytes) -> SendResult: ...


class CommitNotifications(Protocol):
    """Word of the receivers' commits (PostgreSQL's LISTEN: `relay/db/notify.py`). `run` lasts
    until cancelled, calling `on_commit` with the notification's payload when rows to deliver
    were committed (`ready:` first when they need not settle), and `on_listening` with True
    each time word can arrive again (commits made before were not announced) and False when it
    no longer can; `listening` says whether it can arrive now."""

    @property
    def listening(self) -> bool: ...

    async def run(
        self, on_commit: Callable[[str], None], on_listening: Callable[[bool], None]
    ) -> None: ...

    async def close(self) -> None: ...


def utc_now() -> datetime:
    return datetime.now(UTC)


def new_owner() -> str:
    """A lease owner name that says which process holds a row: host, pid, and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Drainer:
    def __init__(
        self,
        store: DeliveryStore,
        sender: Sender | None,
        config: DrainerConfig,
        mapping: MappingOptions,
        metrics: DrainerMetrics | None = None,
        owner: str | None = None,
        clock: Callable[[], datetime] = utc_now,
        random: Callable[[], float] = random_module.random,
        notifications: CommitNotifications | None = None,
    ) -> None:
        self.store = store
        self.sender = sender
        self.config = config
        self.mapping = mapping
        self.metrics = metrics or DrainerMetrics()
        self.owner = owner or new_owner()
        self.clock = clock
        self.random = random
        self.concurrency = Concurrency.of(config.concurrency)
        self.lease = timedelta(seconds=config.lease_seconds)
        self.notifications = notifications
        self._wake = anyio.Event()
        self._wakeups = WakeSchedule(self._wake_now)
        self.ledger = Ledger(
            store, self.owner, config.lease_seconds, self.metrics, self._wakeups.wake_after
        )
        self.summary: DrainSummary = self.ledger.summary
        self.pacing = Pacing(config.send_limits(), self.ledger, self.metrics, clock)
        base_url = "" if sender is None else sender.base_url
        self.verdicts = Verdicts(
            config=config,
            ledger=self.ledger,
            pacing=self.pacing,
            concurrency=self.concurrency,
            metrics=self.metrics,
            random=random,
            base_url=base_url,
            resend=self._send,
        )
        self.reachability = Reachability(base_url, clock, config.unreachable_alert_seconds)
        self.call_ended = CallEndedWatch(
            store,
            clock,
            config.call_ended_timeout_seconds,
            config.call_ended_check_seconds,
        )
        self._held = HeldRows()
        self._in_flight = 0  # batches dispatched and not yet recorded
        self._awaiting_answer = 0  # of those, the ones whose request has no answer yet
        self._slots: anyio.CapacityLimiter | None = None  # requests in flight, <= concurrency
        self._stopping = False
        self.running = False
        self.finished = anyio.Event()

    # -- the main loop -----------------------------------------------------------------------

    async def run(self, stop: anyio.Event, once: bool = False) -> DrainSummary:
        """Deliver until `stop` is set (or, with `once`, until nothing is deliverable now)."""
        _freeze_startup_objects()
        self.running = True
        try:
            return await self._run(stop, once)
        finally:
            with anyio.CancelScope(shield=True):
                await self.store.close()  # its own connection, if it opened one
            self.running = False
            self.finished.set()

    async def _run(self, stop: anyio.Event, once: bool) -> DrainSummary:
        if self.sender is None:
            await report_paused_without_write_key(self.store, self.metrics, stop, once)
            return self.summary
        log.info(
            "drainer_started",
            owner=self.owner,
            segment_base_url=self.sender.base_url,
            batch_size=self.config.batch_size,
            concurrency=self.config.concurrency,
            events_per_second=self.config.events_per_second,
            requests_per_second=self.config.requests_per_second,
            settle_seconds=self.config.settle_seconds,
        )
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._wake_on, stop)
                group.start_soon(
                    renew_leases_forever,
                    self.store,
                    self.owner,
                    self._held,
                    self.clock,
                    self.config.lease_seconds,
                )
                group.start_soon(self.call_ended.run_forever)
                group.start_soon(self._wakeups.run)
                if self.notifications is not None and not once:
                    group.start_soon(self.notifications.run, self._on_commit, self._on_listening)
                await self._claim_loop(group, stop, once)
                self._stopping = True
                with anyio.move_on_after(self.config.shutdown_grace_seconds):
                    while self._in_flight:
                        await self._wait(1.0)
                if self._in_flight:
                    log.warning("grace_period_over", in_flight=self._in_flight)
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                held = self._held.all_ids()
                if held:
                    self.summary.released += await self.store.release(
                        self.owner, held, announce=True
                    )
                    self._held.batches.clear()
        log.info("drainer_stopped", owner=self.owner, **self.summary.__dict__)
        return self.summary

    async def _claim_loop(self, group: anyio.abc.TaskGroup, stop: anyio.Event, once: bool) -> None:
        failures = 0
        while not stop.is_set():
            self._wake = anyio.Event()
            pause = self.pacing.remaining()
            if pause > 0:
                await self._wait(min(pause, 1.0))
                continue
            # Batches are claimed for the free request slots and LOOKAHEAD_BATCHES more, which
            # wait (mapped, encoded) for a slot: a slot that frees is used at once, instead of
            # after a claim. A slot frees when Segment answers: recording the answer is the
            # database's work, and the rows, still `delivering`, keep their keys blocked until
            # then, so the next claim (often in the same transaction) need not wait for it.
            free = self.concurrency.current + LOOKAHEAD_BATCHES - self._awaiting_answer
            if free <= 0:
                await self._wait(self.config.poll_seconds)
                continue
            try:
                claimed = await self.store.claim(
                    self.owner,
                    now=self.clock(),
                    settle=timedelta(seconds=self.config.settle_seconds),
                    lease=self.lease,
                    max_events=free * self.config.batch_size,
                    max_per_key=self.config.batch_size,
                )
                if claimed:
                    await self._dispatch(group, claimed, free)
                failures = 0
            except Exception as error:
                # The database is locked, restarting or unreachable: wait and claim again.
                failures += 1
                delay = claim_retry_seconds(failures)
                log.warning(
                    "claim_failed",
                    error=f"{type(error).__name__}: {error}"[:300],
                    retry_in_s=delay,
                )
                await self._wait(delay)
                continue
            if not claimed:
                if once and self._in_flight == 0:
                    return
                await self._wait(self._idle_poll_seconds())

    async def _dispatch(
        self, group: anyio.abc.TaskGroup, claimed: Sequence[ClaimedEvent], free: int
    ) -> None:
        claimed = await self._without_second_call_ended(claimed)
        prepared, unsendable = self._map(claimed)
        if unsendable:
            groups = [DeadRows(ids=[row.id], reason=str(error)) for row, error in unsendable]
            await self.ledger.mark_dead_unsent(groups)
            for row, error in unsendable:
                self.metrics.dead.labels(code=error.code).inc()
                log.error(
                    "event_dead",
                    id=row.id,
                    aircall_event=row.event,
                    ordering_key=row.ordering_key,
                    code=error.code,
                    reason=str(error),
                )
        runs: dict[str, list[Prepared]] = {}
        for item in prepared:
            runs.setdefault(item.row.ordering_key, []).append(item)
        plan = plan_batches(
            list(runs.values()),
            size_of=encoded_size,
            max_events=self.config.batch_size,
            max_bytes=self.config.max_batch_bytes,
            max_batches=free,
            overhead_bytes=batch_overhead_bytes(),
        )
        if plan.left_over:
            await self.ledger.release([item.row.id for item in plan.left_over])
        for batch in plan.batches:
            handle = self._held.add([item.row.id for item in batch.items])
            self._in_flight += 1
            self._awaiting_answer += 1
            self.metrics.in_flight.set(self._in_flight)
            group.start_soon(self._deliver, handle, batch.items)

    async def _without_second_call_ended(
        self, claimed: Sequence[ClaimedEvent]
    ) -> Sequence[ClaimedEvent]:
        """The claim without the `call.ended` rows whose call has its one already (a back-filled
        row and Aircall's own: docs/architecture.md, "Reconciliation"), which become skipped."""
        ids = [row.id for row in claimed if row.event == "call.ended"]
        if not ids:
            return claimed
        skipped = await self.ledger.skip_second_call_ended(ids)
        if not skipped:
            return claimed
        for row in claimed:
            if row.id in skipped:
                log.info(
                    "call_ended_skipped",
                    id=row.id,
                    ordering_key=row.ordering_key,
                    origin=row.origin,
                    reason=skipped[row.id],
                )
        return [row for row in claimed if row.id not in skipped]

    def _map(
        self, claimed: Sequence[ClaimedEvent]
    ) -> tuple[list[Prepared], list[tuple[ClaimedEvent, UnsendableEvent]]]:
        prepared: list[Prepared] = []
        unsendable: list[tuple[ClaimedEvent, UnsendableEvent]] = []
        for row in claimed:
            event = OutboxEvent(
                message_id=row.message_id,
                resource=row.resource,
                event=row.event,
                resource_id=row.resource_id,
                occurred_at=row.occurred_at,
                payload=row.payload,
                origin=row.origin,
            )
            try:
                prepared.append(Prepared(row, to_track_message(event, self.mapping).encoded))
            except UnsendableEvent as error:
                unsendable.append((row, error))
        return prepared, unsendable

    # -- one batch ---------------------------------------------------------------------------

    async def _deliver(self, handle: int, items: list[Prepared]) -> None:
        settled = False
        try:
            try:
                await self._send(items, slot_reserved=True)
            except Exception as error:
                # The database stayed away past the retries. The rows keep their lease, which is
                # no longer renewed: when it expires they are claimed and sent again (same
                # messageIds).
                log.error(
                    "delivery_failed",
                    rows=len(items),
                    error=f"{type(error).__name__}: {error}"[:300],
                    detail="rows are retried when their lease expires",
                )
            settled = True
        finally:
            # Cancelled (the grace period is over): the batch stays held, and `_run` releases
            # its rows that are still `delivering` under this owner, so they go out again at
            # once (same messageIds) instead of waiting for the lease to expire.
            if settled:
                self._held.batches.pop(handle, None)
            self._in_flight -= 1
            self.metrics.in_flight.set(self._in_flight)
            self._wake.set()

    async def _send(self, items: list[Prepared], slot_reserved: bool = False) -> bool:
        """Send one request; returns True when its rows no longer block their keys (delivered
        or dead), False when they wait for a retry.

        The request holds a slot of the concurrency until its answer; `slot_reserved` when the
        dispatch already counted it (the halves of a split batch count themselves)."""
        assert self.sender is not None
        if not slot_reserved:
            self._awaiting_answer += 1
        try:
            async with self._request_slots():
                if slot_reserved and self._stopping:
                    # Claimed ahead of a slot and not sent before the stop: given back.
                    await self.ledger.release([item.row.id for item in items], announce=True)
                    return False
                await self.pacing.wait_turn(len(items))
                started = self.clock()
                body = encode_batch([item.encoded for item in items], sent_at=started)
                result = await self.sender.post(body)
        finally:
            self._awaiting_answer -= 1
            self._wake.set()
        finished = self.clock()
        self.reachability.note(result, started)
        return await self.verdicts.judge(items, len(body), started, finished, result)

    def _request_slots(self) -> anyio.CapacityLimiter:
        """The limiter of requests in flight, sized to the current concurrency (which 429s
        halve and successes grow back)."""
        if self._slots is None:
            self._slots = anyio.CapacityLimiter(self.concurrency.current)
        elif self._slots.total_tokens != self.concurrency.current:
            self._slots.total_tokens = self.concurrency.current
        return self._slots

    # -- waiting -----------------------------------------------------------------------------

    async def _wait(self, seconds: float) -> None:
        with anyio.move_on_after(seconds):
            await self._wake.wait()

    async def _wake_on(self, stop: anyio.Event) -> None:
        await stop.wait()
        self._wake.set()

    def _wake_now(self) -> None:
        self._wake.set()

    def _idle_poll_seconds(self) -> float:
        """How long an idle drainer waits before it claims again, unless woken. While it hears
        of every commit, only what nothing announces is left to polling (rows another drainer
        released or failed to record, expired leases, requeued rows): a longer interval."""
        if self.notifications is not None and self.notifications.listening:
            return self.config.listen_poll_seconds
        return self.config.poll_seconds

    def _on_commit(self, payload: str = "") -> None:
        if payload.startswith(READY_PREFIX):  # requeued by an operator: deliverable now
            self._wakeups.wake_after(0.0)
        else:  # new rows were committed just now: they become deliverable once settled
            self._wakeups.wake_after(self.config.settle_seconds)

    def _on_listening(self, listening: bool) -> None:
        # Either way, the idle wait under way was chosen for the other state: look now. Rows
        # committed while no one listened were not announced: look again when the newest of
        # them has settled.
        self._wake_now()
        if listening:
            self._wakeups.wake_after(self.config.settle_seconds)
