"""The receiver's Prometheus metrics, in a registry of its own (one per app, so tests are isolated).

Event names are labels only for events Aircall is known to send; anything else is counted as
`other`, so a stream of invented event names cannot blow up the number of series.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from relay.aircall import KNOWN_EVENTS


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

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
