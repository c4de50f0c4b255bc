"""The Grafana dashboard (docs/grafana/aircall-relay.json) queries only metrics the relay exports,
and has a panel for each thing PRODUCT §9 asks the metrics to show."""

from __future__ import annotations

import re

from tests.prometheus.support import dashboard, metric_names, panels, relay_exports
from tests.prometheus.support import dashboard_expressions as expressions


def test_every_metric_the_dashboard_queries_is_exported() -> None:
    exported = relay_exports()
    unknown = {
        name: expr for expr in expressions() for name in metric_names(expr) if name not in exported
    }
    assert unknown == {}, f"queried but not exported: {unknown}; exported: {sorted(exported)}"


def test_every_expression_names_a_relay_metric() -> None:
    for expr in expressions():
        assert metric_names(expr), expr
        words = set(re.findall(r"\b[a-z_]+\b", re.sub(r'"[^"]*"', "", expr)))
        assert "job" not in words and "instance" not in words, f"site-specific labels: {expr}"


def test_the_dashboard_shows_what_the_product_asks_for() -> None:
    used = {name for expr in expressions() for name in metric_names(expr)}
    wanted = {
        "backlog and dead rows": "relay_outbox_rows",
        "oldest pending age": "relay_outbox_oldest_pending_age_seconds",
        "webhooks by event and outcome": "relay_webhooks_total",
        "Segment requests by status": "relay_segment_requests_total",
        "receipt-to-delivery latency": "relay_receipt_to_delivery_seconds_bucket",
        "dead events by reason": "relay_events_dead_total",
        "late events": "relay_events_late_total",
        "calls awaiting call.ended": "relay_outbox_calls_awaiting_call_ended",
        "rate-limit waits": "relay_rate_limit_wait_seconds_total",
        "Aircall webhooks active (issue 12)": "relay_aircall_webhook_active",
    }
    missing = {what: name for what, name in wanted.items() if name not in used}
    assert missing == {}
    latency = [expr for expr in expressions() if "relay_receipt_to_delivery_seconds" in expr]
    assert all(expr.startswith("histogram_quantile(") for expr in latency), latency


def test_the_dashboard_is_importable() -> None:
    document = dashboard()
    assert document["uid"] and document["title"]
    variables = {item["name"]: item for item in document["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in panels(document["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(document["panels"]):
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys(), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
