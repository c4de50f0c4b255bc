"""The drainer's metrics text: the rate-limit waits exported at 0 for each cause from the start
(the dashboard's panel has data, and `rate()` sees the first wait)."""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

from relay.drainer.metrics import RATE_LIMIT_WAIT_CAUSES, DrainerMetrics
from tests.support import ROOT


def rate_limit_waits(metrics: DrainerMetrics) -> dict[str, float]:
    text, _ = metrics.render()
    return {
        sample.labels["cause"]: sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
        if sample.name == "relay_rate_limit_wait_seconds_total"
    }


def test_every_cause_of_a_wait_is_exported_at_0_before_any_wait() -> None:
    assert rate_limit_waits(DrainerMetrics()) == {"retry_after": 0.0, "token_bucket": 0.0}


def test_the_causes_are_those_the_drainer_counts() -> None:
    pacing = (ROOT / "relay" / "drainer" / "pacing.py").read_text()
    counted = set(re.findall(r'rate_limit_wait\.labels\(cause="(\w+)"\)', pacing))
    assert counted == set(RATE_LIMIT_WAIT_CAUSES)
