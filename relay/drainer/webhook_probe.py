"""The drainer's watch on Aircall's side: every `RELAY_AIRCALL_PROBE_SECONDS` it lists the
company's webhooks through the Public API and sets `relay_aircall_webhook_active{label}` (1 when
an active webhook carries that label's token, 0 when none does), with a warning when a label's
state changes (and at the first probe when it is 0).

Aircall disables a webhook after repeated failed deliveries and then sends nothing more, so a
relay that was down (or its proxy, or its DNS) looks healthy while events are lost: this makes
it visible. A probe that fails (the API away, refusing the credentials, answering garbage) is
logged (`aircall_probe_failed`) and counted (`relay_aircall_probe_failures_total`), keeps the
last states, and is tried again at the next period. It runs as a task of its own and waits only
on its own requests, so it never stops or slows delivery.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio

from relay.aircall_api import AircallApiError, AircallAuthError
from relay.aircall_api.webhooks import webhook_health
from relay.drainer.metrics import DrainerMetrics
from relay.logs import get_logger
from relay.settings import AircallToken

log = get_logger("relay.drainer")

PROBE_FAILURE_REASONS = ("credentials", "api", "error")


class WebhookSource(Protocol):
    """What the probe asks: `AircallApi.webhooks`."""

    async def webhooks(self) -> list[dict[str, Any]]: ...


@dataclass
class WebhookProbe:
    source: WebhookSource
    tokens: Sequence[AircallToken]
    forwarded: frozenset[str] | None
    metrics: DrainerMetrics
    period_seconds: float
    _states: dict[str, bool] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        # Each reason exported at 0 from the start, so that a rate over it has data and the
        # first failure is an increase.
        for reason in PROBE_FAILURE_REASONS:
            self.metrics.aircall_probe_failures.labels(reason=reason)

    async def run_forever(self) -> None:
        while True:
            try:
                await self.check()
            except Exception as error:
                reason = (
                    "credentials"
                    if isinstance(error, AircallAuthError)
                    else "api"
                    if isinstance(error, AircallApiError)
                    else "error"
                )
                self.metrics.aircall_probe_failures.labels(reason=reason).inc()
                log.warning(
                    "aircall_probe_failed",
                    error=f"{type(error).__name__}: {error}"[:500],
                    retry_in_s=self.period_seconds,
                    detail="the webhooks' states are those of the last probe that worked; "
                    "delivery goes on",
                )
            await anyio.sleep(self.period_seconds)

    async def check(self) -> dict[str, bool]:
        """Probe once: each configured label, whether an active webhook carries its token."""
        health = webhook_health(await self.source.webhooks(), self.tokens, self.forwarded)
        states = health.active_by_label()
        for label, active in states.items():
            self.metrics.aircall_webhook_active.labels(label=label).set(1 if active else 0)
            before = self._states.get(label)
            if before == active or (before is None and active):
                continue
            matched = [hook for hook in health.webhooks if hook.label == label]
            if active:
                log.warning(
                    "aircall_webhook_active",
                    label=label,
                    webhooks=[hook.webhook_id for hook in matched if hook.active],
                    detail="Aircall sends this label's webhooks again",
                )
            else:
                log.warning(
                    "aircall_webhook_inactive",
                    label=label,
                    webhooks=[hook.webhook_id for hook in matched],
                    detail="Aircall sends no webhook with this label's token: "
                    + (
                        "its webhook is disabled; run `aircall-relay aircall webhooks "
                        "--reactivate`, then reconcile the time it was off"
                        if matched
                        else "no webhook carries it; check RELAY_AIRCALL_TOKENS"
                    ),
                )
        self._states = states
        return states
