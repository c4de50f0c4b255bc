"""The alert rules the relay ships (docs/prometheus/alerts.yml): valid for Prometheus
(`promtool check rules`), behaving as their unit tests say (`promtool test rules` on
tests/prometheus/alerts_test.yml: for every rule, series that fire it and series that do not),
and naming only metrics the relay exports. tests/acceptance/test_prometheus_scrape.py runs them in
a real Prometheus against a live receiver and drainer."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.prometheus.support import (
    PROMETHEUS_SERIES,
    RULE_TESTS,
    RULES,
    alert_rules,
    metric_names,
    prometheus_tool,
    relay_exports,
    rule_expressions,
)
from tests.support import ROOT


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [prometheus_tool("promtool"), *args], capture_output=True, text=True, timeout=120
    )


def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_runs_the_rules_unit_tests() -> None:
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_metric_the_rules_name_is_exported() -> None:
    """A rule on a metric the relay does not export would never fire: a name must be one the
    receiver's or the drainer's registry exports (or Prometheus' own `up`)."""
    known = relay_exports() | PROMETHEUS_SERIES
    unknown = {
        alert: sorted(metric_names(expr) - known) for alert, expr in rule_expressions().items()
    }
    unknown = {alert: names for alert, names in unknown.items() if names}
    assert unknown == {}, f"not exported by the relay: {unknown}; exported: {sorted(known)}"
    assert all(metric_names(expr) for expr in rule_expressions().values())


def test_every_rule_has_series_that_fire_it_and_series_that_do_not() -> None:
    """In alerts_test.yml, each alert has a test that expects it firing, and a test (of series of
    its own) in which it never fires; no test names an alert the rules do not have."""
    tests: list[dict[str, Any]] = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired: set[str] = set()
    quiet: set[str] = set()
    for test in tests:
        checks: dict[str, list[bool]] = {}
        for check in test["alert_rule_test"]:
            checks.setdefault(check["alertname"], []).append(bool(check.get("exp_alerts")))
        fired.update(name for name, expected in checks.items() if any(expected))
        quiet.update(name for name, expected in checks.items() if not any(expected))
    alerts = set(rule_expressions())
    assert len(alerts) == len(alert_rules()), "two rules share an alert name"
    assert fired | quiet <= alerts, f"tests of alerts that do not exist: {(fired | quiet) - alerts}"
    assert alerts - fired == set(), "alerts no test fires"
    assert alerts - quiet == set(), "alerts without series that must not fire them"


def test_every_rule_says_what_is_wrong_and_what_to_run() -> None:
    for rule in alert_rules():
        annotations = rule["annotations"]
        assert annotations["summary"].strip(), rule["alert"]
        description = annotations["description"]
        # The description is the runbook: the relay's commands or a SQL recipe to run, and no
        # template (its value goes in the summary, so the unit tests can quote it word for word).
        assert "`aircall-relay " in description or "SELECT " in description, rule["alert"]
        assert "{{" not in description, rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]


def test_without_promtool_the_tests_skip_here_and_fail_in_ci(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a folder with no program in it
    monkeypatch.delenv("RELAY_TEST_REQUIRE_PROMETHEUS", raising=False)
    with pytest.raises(pytest.skip.Exception, match="`promtool` is not installed"):
        prometheus_tool("promtool")
    monkeypatch.setenv("RELAY_TEST_REQUIRE_PROMETHEUS", "1")  # as .ci/run sets it
    with pytest.raises(pytest.fail.Exception, match="RELAY_TEST_REQUIRE_PROMETHEUS=1"):
        prometheus_tool("prometheus")


def test_the_documented_scrape_jobs_are_those_the_rules_select() -> None:
    """AircallRelayTargetDown selects the job names of operations.md's scrape configuration."""
    document = (ROOT / "docs" / "operations.md").read_text()
    blocks = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", document, re.S)]
    (scrape,) = [block for block in blocks if isinstance(block, dict) and "scrape_configs" in block]
    jobs = {config["job_name"] for config in scrape["scrape_configs"]}
    assert jobs == {"aircall-relay-receiver", "aircall-relay-drainer"}
    selector = re.search(r'up\{job=~"([^"]+)"\}', rule_expressions()["AircallRelayTargetDown"])
    assert selector is not None
    assert {job for job in jobs if re.fullmatch(selector.group(1), job)} == jobs
