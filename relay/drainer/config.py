"""The drainer's configuration: what the settings give it (`from_settings`), and the few periods
no setting changes (tests shorten them)."""

from __future__ import annotations

from dataclasses import dataclass

from relay.db.delivery import SendLimits
from relay.segment import MAX_BATCH_BYTES
from relay.settings import Settings

# After a 401, 403, 404 or 405 (a wrong write key or URL), one request is tried again this often.
CONFIGURATION_RETRY_SECONDS = 60.0
# How often calls that got `call.hungup` and no `call.ended` are looked for.
CALL_ENDED_CHECK_SECONDS = 30.0
# Requests to Segment without any answer (refused, reset, timed out) for this long are reported
# once at error level (`segment_unreachable`): a wrong RELAY_SEGMENT_BASE_URL, or the network.
UNREACHABLE_ALERT_SECONDS = 300.0


@dataclass(frozen=True, slots=True)
class DrainerConfig:
    batch_size: int = 100
    max_batch_bytes: int = MAX_BATCH_BYTES
    concurrency: int = 4
    events_per_second: float = 500.0
    requests_per_second: float = 20.0
    settle_seconds: float = 5.0
    lease_seconds: float = 60.0
    poll_seconds: float = 0.25
    listen_poll_seconds: float = 5.0
    retry_base_seconds: float = 1.0
    retry_cap_seconds: float = 600.0
    max_attempts: int = 0
    max_retry_after_seconds: float = 300.0
    call_ended_timeout_seconds: float = 600.0
    shutdown_grace_seconds: float = 10.0
    configuration_retry_seconds: float = CONFIGURATION_RETRY_SECONDS
    call_ended_check_seconds: float = CALL_ENDED_CHECK_SECONDS
    unreachable_alert_seconds: float = UNREACHABLE_ALERT_SECONDS

    @classmethod
    def from_settings(cls, settings: Settings) -> DrainerConfig:
        return cls(
            batch_size=settings.segment_batch_size,
            concurrency=settings.segment_concurrency,
            events_per_second=settings.segment_events_per_second,
            requests_per_second=settings.segment_requests_per_second,
            settle_seconds=settings.settle_seconds,
            lease_seconds=settings.lease_seconds,
            poll_seconds=settings.poll_seconds,
            listen_poll_seconds=settings.listen_poll_seconds,
            retry_base_seconds=settings.retry_base_seconds,
            retry_cap_seconds=settings.retry_cap_seconds,
            max_attempts=settings.max_attempts,
            max_retry_after_seconds=settings.segment_max_retry_after_seconds,
            call_ended_timeout_seconds=settings.call_ended_timeout_seconds,
            shutdown_grace_seconds=settings.shutdown_grace_seconds,
        )

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
