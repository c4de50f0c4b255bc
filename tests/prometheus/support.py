"""What the Prometheus tests share: the alert rules and the Grafana dashboard the relay ships, the
metric names their expressions name, the names the relay's registries export, and Prometheus'
own tools (`promtool`, `prometheus`, from Debian's `prometheus` package).

Without those tools the tests that need them skip, except under `RELAY_TEST_REQUIRE_PROMETHEUS=1`
(`.ci/run` sets it, after installing the package), where a missing tool fails them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from relay.drainer.metrics import DrainerMetrics
from relay.receiver.metrics import ReceiverMetrics
from tests.support import ROOT

RULES = ROOT / "docs" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "tests" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "docs" / "grafana" / "aircall-relay.json"

# The series the rules may name besides the relay's own: Prometheus' scrape health.
PROMETHEUS_SERIES = frozenset({"up"})


def prometheus_tool(name: str) -> str:
    """The path of `promtool` or `prometheus`; a skip without it, or a failure in CI."""
    path = shutil.which(name)
    if path is not None:
        return path
    reason = f"`{name}` is not installed (Debian: apt-get install prometheus)"
    if os.environ.get("RELAY_TEST_REQUIRE_PROMETHEUS") == "1":
        pytest.fail(f"{reason} (RELAY_TEST_REQUIRE_PROMETHEUS=1: Prometheus is required here)")
    pytest.skip(reason)


# --- what the relay exports --------------------------------------------------------------------

# The samples each type of metric family exports (prometheus-client's text format).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
}


def exported_names(registry: CollectorRegistry) -> set[str]:
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in SUFFIXES[family.type])
    return names


def relay_exports() -> set[str]:
    """Every sample name the receiver's and the drainer's registries can export."""
    receiver, drainer = (
        exported_names(ReceiverMetrics().registry),
        exported_names(DrainerMetrics().registry),
    )
    assert not receiver & drainer, "`run` renders both registries: their names must differ"
    return receiver | drainer


# --- what the rules and the dashboard ask -------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def rule_expressions() -> dict[str, str]:
    """Each alert's expression, by alert name."""
    return {rule["alert"]: rule["expr"] for rule in alert_rules()}


def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return document


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))  # rows may hold their panels


def dashboard_expressions() -> list[str]:
    return [
        target["expr"]
        for panel in panels(dashboard()["panels"])
        for target in panel.get("targets", [])
    ]


# PromQL words that are not metric names: operators, modifiers, and the keywords of a label list.
PROMQL_WORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "inf", "nan"}
)


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (not functions, label names or keywords)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges
    # label lists: sum by (a, b), on (x), group_left (y)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # Grafana variables
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names
