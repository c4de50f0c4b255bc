"""The drainer's configuration: what the settings give it (`from_settings`), and the few periods
no setting changes (tests shorten them)."""

from __future__ import annotations

from dataclasses import dataclass

from relay.db.delivery import SendLimits
from relay.segment import MAX_BATCH_BYTES
from relay.settings import Settings, configure, from_setting

# After a 401, 403, 404 or 405 (a wrong write key or URL), one request is tried again this often.
CONFIGURATION_RETRY_SECONDS = 60.0
# How often calls that got `call.hungup` and no `call.ended` are looked for.
CALL_ENDED_CHECK_SECONDS = 30.0
# Requests to Segment without any answer (refused, reset, timed out) for this long are reported
# once at error level (`segment_unreachable`): a wrong RELAY_SEGMENT_BASE_URL, or the network.
UNREACHABLE_ALERT_SECONDS = 300.0


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
