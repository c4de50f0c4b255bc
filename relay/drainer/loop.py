"""The drainer: claims deliverable outbox rows, maps them, sends them to Segment in batches,
and records what Segment answered. It knows no SQL (that is `DeliveryStore`) and no HTTP details
(that is the sender); the decisions are the pure policies of `policy.py` and `batching.py`.

Life of a request: claim (lease) -> map (unsendable rows go dead at once) -> plan batches (a
key's run stays in one request) -> wait for any 429 pause, and for the request's turn in the
deployment's budget (taken from the database, while a limit is on) -> POST ->
record the request and its rows' fate in one transaction. Leases are renewed while requests are
in flight. On stop (SIGTERM), nothing new is claimed, in-flight requests get the grace period to
finish, and any row still held is released.

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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol, TypeVar

import anyio
import anyio.abc

from relay.db.delivery import (
    ClaimedEvent,
    DeadRows,
    DeliveryStore,
    FinishResult,
    RequestRecord,
    RetryRows,
    SendLimits,
)
from relay.db.notify import READY_PREFIX
from relay.drainer.batching import plan_batches
from relay.drainer.metrics import DrainerMetrics
from relay.drainer.policy import (
    Concurrency,
    Verdict,
    backoff_seconds,
    budget_wait,
    classify,
    retry_after_seconds,
)
from relay.drainer.sender import SendResult
from relay.drainer.wakeups import WakeSchedule
from relay.logs import get_logger
from relay.segment import (
    MAX_BATCH_BYTES,
    MappingOptions,
    OutboxEvent,
    UnsendableEvent,
    batch_overhead_bytes,
    encode_batch,
    to_track_message,
)
from relay.settings import Settings, configure, from_setting

log = get_logger("relay.drainer")

Result = TypeVar("Result")

CONFIGURATION_RETRY_SECONDS = 60.0
# Batches claimed ahead of the request slots, ready to go when one frees.
LOOKAHEAD_BATCHES = 2
CALL_ENDED_CHECK_SECONDS = 30.0
NO_WRITE_KEY_REMINDER_SECONDS = 300.0
# Requests to Segment without any answer (refused, reset, timed out) for this long are reported
# once at error level (`segment_unreachable`): a wrong RELAY_SEGMENT_BASE_URL, or the network.
UNREACHABLE_ALERT_SECONDS = 300.0


_startup_frozen = False


def _freeze_startup_objects() -> None:
    """Move every object alive now (modules, SQLAlchemy's tables and compiled statements, the
    settings) out of the cyclic garbage collector's sight, once per process.

    Each claimed event brings a few dozen short-lived containers (its payload, parsed), which
    survive long enough to be promoted and so trigger full collections every few hundred events;
    each full collection walked every object of the process. Without the long-lived ones it
    walks only the work in hand (in bench/drainer.py, about a quarter less CPU per event).
    Reference counting still frees everything; only cycles among frozen objects are never
    collected, and they are collected once here, first.
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


@dataclass(frozen=True, slots=True)
class DrainerConfig:
    # `from_setting`: fed by that setting, with its default (relay/settings/table.py).
    batch_size: int = from_setting("segment_batch_size")
    max_batch_bytes: int = MAX_BATCH_BYTES
    concurrency: int = from_setting("segment_concurrency")
    events_per_second: float = from_setting("segment_events_per_second")
    requests_per_second: float = from_setting("segment_requests_per_second")
    settle_seconds: float = from_setting("settle_seconds")
    lease_seconds: float = from_setting("lease_seconds")
    poll_seconds: float = from_setting("poll_seconds")
    listen_poll_seconds: float = from_setting("listen_poll_seconds")
    retry_base_seconds: float = from_setting("retry_base_seconds")
    retry_cap_seconds: float = from_setting("retry_cap_seconds")
    max_attempts: int = from_setting("max_attempts")
    max_retry_after_seconds: float = from_setting("segment_max_retry_after_seconds")
    call_ended_timeout_seconds: float = from_setting("call_ended_timeout_seconds")
    shutdown_grace_seconds: float = from_setting("shutdown_grace_seconds")
    configuration_retry_seconds: float = CONFIGURATION_RETRY_SECONDS
    call_ended_check_seconds: float = CALL_ENDED_CHECK_SECONDS
    unreachable_alert_seconds: float = UNREACHABLE_ALERT_SECONDS

    @classmethod
    def from_settings(cls, settings: Settings) -> DrainerConfig:
        return configure(cls, settings)

    def send_limits(self) -> SendLimits | None:
        """The limits toward Segment, for the deployment's budget; None when both are off (then
        a drainer does no accounting at all). The bucket holds at most one request's worth: a
        batch of events, one request. So over any span the deployment sends at most the rate
        times the span plus one batch."""
        if self.events_per_second <= 0 and self.requests_per_second <= 0:
            return None
        return SendLimits(
            events_per_second=self.events_per_second,
            requests_per_second=self.requests_per_second,
            events_burst=float(self.batch_size),
            requests_burst=1.0,
        )


@dataclass
class DrainSummary:
    requests: int = 0
    delivered: int = 0
    late: int = 0
    retried: int = 0
    dead: int = 0
    released: int = 0


@dataclass(frozen=True, slots=True)
class Prepared:
    """A claimed row and its message's bytes. Only the bytes are kept (not the message's dict,
    nor the parsed payload it shares values with): a batch waiting for its answer then holds a
    few objects per event, not hundreds for the garbage collector to walk."""

    row: ClaimedEvent
    encoded: bytes


def _encoded_size(item: Prepared) -> int:
    return len(item.encoded)


@dataclass
class _Held:
    """Rows this drainer holds a lease on, by batch."""

    batches: dict[int, list[int]] = field(default_factory=dict)
    next_batch: int = 0

    def add(self, ids: list[int]) -> int:
        self.next_batch += 1
        self.batches[self.next_batch] = ids
        return self.next_batch

    def all_ids(self) -> list[int]:
        return [row_id for ids in self.batches.values() for row_id in ids]


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
        self.summary = DrainSummary()
        self.concurrency = Concurrency.of(config.concurrency)
        self.lease = timedelta(seconds=config.lease_seconds)
        self._send_limits = config.send_limits()
        self._held = _Held()
        self._in_flight = 0  # batches dispatched and not yet recorded
        self._awaiting_answer = 0  # of those, the ones whose request has no answer yet
        self._slots: anyio.CapacityLimiter | None = None  # requests in flight, <= concurrency
        self._wake = anyio.Event()
        self.notifications = notifications
        self._wakeups = WakeSchedule(self._wake_now)
        self._rate_limited_until: datetime | None = None
        self._configuration_paused_until: datetime | None = None
        self._reported_awaiting: set[str] = set()
        self._unanswered_since: datetime | None = None  # since requests get no answer
        self._unreachable_reported = False
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
            await self._paused_without_write_key(stop, once)
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
                group.start_soon(self._renew_leases_forever)
                group.start_soon(self._watch_calls_awaiting_ended_forever)
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
            pause = self._pause_remaining()
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
                delay = min(0.1 * 2**failures, 5.0)
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
        prepared, unsendable = self._map(claimed)
        if unsendable:
            groups = [DeadRows(ids=[row.id], reason=str(error)) for row, error in unsendable]
            self.summary.dead += await self._retrying(
                "mark_dead", lambda: self.store.mark_dead_unsent(self.owner, groups)
            )
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
            size_of=_encoded_size,
            max_events=self.config.batch_size,
            max_bytes=self.config.max_batch_bytes,
            max_batches=free,
            overhead_bytes=batch_overhead_bytes(),
        )
        if plan.left_over:
            self.summary.released += await self._release([item.row.id for item in plan.left_over])
        for batch in plan.batches:
            handle = self._held.add([item.row.id for item in batch.items])
            self._in_flight += 1
            self._awaiting_answer += 1
            self.metrics.in_flight.set(self._in_flight)
            group.start_soon(self._deliver, handle, batch.items)

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
                    ids = [item.row.id for item in items]
                    self.summary.released += await self._release(ids, announce=True)
                    return False
                await self._respect_rate_limits(len(items))
                started = self.clock()
                body = encode_batch([item.encoded for item in items], sent_at=started)
                result = await self.sender.post(body)
        finally:
            self._awaiting_answer -= 1
            self._wake.set()
        finished = self.clock()
        self._note_answer(result, started)
        verdict = classify(result.status)
        self.summary.requests += 1
        self.metrics.requests.labels(
            status=str(result.status or "none"), verdict=verdict.value
        ).inc()
        ids = [item.row.id for item in items]
        record = RequestRecord(
            id=RequestRecord.new_id(),
            started_at=started,
            finished_at=finished,
            event_count=len(items),
            body_bytes=len(body),
            outbox_ids=ids,
            http_status=result.status,
            outcome=verdict.value,
            error=result.error or (result.answer if verdict is not Verdict.DELIVERED else None),
        )
        fields = {
            "request_id": record.id,
            "events": len(items),
            "bytes": len(body),
            "status": result.status,
            "verdict": verdict.value,
            "ms": round(result.seconds * 1000, 1),
        }
        if result.status is None:  # no answer: say where it went (a wrong URL shows here)
            fields["segment_base_url"] = self.sender.base_url

        if verdict is Verdict.DELIVERED:
            outcome = await self._finish(record, delivered=ids)
            self.concurrency.on_success()
            self._account(outcome)
            for item in items:
                self.metrics.latency.observe((finished - item.row.received_at).total_seconds())
            log.info("segment_request", delivered=outcome.delivered, late=outcome.late, **fields)
            return True

        if verdict is Verdict.REJECTED:
            return await self._rejected(items, record, result, fields)

        if verdict is Verdict.RATE_LIMITED:
            wait = retry_after_seconds(
                result.headers,
                finished,
                default_seconds=self.config.retry_base_seconds,
                cap_seconds=self.config.max_retry_after_seconds,
            )
            until = finished + timedelta(seconds=wait)
            self._pause_sending_until(until)
            self.concurrency.on_rate_limited()
            self.metrics.rate_limited.inc()
            error = f"429 from Segment: waiting {wait:.1f} s for all sending"
            outcome = await self._finish(
                record,
                retry=RetryRows(
                    ids=ids, after=timedelta(seconds=wait), error=error, failed_attempt=False
                ),
                # Segment limits the source, not this drainer: while a limit is on, the
                # deployment's budget pauses every drainer as long.
                pause_seconds=None if self._send_limits is None else wait,
            )
            self._account(outcome)
            log.warning(
                "segment_request",
                retry_in_s=round(wait, 2),
                concurrency=self.concurrency.current,
                **fields,
            )
            return False

        if verdict is Verdict.CONFIGURATION:
            pause = timedelta(seconds=self.config.configuration_retry_seconds)
            self._configuration_paused_until = finished + pause
            self.metrics.paused.labels(reason="configuration").set(1)
            error = (
                f"Segment answered {result.status}: check RELAY_SEGMENT_WRITE_KEY and "
                "RELAY_SEGMENT_BASE_URL; delivery paused, rows kept"
            )
            retry = RetryRows(ids=ids, after=pause, error=error, failed_attempt=False)
            outcome = await self._finish(record, retry=retry)
            self._account(outcome)
            log.error(
                "delivery_paused",
                reason="configuration",
                detail=error,
                retry_in_s=self.config.configuration_retry_seconds,
                **fields,
            )
            return False

        # Transient: no answer, 5xx, or an unexpected status.
        return await self._transient(items, record, result, fields)

    async def _transient(
        self,
        items: list[Prepared],
        record: RequestRecord,
        result: SendResult,
        fields: dict[str, object],
    ) -> bool:
        ids = [item.row.id for item in items]
        attempt = max(item.row.attempts for item in items) + 1
        error = result.error or f"Segment answered {result.status}: {result.answer}".strip()
        if self.config.max_attempts and attempt >= self.config.max_attempts:
            reason = f"gave up after {attempt} attempts (RELAY_MAX_ATTEMPTS): {error}"
            outcome = await self._finish(record, dead=[DeadRows(ids=ids, reason=reason)])
            self._account(outcome)
            self.metrics.dead.labels(code="max_attempts").inc(outcome.dead)
            log.error("segment_request", dead=outcome.dead, reason=reason, **fields)
            return True
        delay = backoff_seconds(
            attempt, self.config.retry_base_seconds, self.config.retry_cap_seconds, self.random
        )
        outcome = await self._finish(
            record, retry=RetryRows(ids=ids, after=timedelta(seconds=delay), error=error)
        )
        self._account(outcome)
        log.warning(
            "segment_request", attempt=attempt, retry_in_s=round(delay, 2), error=error, **fields
        )
        return False

    async def _rejected(
        self,
        items: list[Prepared],
        record: RequestRecord,
        result: SendResult,
        fields: dict[str, object],
    ) -> bool:
        """400/413: one bad message spoils the batch. Split it in halves, sent one after the
        other (so each key's order holds), until the bad message is alone; it goes dead with
        Segment's answer, the others are delivered."""
        ids = [item.row.id for item in items]
        if len(items) == 1:
            reason = f"Segment refused the message with {result.status}: {result.answer}".strip()
            outcome = await self._finish(record, dead=[DeadRows(ids=ids, reason=reason)])
            self._account(outcome)
            self.metrics.dead.labels(code=f"http_{result.status}").inc(outcome.dead)
            log.error("segment_request", dead=outcome.dead, reason=reason, **fields)
            return True
        await self._finish(record)
        log.warning("segment_request", split=True, **fields)
        middle = len(items) // 2
        halves = [items[:middle], items[middle:]]
        for position, half in enumerate(halves):
            if not await self._send(half):
                # An earlier half waits for a retry: the later one must not overtake it.
                rest = [item.row.id for later in halves[position + 1 :] for item in later]
                self.summary.released += await self._release(rest)
                return False
        return True

    def _note_answer(self, result: SendResult, started: datetime) -> None:
        """Once requests have had no answer for `unreachable_alert_seconds`, say so at error
        level, once; an answer ends the outage (logged), and a later one is reported again."""
        assert self.sender is not None
        if result.status is not None:
            if self._unreachable_reported:
                log.info("segment_reachable", segment_base_url=self.sender.base_url)
            self._unanswered_since = None
            self._unreachable_reported = False
            return
        if self._unanswered_since is None:
            self._unanswered_since = started
        failing = (self.clock() - self._unanswered_since).total_seconds()
        if not self._unreachable_reported and failing >= self.config.unreachable_alert_seconds:
            self._unreachable_reported = True
            log.error(
                "segment_unreachable",
                segment_base_url=self.sender.base_url,
                since=self._unanswered_since.isoformat(),
                failing_s=round(failing, 1),
                error=result.error,
                detail="no answer from Segment: check RELAY_SEGMENT_BASE_URL and the network; "
                "rows are kept and retried",
            )

    # -- database writes, retried -----------------------------------------------------------

    async def _retrying(self, operation: str, call: Callable[[], Awaitable[Result]]) -> Result:
        """Run a store write, retrying transient database errors (a locked SQLite file, a
        PostgreSQL restart) for up to half a lease; past that the error propagates and the rows
        wait for their lease to expire, to be claimed again (re-sends keep their messageId)."""
        deadline = anyio.current_time() + max(self.config.lease_seconds / 2, 1.0)
        delay = 0.05
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
                delay = min(delay * 2, 2.0)

    async def _finish(
        self,
        record: RequestRecord,
        delivered: Sequence[int] = (),
        retry: RetryRows | None = None,
        dead: Sequence[DeadRows] = (),
        pause_seconds: float | None = None,
    ) -> FinishResult:
        outcome = await self._retrying(
            "finish",
            lambda: self.store.finish(
                self.owner,
                record,
                delivered=delivered,
                retry=retry,
                dead=dead,
                pause_seconds=pause_seconds,
            ),
        )
        if retry is not None:  # look again when they fall due, whatever the poll interval
            self._wakeups.wake_after(retry.after.total_seconds())
        return outcome

    async def _release(self, ids: Sequence[int], announce: bool = False) -> int:
        return await self._retrying(
            "release", lambda: self.store.release(self.owner, ids, announce=announce)
        )

    def _request_slots(self) -> anyio.CapacityLimiter:
        """The limiter of requests in flight, sized to the current concurrency (which 429s
        halve and successes grow back)."""
        if self._slots is None:
            self._slots = anyio.CapacityLimiter(self.concurrency.current)
        elif self._slots.total_tokens != self.concurrency.current:
            self._slots.total_tokens = self.concurrency.current
        return self._slots

    def _account(self, outcome: FinishResult) -> None:
        self.summary.delivered += outcome.delivered
        self.summary.late += outcome.late
        self.summary.retried += outcome.retried
        self.summary.dead += outcome.dead
        self.metrics.delivered.inc(outcome.delivered)
        self.metrics.late.inc(outcome.late)
        self.metrics.retried.inc(outcome.retried)
        if outcome.lost_lease:
            log.warning("lease_lost", rows=outcome.lost_lease, owner=self.owner)

    # -- waiting -----------------------------------------------------------------------------

    def _pause_remaining(self) -> float:
        now = self.clock()
        remaining = 0.0
        for until, reason in (
            (self._rate_limited_until, "rate_limited"),
            (self._configuration_paused_until, "configuration"),
        ):
            if until is not None and until > now:
                remaining = max(remaining, (until - now).total_seconds())
                self.metrics.paused.labels(reason=reason).set(1)
            else:
                self.metrics.paused.labels(reason=reason).set(0)
        return remaining

    async def _respect_rate_limits(self, events: int) -> None:
        """Wait for any 429 pause; then, while a limit is on, take this request's share of the
        deployment's budget (`rate_limits`, shared by every drainer) and wait for its turn."""
        pause = self._pause_remaining()
        if pause > 0:
            self.metrics.rate_limit_wait.labels(cause="retry_after").inc(pause)
            await anyio.sleep(pause)
        limits = self._send_limits
        if limits is None:
            return
        taken = await self._retrying(
            "take_send_budget", lambda: self.store.take_send_budget(limits, events)
        )
        if taken.paused_seconds > 0:
            # A 429 met by another drainer: this one stops claiming as long, too.
            self._pause_sending_until(self.clock() + timedelta(seconds=taken.paused_seconds))
            self.metrics.rate_limit_wait.labels(cause="retry_after").inc(taken.paused_seconds)
        turn = max(
            budget_wait(taken.events_available, limits.events_per_second),
            budget_wait(taken.requests_available, limits.requests_per_second),
        )
        if turn > 0:
            self.metrics.rate_limit_wait.labels(cause="token_bucket").inc(turn)
        # The budget refills only once the pause is over: the turn counts from its end.
        wait = taken.paused_seconds + turn
        if wait > 0:
            await anyio.sleep(wait)

    def _pause_sending_until(self, until: datetime) -> None:
        if self._rate_limited_until is None or until > self._rate_limited_until:
            self._rate_limited_until = until

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

    # -- background duties -------------------------------------------------------------------

    async def _renew_leases_forever(self) -> None:
        period = self.config.lease_seconds / 3
        while True:
            await anyio.sleep(period)
            held = self._held.all_ids()
            if not held:
                continue
            try:
                still = await self.store.renew(self.owner, held, self.clock(), self.lease)
            except Exception as error:  # the database may be briefly away; try next period
                log.warning("lease_renewal_failed", error=f"{type(error).__name__}: {error}")
                continue
            # Rows recorded while the renewal waited for the database are no longer held, and
            # were not renewed: they are not lost.
            now_held = set(self._held.all_ids())
            expected = sum(1 for row_id in held if row_id in now_held)
            if still < expected:
                log.warning("lease_lost", rows=expected - still, owner=self.owner)

    async def _watch_calls_awaiting_ended_forever(self) -> None:
        while True:
            try:
                # A stop waits for a check under way (its query is not abandoned: see
                # `relay.db.engine.not_abandoned`).
                await self.check_calls_awaiting_ended()
            except Exception as error:
                log.warning("call_ended_check_failed", error=f"{type(error).__name__}: {error}")
            await anyio.sleep(self.config.call_ended_check_seconds)

    async def check_calls_awaiting_ended(self) -> list[str]:
        """Log each call newly found waiting for `call.ended` past the timeout; set the gauge."""
        cutoff = self.clock() - timedelta(seconds=self.config.call_ended_timeout_seconds)
        awaiting = await self.store.calls_awaiting_ended(cutoff)
        keys = {call.ordering_key for call in awaiting}
        self.metrics.awaiting_call_ended.set(len(keys))
        for call in awaiting:
            if call.ordering_key not in self._reported_awaiting:
                log.warning(
                    "call_ended_missing",
                    ordering_key=call.ordering_key,
                    hungup_received_at=call.hungup_received_at.isoformat(),
                    timeout_s=self.config.call_ended_timeout_seconds,
                    detail="call.hungup received but no call.ended: a webhook to chase while "
                    "Aircall still retries (up to 12 h)",
                )
        self._reported_awaiting = keys
        return sorted(keys)

    async def _paused_without_write_key(self, stop: anyio.Event, once: bool) -> None:
        self.metrics.paused.labels(reason="no_write_key").set(1)
        while True:
            backlog = await self.store.backlog()
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
