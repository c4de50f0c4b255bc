"""What Segment's answer to a request does to its rows, one method per verdict of
`policy.classify`: the request recorded in `delivery_requests`, its rows delivered, retried,
dead, or split and sent again, the pauses and the concurrency adjusted, and one
`segment_request` log line. docs/architecture.md, "What each answer from Segment does", has the
table. How long a retry waits, and when a row is given up, is `policy.py`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from relay.db.delivery import RequestRecord, RetryRows
from relay.drainer.batching import Prepared
from relay.drainer.config import DrainerConfig
from relay.drainer.ledger import Ledger
from relay.drainer.metrics import DrainerMetrics
from relay.drainer.pacing import Pacing
from relay.drainer.policy import (
    Concurrency,
    Verdict,
    backoff_seconds,
    classify,
    out_of_attempts,
    retry_after_seconds,
)
from relay.drainer.sender import SendResult
from relay.logs import get_logger

log = get_logger("relay.drainer")


@dataclass(frozen=True, slots=True)
class Answered:
    """A request and what came of it: its rows, its record, Segment's answer, its log fields."""

    items: list[Prepared]
    record: RequestRecord
    result: SendResult
    fields: dict[str, object]


@dataclass
class Verdicts:
    config: DrainerConfig
    ledger: Ledger
    pacing: Pacing
    concurrency: Concurrency
    metrics: DrainerMetrics
    random: Callable[[], float]
    base_url: str  # where requests go, for the logs
    resend: Callable[[list[Prepared]], Awaitable[bool]]  # a half of a split batch, on its own
    # The method for each verdict, bound once rather than for every request.
    _handlers: dict[Verdict, Callable[[Answered], Awaitable[bool]]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._handlers = {
            Verdict.DELIVERED: self._delivered,
            Verdict.REJECTED: self._rejected,
            Verdict.RATE_LIMITED: self._rate_limited,
            Verdict.CONFIGURATION: self._configuration,
            Verdict.RETRY: self._transient,
        }

    async def judge(
        self,
        items: list[Prepared],
        body_bytes: int,
        started: datetime,
        finished: datetime,
        result: SendResult,
    ) -> bool:
        """Record the request and act on its verdict; returns True when its rows no longer block
        their keys (delivered or dead), False when they wait for a retry."""
        verdict = classify(result.status)
        self.ledger.summary.requests += 1
        self.metrics.requests.labels(
            status=str(result.status or "none"), verdict=verdict.value
        ).inc()
        record = RequestRecord(
            id=RequestRecord.new_id(),
            started_at=started,
            finished_at=finished,
            event_count=len(items),
            body_bytes=body_bytes,
            outbox_ids=[item.row.id for item in items],
            http_status=result.status,
            outcome=verdict.value,
            error=result.error or (result.answer if verdict is not Verdict.DELIVERED else None),
        )
        fields: dict[str, object] = {
            "request_id": record.id,
            "events": len(items),
            "bytes": body_bytes,
            "status": result.status,
            "verdict": verdict.value,
            "ms": round(result.seconds * 1000, 1),
        }
        if result.status is None:  # no answer: say where it went (a wrong URL shows here)
            fields["segment_base_url"] = self.base_url
        return await self._handlers[verdict](Answered(items, record, result, fields))

    async def _delivered(self, answered: Answered) -> bool:
        record = answered.record
        outcome = await self.ledger.record_delivered(record)
        self.concurrency.on_success()
        for item in answered.items:
            self.metrics.latency.observe(
                (record.finished_at - item.row.received_at).total_seconds()
            )
        log.info(
            "segment_request", delivered=outcome.delivered, late=outcome.late, **answered.fields
        )
        return True

    async def _rejected(self, answered: Answered) -> bool:
        """400/413/422: one bad message spoils the batch. Split it in halves, sent one after the
        other (so each key's order holds), until the bad message is alone; it goes dead with
        Segment's answer, the others are delivered."""
        items, result = answered.items, answered.result
        if len(items) == 1:
            reason = f"Segment refused the message with {result.status}: {result.answer}".strip()
            return await self._dead(answered, reason, code=f"http_{result.status}")
        await self.ledger.record_split(answered.record)
        log.warning("segment_request", split=True, **answered.fields)
        middle = len(items) // 2
        halves = [items[:middle], items[middle:]]
        for position, half in enumerate(halves):
            if not await self.resend(half):
                # An earlier half waits for a retry: the later one must not overtake it.
                rest = [item.row.id for later in halves[position + 1 :] for item in later]
                await self.ledger.release(rest)
                return False
        return True

    async def _rate_limited(self, answered: Answered) -> bool:
        """429: every request waits (Retry-After), and fewer go at once."""
        record = answered.record
        wait = retry_after_seconds(
            answered.result.headers,
            record.finished_at,
            default_seconds=self.config.retry_base_seconds,
            cap_seconds=self.config.max_retry_after_seconds,
        )
        self.pacing.pause_sending_until(record.finished_at + timedelta(seconds=wait))
        self.concurrency.on_rate_limited()
        self.metrics.rate_limited.inc()
        error = f"429 from Segment: waiting {wait:.1f} s for all sending"
        await self.ledger.record_retry(
            record,
            RetryRows(
                ids=record.outbox_ids,
                after=timedelta(seconds=wait),
                error=error,
                failed_attempt=False,
            ),
            # Segment limits the source, not this drainer: while a limit is on, the
            # deployment's budget pauses every drainer as long.
            pause_seconds=None if self.pacing.limits is None else wait,
        )
        log.warning(
            "segment_request",
            retry_in_s=round(wait, 2),
            concurrency=self.concurrency.current,
            **answered.fields,
        )
        return False

    async def _configuration(self, answered: Answered) -> bool:
        """401/403/404/405: the write key or the URL is wrong, not the rows. Delivery pauses,
        and the rows wait, their attempts not counted."""
        record = answered.record
        pause = timedelta(seconds=self.config.configuration_retry_seconds)
        self.pacing.pause_configuration_until(record.finished_at + pause)
        error = (
            f"Segment answered {answered.result.status}: check RELAY_SEGMENT_WRITE_KEY and "
            "RELAY_SEGMENT_BASE_URL; delivery paused, rows kept"
        )
        retry = RetryRows(ids=record.outbox_ids, after=pause, error=error, failed_attempt=False)
        await self.ledger.record_retry(record, retry)
        log.error(
            "delivery_paused",
            reason="configuration",
            detail=error,
            retry_in_s=self.config.configuration_retry_seconds,
            **answered.fields,
        )
        return False

    async def _transient(self, answered: Answered) -> bool:
        """No answer, 5xx, or an unexpected status: a failed delivery, counted in `attempts`,
        retried after a backoff, dead past RELAY_MAX_ATTEMPTS."""
        result = answered.result
        attempt = max(item.row.attempts for item in answered.items) + 1
        error = result.error or f"Segment answered {result.status}: {result.answer}".strip()
        if out_of_attempts(attempt, self.config.max_attempts):
            reason = f"gave up after {attempt} attempts (RELAY_MAX_ATTEMPTS): {error}"
            return await self._dead(answered, reason, code="max_attempts")
        delay = backoff_seconds(
            attempt, self.config.retry_base_seconds, self.config.retry_cap_seconds, self.random
        )
        after = timedelta(seconds=delay)
        retry = RetryRows(ids=answered.record.outbox_ids, after=after, error=error)
        await self.ledger.record_retry(answered.record, retry)
        log.warning(
            "segment_request",
            attempt=attempt,
            retry_in_s=round(delay, 2),
            error=error,
            **answered.fields,
        )
        return False

    async def _dead(self, answered: Answered, reason: str, code: str) -> bool:
        outcome = await self.ledger.record_dead(answered.record, reason)
        self.metrics.dead.labels(code=code).inc(outcome.dead)
        log.error("segment_request", dead=outcome.dead, reason=reason, **answered.fields)
        return True
