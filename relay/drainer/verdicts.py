"""What Segment's answer to a request does to its rows, one method per verdict of
`policy.classify`: the request recorded in `delivery_requests`, its rows delivered, retried,
dead, or split and sent again, the pauses and the concurrency adjusted, and one `segment_request`
log line. docs/architecture.md, "What Segment's answers do", has the table. How long a retry
waits, and when a row is given up, is `policy.py`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from relay.db.delivery import DeadRows, RequestRecord, RetryRows
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


class Verdicts:
    def __init__(
        self,
        config: DrainerConfig,
        ledger: Ledger,
        pacing: Pacing,
        concurrency: Concurrency,
        metrics: DrainerMetrics,
        random: Callable[[], float],
        base_url: str,
        resend: Callable[[list[Prepared]], Awaitable[bool]],
    ) -> None:
        self._config = config
        self._ledger = ledger
        self._pacing = pacing
        self._concurrency = concurrency
        self._metrics = metrics
        self._random = random
        self._base_url = base_url
        self._resend = resend  # sends a half of a split batch, as a request of its own

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
        self._ledger.summary.requests += 1
        self._metrics.requests.labels(
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
            fields["segment_base_url"] = self._base_url
        if verdict is Verdict.DELIVERED:
            return await self._delivered(items, record, fields)
        if verdict is Verdict.REJECTED:
            return await self._rejected(items, record, result, fields)
        if verdict is Verdict.RATE_LIMITED:
            return await self._rate_limited(record, result, fields)
        if verdict is Verdict.CONFIGURATION:
            return await self._configuration(record, result, fields)
        # Transient: no answer, 5xx, or an unexpected status.
        return await self._transient(items, record, result, fields)

    async def _delivered(
        self, items: list[Prepared], record: RequestRecord, fields: dict[str, object]
    ) -> bool:
        outcome = await self._ledger.finish(record, delivered=record.outbox_ids)
        self._concurrency.on_success()
        for item in items:
            self._metrics.latency.observe(
                (record.finished_at - item.row.received_at).total_seconds()
            )
        log.info("segment_request", delivered=outcome.delivered, late=outcome.late, **fields)
        return True

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
        if len(items) == 1:
            reason = f"Segment refused the message with {result.status}: {result.answer}".strip()
            return await self._dead(record, reason, f"http_{result.status}", fields)
        await self._ledger.finish(record)
        log.warning("segment_request", split=True, **fields)
        middle = len(items) // 2
        halves = [items[:middle], items[middle:]]
        for position, half in enumerate(halves):
            if not await self._resend(half):
                # An earlier half waits for a retry: the later one must not overtake it.
                rest = [item.row.id for later in halves[position + 1 :] for item in later]
                await self._ledger.release(rest)
                return False
        return True

    async def _rate_limited(
        self, record: RequestRecord, result: SendResult, fields: dict[str, object]
    ) -> bool:
        """429: every request waits (Retry-After), and fewer go at once."""
        finished = record.finished_at
        wait = retry_after_seconds(
            result.headers,
            finished,
            default_seconds=self._config.retry_base_seconds,
            cap_seconds=self._config.max_retry_after_seconds,
        )
        self._pacing.pause_sending_until(finished + timedelta(seconds=wait))
        self._concurrency.on_rate_limited()
        self._metrics.rate_limited.inc()
        error = f"429 from Segment: waiting {wait:.1f} s for all sending"
        await self._ledger.finish(
            record,
            retry=RetryRows(
                ids=record.outbox_ids,
                after=timedelta(seconds=wait),
                error=error,
                failed_attempt=False,
            ),
            # Segment limits the source, not this drainer: while a limit is on, the
            # deployment's budget pauses every drainer as long.
            pause_seconds=None if self._pacing.limits is None else wait,
        )
        log.warning(
            "segment_request",
            retry_in_s=round(wait, 2),
            concurrency=self._concurrency.current,
            **fields,
        )
        return False

    async def _configuration(
        self, record: RequestRecord, result: SendResult, fields: dict[str, object]
    ) -> bool:
        """401/403/404/405: the write key or the URL is wrong, not the rows. Delivery pauses,
        and the rows wait, uncounted."""
        pause = timedelta(seconds=self._config.configuration_retry_seconds)
        self._pacing.pause_configuration_until(record.finished_at + pause)
        error = (
            f"Segment answered {result.status}: check RELAY_SEGMENT_WRITE_KEY and "
            "RELAY_SEGMENT_BASE_URL; delivery paused, rows kept"
        )
        retry = RetryRows(ids=record.outbox_ids, after=pause, error=error, failed_attempt=False)
        await self._ledger.finish(record, retry=retry)
        log.error(
            "delivery_paused",
            reason="configuration",
            detail=error,
            retry_in_s=self._config.configuration_retry_seconds,
            **fields,
        )
        return False

    async def _transient(
        self,
        items: list[Prepared],
        record: RequestRecord,
        result: SendResult,
        fields: dict[str, object],
    ) -> bool:
        """A failed delivery: retried after a backoff, counted in `attempts`, dead past
        RELAY_MAX_ATTEMPTS."""
        attempt = max(item.row.attempts for item in items) + 1
        error = result.error or f"Segment answered {result.status}: {result.answer}".strip()
        if out_of_attempts(attempt, self._config.max_attempts):
            reason = f"gave up after {attempt} attempts (RELAY_MAX_ATTEMPTS): {error}"
            return await self._dead(record, reason, "max_attempts", fields)
        delay = backoff_seconds(
            attempt, self._config.retry_base_seconds, self._config.retry_cap_seconds, self._random
        )
        retry = RetryRows(ids=record.outbox_ids, after=timedelta(seconds=delay), error=error)
        await self._ledger.finish(record, retry=retry)
        log.warning(
            "segment_request", attempt=attempt, retry_in_s=round(delay, 2), error=error, **fields
        )
        return False

    async def _dead(
        self, record: RequestRecord, reason: str, code: str, fields: dict[str, object]
    ) -> bool:
        outcome = await self._ledger.finish(
            record, dead=[DeadRows(ids=record.outbox_ids, reason=reason)]
        )
        self._metrics.dead.labels(code=code).inc(outcome.dead)
        log.error("segment_request", dead=outcome.dead, reason=reason, **fields)
        return True
