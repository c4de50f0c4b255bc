"""A real Prometheus scraping a live relay: the shipped alert rules and Grafana dashboard, asked
through Prometheus' HTTP API.

Prometheus (Debian's `prometheus` package) is started by the test on a free loopback port, with a
configuration and a storage directory of its own, scraping `aircall-relay serve` and
`aircall-relay drain` (real subprocesses) every second, with docs/prometheus/alerts.yml loaded as
shipped. The fake Segment (a thread of this process) answers one 429, delivers, then answers 500
to everything. Then every expression of the dashboard and of the rules must parse and return
data, every metric they name must have been scraped from the relay, and the rules must be in the
state the scenario puts them in: Segment failing pending, dead rows and calls awaiting
`call.ended` firing, the others inactive. The drainer probes a fake of Aircall's Public API
where the webhook of one of the two labels is disabled: the webhook-inactive alert goes pending;
and a reconcile run finds a call missing: the reconcile alert fires. About 15 seconds of scraping.
"""

from __future__ import annotations

import math
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from relay.testing import FakeSegment, Fault, SourceConfig
from relay.testing.fake_aircall import FakeAircall, sample_calls
from tests.acceptance.processes import RelayProcess, relay_env, run_relay, statuses
from tests.prometheus.support import (
    RULES,
    dashboard_expressions,
    metric_names,
    prometheus_tool,
    rule_expressions,
)
from tests.support import SAMPLE_TOKEN, OutboxDatabase, sample

WRITE_KEY = "wk_prometheus_scrape_7Hq2Lm9Xc4"
WEBHOOK = "/aircall/webhook"
# The job names of the scrape configuration in docs/operations.md, which AircallRelayTargetDown
# selects.
RECEIVER_JOB, DRAINER_JOB = "aircall-relay-receiver", "aircall-relay-drainer"
SCRAPE_SECONDS = 1
# What Grafana's `$__rate_interval` stands for here: several scrapes.
RATE_INTERVAL = "10s"

# The rules this scenario makes active, and how; every other rule must stay inactive (the disk
# rule is judged from the machine's own disk, below).
ACTIVE = {
    "AircallRelaySegmentFailing": "pending",  # 500s for seconds; it fires after 10 minutes
    "AircallRelayDeadRows": "firing",
    "AircallRelayCallEndedMissing": "firing",
    "AircallRelayWebhookInactive": "pending",  # the label "backup"; it fires after 10 minutes
    "AircallRelayReconcileIncomplete": "firing",  # a call of Aircall's the outbox never got
}
API_ID, API_TOKEN = "scrape-api-id", "scrape-api-token-5Rk2"
BACKUP_TOKEN = "b" * 32
DISK_RULE = "AircallRelayDiskNearlyFull"


@dataclass
class Prometheus:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def get(self, path: str, **params: str) -> Any:
        response = httpx.get(self.url + path, params=params, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", (path, params, body)
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector (or scalar) `expr` gives now; a parse error fails the test."""
        data = self.get("/api/v1/query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def rules(self) -> dict[str, dict[str, Any]]:
        groups = self.get("/api/v1/rules", type="alert")["groups"]
        return {rule["name"]: rule for group in groups for rule in group["rules"]}

    def metric_names(self) -> set[str]:
        return set(self.get("/api/v1/label/__name__/values"))

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def start_prometheus(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], Prometheus]]:
    """Starts Prometheus scraping `targets` (job name: host:port); stops it after the test."""
    binary = prometheus_tool("prometheus")
    started: list[Prometheus] = []

    def start(targets: dict[str, str]) -> Prometheus:
        config = tmp_path / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {
                        "scrape_interval": f"{SCRAPE_SECONDS}s",
                        "scrape_timeout": f"{SCRAPE_SECONDS}s",
                        "evaluation_interval": f"{SCRAPE_SECONDS}s",
                    },
                    "rule_files": [str(RULES)],  # as shipped
                    "scrape_configs": [
                        {"job_name": job, "static_configs": [{"targets": [target]}]}
                        for job, target in targets.items()
                    ],
                }
            )
        )
        for _attempt in range(3):  # another process may take the free port first
            port = free_port()
            log = tmp_path / f"prometheus-{port}.log"
            with log.open("wb") as output:
                process = subprocess.Popen(
                    [
                        binary,
                        f"--config.file={config}",
                        f"--storage.tsdb.path={tmp_path / f'data-{port}'}",
                        f"--web.listen-address=127.0.0.1:{port}",
                        "--log.level=warn",
                    ],
                    stdout=output,
                    stderr=subprocess.STDOUT,
                )
            prometheus = Prometheus(process, f"http://127.0.0.1:{port}", log)
            started.append(prometheus)
            deadline = time.monotonic() + 30
            while process.poll() is None and time.monotonic() < deadline:
                try:
                    if httpx.get(prometheus.url + "/-/ready", timeout=2).status_code == 200:
                        return prometheus
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            if process.poll() is None:
                raise AssertionError(f"Prometheus not ready within 30 s:\n{prometheus.tail()}")
            if "address already in use" not in prometheus.log.read_text(errors="replace"):
                code = process.returncode
                raise AssertionError(f"Prometheus exited {code}:\n{prometheus.tail()}")
        raise AssertionError("Prometheus found no free port in 3 attempts")

    yield start
    for prometheus in started:
        if prometheus.process.poll() is None:
            prometheus.process.send_signal(signal.SIGTERM)
            try:
                prometheus.process.wait(15)
            except subprocess.TimeoutExpired:
                prometheus.process.kill()
                prometheus.process.wait(5)


def relay_settings(fake: FakeSegment, aircall: FakeAircall) -> dict[str, str]:
    return {
        "aircall_tokens": f"main:{SAMPLE_TOKEN},backup:{BACKUP_TOKEN}",
        "aircall_api_id": API_ID,
        "aircall_api_token": API_TOKEN,
        "aircall_api_url": aircall.base_url,
        "forward_events": "call.created,call.answered,call.hungup,call.ended,user.created",
        "segment_write_key": WRITE_KEY,
        "segment_base_url": fake.base_url,
        "settle_seconds": "0",
        "poll_seconds": "0.02",
        "segment_events_per_second": "0",
        "segment_requests_per_second": "0",
        "retry_base_seconds": "0.2",  # retries every second or less while Segment fails
        "retry_cap_seconds": "1",
        "call_ended_timeout_seconds": "1",
        "shutdown_grace_seconds": "2",
    }


def call_event(event: str, call_id: int) -> dict[str, Any]:
    body = sample(event)
    body["data"]["id"] = call_id
    return body


def wait_for(condition: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waiting for {what}: not within {timeout} s")
        time.sleep(0.2)


def metrics_target(process: RelayProcess) -> str:
    return f"127.0.0.1:{process.wait_for_log('metrics_listening')['port']}"


def test_a_real_prometheus_scrapes_the_relay_and_runs_the_shipped_rules(
    sqlite_database: OutboxDatabase, start_prometheus: Callable[[dict[str, str]], Prometheus]
) -> None:
    with (
        FakeSegment(write_keys={WRITE_KEY: SourceConfig()}) as fake,
        FakeAircall(api_id=API_ID, api_token=API_TOKEN, requests_per_minute=None) as aircall,
    ):
        aircall.add_webhook("https://relay.example.com/aircall/webhook", SAMPLE_TOKEN)
        aircall.add_webhook("https://relay.example.com/aircall/webhook", BACKUP_TOKEN, active=False)
        env = relay_env(sqlite_database.url, **relay_settings(fake, aircall))
        # A call Aircall has that ended two hours ago and never reached the relay: reconcile
        # (without back-fill) records an incomplete run, which the receiver's gauges show.
        aircall.add_calls(sample_calls(1, first_id=9_000_001, start=int(time.time()) - 3 * 3600))
        reconcile = run_relay("reconcile", "--since", "26h", "--requests-per-minute", "0", env=env)
        assert reconcile.returncode == 4, reconcile.stdout + reconcile.stderr
        receiver = RelayProcess("serve", "--port", "0", env=env)
        drainer = RelayProcess("drain", env=env)
        try:
            base = receiver.url()
            prometheus = start_prometheus(
                {RECEIVER_JOB: metrics_target(receiver), DRAINER_JOB: metrics_target(drainer)}
            )
            scraping_since = time.monotonic()
            # A few scrapes of a quiet relay first, so that one 429 pause is a small share of
            # the drainer's samples (AircallRelayRateLimited must stay inactive).
            wait_for(
                lambda: bool(
                    prometheus.query(
                        'count_over_time(relay_delivery_paused{reason="rate_limited"}[1m]) >= 5'
                    )
                ),
                "five scrapes of the drainer",
                timeout=20,
            )

            # Deliveries, after one 429; a message too large for Segment goes dead; call 3001
            # hangs up and its call.ended never comes.
            fake.inject(Fault.rate_limited(1))
            too_large = sample("user.created")
            too_large["data"]["substatus"] = "y" * 40_000
            webhooks = [
                *(call_event(name, 3001) for name in ("call.created", "call.hungup")),
                *(call_event(name, 3002) for name in ("call.created", "call.hungup", "call.ended")),
                too_large,
            ]
            with httpx.Client(base_url=base, timeout=10) as client:
                for body in webhooks:
                    assert client.post(WEBHOOK, json=body).json()["status"] == "stored"
                assert client.post(WEBHOOK, json=webhooks[0]).json()["status"] == "duplicate"
                assert client.post(WEBHOOK, json={"token": "x" * 20}).status_code == 401
            wait_for(
                lambda: statuses(sqlite_database) == {"delivered": 5, "dead": 1},
                "every row delivered or dead",
                timeout=20,
            )

            # The fault: Segment answers 500 to everything from now on.
            fake.inject(Fault.status(500), times=None)
            with httpx.Client(base_url=base, timeout=10) as client:
                for name in ("call.created", "call.answered", "call.hungup", "call.ended"):
                    assert client.post(WEBHOOK, json=call_event(name, 3003)).status_code == 200
            fault_at = time.monotonic()
            wait_for(
                lambda: (
                    {
                        name: rule["state"]
                        for name, rule in prometheus.rules().items()
                        if name in ACTIVE
                    }
                    == ACTIVE
                ),
                f"the rules {ACTIVE}",
                timeout=30,
            )
            pending_after = time.monotonic() - fault_at

            rules = prometheus.rules()
            scraped = prometheus.metric_names()
            dashboard = {
                expr: prometheus.query(expr.replace("$__rate_interval", RATE_INTERVAL))
                for expr in dashboard_expressions()
            }
            alerts = {name: prometheus.query(expr) for name, expr in rule_expressions().items()}
            targets = prometheus.query(f'up{{job=~"{RECEIVER_JOB}|{DRAINER_JOB}"}} == 1')
            free_share = prometheus.query(
                "relay_outbox_filesystem_avail_bytes / relay_outbox_filesystem_size_bytes"
            )
            pending_alerts = prometheus.get("/api/v1/alerts")["alerts"]
            scraped_for = time.monotonic() - scraping_since
        finally:
            drainer.stop()
            receiver.stop()

    # Every metric the dashboard and the rules name was scraped from the relay (or is `up`).
    named = {
        name for expr in [*dashboard, *rule_expressions().values()] for name in metric_names(expr)
    }
    assert named - scraped == set(), f"named but never scraped: {sorted(named - scraped)}"
    # Every dashboard expression returns data.
    assert [expr for expr, result in dashboard.items() if not result] == []
    assert len(targets) == 2

    # Every rule evaluates without error, in the state this scenario puts it in, and its
    # expression returns data exactly when it is active.
    assert {name: rule["health"] for name, rule in rules.items()} == dict.fromkeys(alerts, "ok")
    assert [rule["lastError"] for rule in rules.values() if rule.get("lastError")] == []
    (share,) = free_share
    disk_state = "pending" if float(share["value"][1]) < 0.10 else "inactive"
    expected = {name: ACTIVE.get(name, "inactive") for name in alerts} | {DISK_RULE: disk_state}
    assert {name: rule["state"] for name, rule in rules.items()} == expected
    returned = {name for name, result in alerts.items() if result}
    assert returned == {name for name, state in expected.items() if state != "inactive"}

    # The pending alert, as Alertmanager would get it once it fires: its summary filled in.
    pending = {alert["labels"]["alertname"]: alert for alert in pending_alerts}
    assert {name for name, alert in pending.items() if alert["state"] == "pending"} == {
        "AircallRelaySegmentFailing",
        "AircallRelayWebhookInactive",
    }
    failing = pending["AircallRelaySegmentFailing"]
    assert failing["labels"]["alertname"] == "AircallRelaySegmentFailing"
    assert failing["labels"]["job"] == DRAINER_JOB
    percentage = failing["annotations"]["summary"].split(" to ")[1].split("%")[0]
    assert 50 < float(percentage) <= 100 and not math.isnan(float(percentage))
    inactive = pending["AircallRelayWebhookInactive"]
    assert inactive["labels"]["label"] == "backup", inactive
    assert "label backup" in inactive["annotations"]["summary"]
    assert len(fake.accepted()) == 5
    print(f"pending {pending_after:.1f} s after the fault; {scraped_for:.1f} s of scraping")
