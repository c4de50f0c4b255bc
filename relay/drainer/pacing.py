"""When the drainer may claim and send: not during a pause (after a 429, or a wrong write key or
URL), and each request at its turn in the deployment's budget toward Segment (the `rate_limits`
row every drainer shares, while a limit is on). docs/architecture.md, "The limits toward
Segment", explains the budget.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

import anyio

from relay.db.delivery import SendLimits
from relay.drainer.ledger import Ledger
from relay.drainer.metrics import DrainerMetrics
from relay.drainer.policy import budget_wait


class Pacing:
    def __init__(
        self,
        limits: SendLimits | None,
        ledger: Ledger,
        metrics: DrainerMetrics,
        clock: Callable[[], datetime],
    ) -> None:
        self.limits = limits  # None: both limits off, no budget at all
        self._ledger = ledger
        self._metrics = metrics
        self._clock = clock
        self._rate_limited_until: datetime | None = None
        self._configuration_paused_until: datetime | None = None

    def remaining(self) -> float:
        """Seconds until every pause is over (0: none), with the pause gauges set."""
        now = self._clock()
        remaining = 0.0
        for until, reason in (
            (self._rate_limited_until, "rate_limited"),
            (self._configuration_paused_until, "configuration"),
        ):
            if until is not None and until > now:
                remaining = max(remaining, (until - now).total_seconds())
                self._metrics.paused.labels(reason=reason).set(1)
            else:
                self._metrics.paused.labels(reason=reason).set(0)
        return remaining

    def pause_sending_until(self, until: datetime) -> None:
        """A 429: nothing is claimed or sent before `until` (a pause only ever lengthens)."""
        if self._rate_limited_until is None or until > self._rate_limited_until:
            self._rate_limited_until = until

    def pause_configuration_until(self, until: datetime) -> None:
        """A 401, 403, 404 or 405: nothing is claimed or sent before `until`."""
        self._configuration_paused_until = until
        self._metrics.paused.labels(reason="configuration").set(1)

    async def wait_turn(self, events: int) -> None:
        """Wait for any 429 pause; then, while a limit is on, take this request's share of the
        deployment's budget (`rate_limits`, shared by every drainer) and wait for its turn."""
        pause = self.remaining()
        if pause > 0:
            self._metrics.rate_limit_wait.labels(cause="retry_after").inc(pause)
            await anyio.sleep(pause)
        limits = self.limits
        if limits is None:
            return
        taken = await self._ledger.take_send_budget(limits, events)
        if taken.paused_seconds > 0:
            # A 429 met by another drainer: this one stops claiming as long, too.
            self.pause_sending_until(self._clock() + timedelta(seconds=taken.paused_seconds))
            self._metrics.rate_limit_wait.labels(cause="retry_after").inc(taken.paused_seconds)
        turn = max(
            budget_wait(taken.events_available, limits.events_per_second),
            budget_wait(taken.requests_available, limits.requests_per_second),
        )
        if turn > 0:
            self._metrics.rate_limit_wait.labels(cause="token_bucket").inc(turn)
        # The budget refills only once the pause is over: the turn counts from its end.
        wait = taken.paused_seconds + turn
        if wait > 0:
            await anyio.sleep(wait)
