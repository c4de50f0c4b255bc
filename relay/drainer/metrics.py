"""The drainer's Prometheus metrics, in a registry of its own.

The outbox's state (rows by status, the oldest pending age, calls awaiting `call.ended`) is the
receiver's to export: it reads it from the database at each scrape (`relay/db/gauges.py`), the
same whichever process asks, so the drainer exports none of it.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# What the drainer waits on before a request (`relay_rate_limit_wait_seconds_total{cause}`): a
# 429's Retry-After (its own, or another drainer's through the shared budget), or its turn in the
# token buckets.
RATE_LIMIT_WAIT_CAUSES = ("retry_after", "token_bucket")


class DrainerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "relay_segment_requests",
            "HTTP requests to Segment, by HTTP status (`none`: no answer) and verdict.",
            ["status", "verdict"],
            registry=registry,
        )
        self.delivered = Counter(
            "relay_events_delivered", "Events Segment accepted.", registry=registry
        )
        self.late = Counter(
            "relay_events_late",
            "Events delivered after a later event of their key had been delivered.",
            registry=registry,
        )
        self.dead = Counter(
            "relay_events_dead",
            "Events that went dead, by reason code.",
            ["code"],
            registry=registry,
        )
        self.retried = Counter(
            "relay_events_retried", "Events put back for a later attempt.", registry=registry
        )
        self.latency = Histogram(
            "relay_receipt_to_delivery_seconds",
            "From receipt of the webhook to Segment's 200 for its event.",
            buckets=(1, 2.5, 5, 6, 7.5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600),
            registry=registry,
        )
        self.rate_limit_wait = Counter(
            "relay_rate_limit_wait_seconds",
            "Time spent waiting on the token buckets or on a 429's Retry-After, by cause.",
            ["cause"],
            registry=registry,
        )
        # Exported at 0 from the start, so that the dashboard's panel shows data before the first
        # wait and `rate()` counts that first wait (a series born at its first value hides it).
        for cause in RATE_LIMIT_WAIT_CAUSES:
            self.rate_limit_wait.labels(cause=cause)
        self.rate_limited = Counter(
            "relay_segment_rate_limited", "429 answers from Segment.", registry=registry
        )
        self.paused = Gauge(
            "relay_delivery_paused",
            "1 while delivery is paused, by reason (no_write_key, configuration, rate_limited).",
            ["reason"],
            registry=registry,
        )
        self.aircall_webhook_active = Gauge(
            "relay_aircall_webhook_active",
            "1 when an active Aircall webhook carries the label's token, 0 when none does, as of "
            "the last probe of Aircall's Public API (RELAY_AIRCALL_PROBE_SECONDS).",
            ["label"],
            registry=registry,
        )
        self.aircall_probe_failures = Counter(
            "relay_aircall_probe_failures",
            "Probes of Aircall's webhooks that failed, by reason (credentials, api, error).",
            ["reason"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "relay_segment_requests_in_flight", "Requests to Segment in flight.", registry=registry
        )

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
