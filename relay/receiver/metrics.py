"""The receiver's Prometheus metrics, in a registry of its own (one per app, so tests are isolated).

Besides the webhook counters, the registry holds the outbox gauges (`OutboxCollector`), which the
`/metrics` route refreshes from the database before each render; in `run` the drainer's registry
is rendered after this one (`include`).

Event names are labels only for events Aircall is known to send; anything else is counted as
`other`, so a stream of invented event names cannot blow up the number of series.

With several workers (`RELAY_WORKERS`), each a process of its own, a scrape reaches one of them:
`serve` then runs them in prometheus-client's multiprocess mode (`PROMETHEUS_MULTIPROC_DIR`, set
before they start, so that their counters and histograms live in shared files), and `render`
sums every worker's values, so the counters seen do not depend on which worker answers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import datetime
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from relay.aircall import KNOWN_EVENTS
from relay.db.gauges import GAUGE_STATUSES, OutboxGauges

# prometheus-client's own variable: read when it is imported, so set before a worker starts.
MULTIPROCESS_METRICS_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"


class OutboxCollector(Collector):
    """The outbox gauges, as last read from the database (`update`, at each scrape).

    `relay_outbox_up` says whether that read worked; when it did not, the other gauges are left
    out rather than shown stale, so that Prometheus marks them absent.
    """

    def __init__(self) -> None:
        self._gauges: OutboxGauges | None = None
        self._read_at: datetime | None = None

    def update(self, gauges: OutboxGauges | None, now: datetime) -> None:
        self._gauges, self._read_at = gauges, now

    def describe(self) -> Iterator[Metric]:
        return iter(self._families(None, None))

    def collect(self) -> Iterator[Metric]:
        return iter(self._families(self._gauges, self._read_at))

    @staticmethod
    def _families(gauges: OutboxGauges | None, read_at: datetime | None) -> list[Metric]:
        up = GaugeMetricFamily(
            "relay_outbox_up",
            "1 when this scrape could read the outbox gauges from the database, else 0.",
        )
        rows = GaugeMetricFamily(
            "relay_outbox_rows",
            "Outbox rows by status, read from the database: pending (waiting for delivery), "
            "delivering (claimed by a drainer), dead (kept until requeued or purged).",
            labels=["status"],
        )
        oldest = GaugeMetricFamily(
            "relay_outbox_oldest_pending_age_seconds",
            "Age (since receipt) of the oldest pending or delivering row; 0 when none.",
        )
        # The relay's one gauge of these calls (the drainer logs each, and exports none).
        awaiting = GaugeMetricFamily(
            "relay_outbox_calls_awaiting_call_ended",
            "Calls whose call.hungup is older than RELAY_CALL_ENDED_TIMEOUT_SECONDS with no "
            "call.ended received, read from the database.",
        )
        avail = GaugeMetricFamily(
            "relay_outbox_filesystem_avail_bytes",
            "SQLite only: bytes available to the relay's user on the filesystem that holds "
            "the database file.",
        )
        size = GaugeMetricFamily(
            "relay_outbox_filesystem_size_bytes",
            "SQLite only: size in bytes of the filesystem that holds the database file.",
        )
        reconciled_at = GaugeMetricFamily(
            "relay_reconcile_last_run_timestamp_seconds",
            "When the last `aircall-relay reconcile` run ended (UNIX time), from reconcile_runs; "
            "absent when none ran.",
        )
        reconciled_complete = GaugeMetricFamily(
            "relay_reconcile_last_run_complete",
            "1 when the last reconcile run found every ended call with its call.ended (or "
            "back-filled it), 0 when calls were left without, or the run failed.",
        )
        reconciled_calls = GaugeMetricFamily(
            "relay_reconcile_last_run_calls",
            "Calls of the last reconcile run: missing (no row), awaiting_call_ended (rows but "
            "no call.ended past the grace), backfilled (call.ended stored from Aircall's API).",
            labels=["verdict"],
        )
        reconcile = [reconciled_at, reconciled_complete, reconciled_calls]
        if read_at is None:  # describe(): the names only
            return [up, rows, oldest, awaiting, avail, size, *reconcile]
        up.add_metric([], 0.0 if gauges is None else 1.0)
        if gauges is None:
            return [up]
        for status in GAUGE_STATUSES:
            rows.add_metric([status], float(getattr(gauges, status)))
        received = gauges.oldest_undelivered_received_at
        oldest.add_metric(
            [], 0.0 if received is None else max(0.0, (read_at - received).total_seconds())
        )
        awaiting.add_metric([], float(gauges.calls_awaiting_call_ended))
        families: list[Metric] = [up, rows, oldest, awaiting]
        if gauges.filesystem is not None:  # PostgreSQL: no file of the relay's to watch
            avail.add_metric([], float(gauges.filesystem.avail_bytes))
            size.add_metric([], float(gauges.filesystem.size_bytes))
            families += [avail, size]
        run = gauges.last_reconcile
        if run is None:
            return families
        reconciled_at.add_metric([], run.finished_at.timestamp())
        reconciled_complete.add_metric([], 1.0 if run.complete else 0.0)
        for verdict in ("missing", "awaiting_call_ended", "backfilled"):
            reconciled_calls.add_metric([verdict], float(getattr(run, verdict)))
        return [*families, *reconcile]


class ReceiverMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.webhooks = Counter(
            "relay_webhooks",
            "Webhooks answered, by event and outcome (stored, duplicate, skipped, refusals).",
            ["event", "outcome"],
            registry=self.registry,
        )
        self.duplicates = Counter(
            "relay_webhook_duplicates",
            "Webhooks that repeated an event already in the outbox.",
            registry=self.registry,
        )
        self.commit_batch_size = Histogram(
            "relay_commit_batch_size",
            "Webhooks written per outbox transaction (group commit).",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self.commit_duration = Histogram(
            "relay_commit_duration_seconds",
            "Time to write and commit one group of webhooks.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=self.registry,
        )
        self.latency = Histogram(
            "relay_webhook_duration_seconds",
            "Time from reading a webhook request to its answer, commit included.",
            ["outcome"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=self.registry,
        )
        self.outbox = OutboxCollector()
        self.registry.register(self.outbox)
        # What a scrape renders: this registry, or, among several workers, every worker's
        # counters and histograms summed (from the shared files) and this worker's outbox
        # gauges (read from the database, the same whichever worker reads them).
        self._rendered = self.registry
        shared = os.environ.get(MULTIPROCESS_METRICS_ENV)
        if shared:
            self._rendered = CollectorRegistry()
            MultiProcessCollector(self._rendered, path=shared)  # type: ignore[no-untyped-call]
            self._rendered.register(self.outbox)
        # Other registries rendered after this one (`run`: the drainer's, in the same process).
        self._included: list[CollectorRegistry] = []

        # The labelled children, looked up once per (event, outcome): `labels()` is per request.
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}

    def observe(self, event: str | None, outcome: str, seconds: float) -> None:
        label = event if event in KNOWN_EVENTS else ("none" if event is None else "other")
        children = self._children.get((label, outcome))
        if children is None:
            children = (
                self.webhooks.labels(event=label, outcome=outcome),
                self.latency.labels(outcome=outcome),
            )
            self._children[(label, outcome)] = children
        children[0].inc()
        if outcome == "duplicate":
            self.duplicates.inc()
        children[1].observe(seconds)

    def observe_commit(self, webhooks: int, seconds: float) -> None:
        self.commit_batch_size.observe(webhooks)
        self.commit_duration.observe(seconds)

    def include(self, registry: CollectorRegistry) -> None:
        """Render `registry` too (its metric names must differ from the receiver's)."""
        self._included.append(registry)

    def render(self) -> tuple[bytes, str]:
        registries = [self._rendered, *self._included]
        text = b"".join(generate_latest(registry) for registry in registries)
        return text, CONTENT_TYPE_LATEST
