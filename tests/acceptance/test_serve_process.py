"""The real `aircall-relay` command in subprocesses: serve, SIGTERM, SIGKILL, workers, TLS,
secrets kept out of output, configuration errors, migrate and check."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import socket
import sqlite3
import ssl
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.acceptance.processes import RelayProcess, relay_env, run_relay
from tests.support import SAMPLE_TOKEN, OutboxDatabase, count_rows, sample

WEBHOOK = "/aircall/webhook"
JSON = {"content-type": "application/json"}
TOKENS = f"main:{SAMPLE_TOKEN}"


def distinct_call(number: int, event: str = "call.created") -> bytes:
    body = sample(event)
    body["data"]["id"] = 5_000_000_000 + number
    return json.dumps(body).encode()


def test_serve_answers_then_sigterm_exits_zero(sqlite_database: OutboxDatabase) -> None:
    relay = RelayProcess(
        "serve", "--port", "0", env=relay_env(sqlite_database.url, aircall_tokens=TOKENS)
    )
    try:
        response = httpx.post(relay.url() + WEBHOOK, content=distinct_call(1), headers=JSON)
        assert response.status_code == 200
        # `serve` runs on uvloop (docs/performance.md: less CPU per webhook).
        assert relay.wait_for_log("listening")["event_loop"] == "uvloop"
        relay.signal(signal.SIGTERM)
        assert relay.wait() == 0
    finally:
        relay.stop()
    assert sqlite_database.count() == 1
    lines = [record for record in relay.records() if record.get("event") == "webhook"]
    assert lines and lines[0]["outcome"] == "stored"
    assert {"aircall_event", "ordering_key", "outcome", "duplicate", "ms"} <= set(lines[0])


def test_sigterm_lets_in_flight_webhooks_finish(sqlite_database: OutboxDatabase) -> None:
    """Webhooks waiting on a locked database when SIGTERM arrives still get their 200."""
    env = relay_env(sqlite_database.url, aircall_tokens=TOKENS, database_timeout_seconds="10")
    relay = RelayProcess("serve", "--port", "0", env=env)
    path = sqlite_database.url.split("///", 1)[1]
    try:
        url = relay.url()
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
            futures = [
                pool.submit(
                    httpx.post, url + WEBHOOK, content=distinct_call(n), headers=JSON, timeout=30
                )
                for n in range(10)
            ]
            time.sleep(0.5)  # the requests are now waiting for the lock inside the receiver
            relay.signal(signal.SIGTERM)
            time.sleep(0.5)
            holder.execute("ROLLBACK")
            holder.close()
            statuses = [future.result().status_code for future in futures]
        assert statuses == [200] * 10
        assert relay.wait() == 0
    finally:
        relay.stop()
    assert sqlite_database.count() == 10


def test_sigkill_loses_no_acknowledged_webhook(sqlite_database: OutboxDatabase) -> None:
    env = relay_env(sqlite_database.url, aircall_tokens=TOKENS)
    relay = RelayProcess("serve", "--port", "0", env=env)
    acknowledged: list[int] = []
    lock = threading.Lock()
    stop = threading.Event()
    try:
        url = relay.url()

        def sender(worker: int) -> None:
            with httpx.Client(base_url=url, timeout=5) as http:
                for n in range(worker * 10_000, worker * 10_000 + 10_000):
                    if stop.is_set():
                        return
                    try:
                        response = http.post(WEBHOOK, content=distinct_call(n), headers=JSON)
                    except httpx.HTTPError:
                        return
                    if response.status_code == 200:
                        with lock:
                            acknowledged.append(n)

        threads = [threading.Thread(target=sender, args=(worker,)) for worker in range(8)]
        for thread in threads:
            thread.start()
        while len(acknowledged) < 300:
            time.sleep(0.01)
        relay.signal(signal.SIGKILL)
        relay.wait()
        stop.set()
        for thread in threads:
            thread.join(10)
    finally:
        relay.stop()
    stored = {
        int(row["resource_id"]) - 5_000_000_000
        for row in sqlite_database.rows("SELECT resource_id FROM outbox")
    }
    missing = set(acknowledged) - stored
    assert not missing, f"{len(missing)} acknowledged webhooks lost, e.g. {sorted(missing)[:5]}"


def test_two_workers_serve_and_stop(sqlite_database: OutboxDatabase) -> None:
    env = relay_env(sqlite_database.url, aircall_tokens=TOKENS)
    relay = RelayProcess("serve", "--port", "0", "--workers", "2", env=env)
    try:
        url = relay.url()
        deadline = time.monotonic() + 30
        while True:  # the workers are spawned after the socket listens
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, relay.output()
            time.sleep(0.1)
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            responses = list(
                pool.map(
                    lambda n: httpx.post(url + WEBHOOK, content=distinct_call(n), headers=JSON),
                    range(40),
                )
            )
        assert [response.status_code for response in responses] == [200] * 40
        # Whichever worker answers a scrape, it counts every worker's webhooks (each scrape on
        # a connection of its own, so the kernel hands them to both workers).
        metrics = relay.metrics_url()
        stored = [_stored_webhooks(httpx.get(metrics).text) for _ in range(12)]
        assert stored == [40.0] * 12
        relay.signal(signal.SIGTERM)
        assert relay.wait() == 0
    finally:
        relay.stop()
    assert sqlite_database.count() == 40


def _stored_webhooks(metrics: str) -> float:
    """The sum of `relay_webhooks_total` over events, for the outcome `stored`."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("relay_webhooks_total{") and 'outcome="stored"' in line
    )


def test_tls_with_certificate_and_key(sqlite_database: OutboxDatabase, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    env = relay_env(sqlite_database.url, aircall_tokens=TOKENS)
    relay = RelayProcess(
        "serve", "--port", "0", "--tls-certfile", str(cert), "--tls-keyfile", str(key), env=env
    )
    try:
        listening = relay.wait_for_log("listening")
        assert listening["url"].startswith("https://")
        url = f"https://127.0.0.1:{listening['port']}"
        trusted = ssl.create_default_context(cafile=str(cert))
        response = httpx.post(url + WEBHOOK, content=distinct_call(1), headers=JSON, verify=trusted)
        assert response.status_code == 200
        # The metrics port stays plain HTTP (loopback, for Prometheus), the webhook port is TLS.
        metrics = httpx.get(relay.metrics_url())
        assert metrics.status_code == 200
        assert 'relay_webhooks_total{event="call.created",outcome="stored"} 1.0' in metrics.text
        assert httpx.get(url + "/metrics", verify=trusted).status_code == 404
    finally:
        relay.stop()


def test_secrets_never_appear_in_logs_or_help(sqlite_database: OutboxDatabase) -> None:
    write_key = "wk_Zq8Xv3Lm0Pp2Rr4Tt6Uu8Ww0"
    env = relay_env(sqlite_database.url, aircall_tokens=TOKENS, segment_write_key=write_key)
    relay = RelayProcess("serve", "--port", "0", env=env)
    try:
        url = relay.url()
        valid = sample("call.created")
        httpx.post(url + WEBHOOK, json=valid)
        wrong = dict(valid, token=SAMPLE_TOKEN[::-1])
        httpx.post(url + WEBHOOK, json=wrong)
        bad = dict(valid, timestamp="soon")
        httpx.post(url + WEBHOOK, json=bad)
        httpx.post(url + WEBHOOK, content=b"{" + SAMPLE_TOKEN.encode(), headers=JSON)
    finally:
        relay.stop()
    output = relay.output()
    assert "webhook" in output
    for secret in (SAMPLE_TOKEN, SAMPLE_TOKEN[::-1], write_key):
        assert secret not in output
    for command in ([], ["serve"], ["run"], ["migrate"], ["check"]):
        shown = run_relay(*command, "--help", env=env)
        assert shown.returncode == 0
        assert SAMPLE_TOKEN not in shown.stdout + shown.stderr
        assert write_key not in shown.stdout + shown.stderr


def test_configuration_errors_name_the_setting_and_exit_2(tmp_path: Path) -> None:
    env = relay_env(f"sqlite:///{tmp_path}/x.sqlite3", aircall_tokens=TOKENS)
    result = run_relay("check", env=dict(env, RELAY_PORT="eighty"))
    assert result.returncode == 2
    assert "RELAY_PORT" in result.stderr

    short = "abc123"
    result = run_relay("serve", env=dict(env, RELAY_AIRCALL_TOKENS=f"main:{short}"))
    assert result.returncode == 2
    assert "RELAY_AIRCALL_TOKENS" in result.stderr
    assert short not in result.stderr

    result = run_relay("check", env=dict(env, RELAY_DATABSE_URL="sqlite:///typo"))
    assert result.returncode == 2
    assert "RELAY_DATABSE_URL" in result.stderr

    result = run_relay("serve", env={k: v for k, v in env.items() if k != "RELAY_AIRCALL_TOKENS"})
    assert result.returncode == 2
    assert "RELAY_AIRCALL_TOKENS" in result.stderr


def test_a_port_already_taken_exits_2_naming_the_setting(sqlite_database: OutboxDatabase) -> None:
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        env = relay_env(sqlite_database.url, aircall_tokens=TOKENS)
        result = run_relay("serve", "--host", "127.0.0.1", "--port", str(port), env=env)
    finally:
        taken.close()
    assert result.returncode == 2, result.stderr
    assert "RELAY_HOST/RELAY_PORT" in result.stderr
    assert f"127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_file_is_read_and_environment_wins(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(f'database_url = "sqlite:///{tmp_path}/from-file.sqlite3"\nport = 9999\n')
    env = relay_env("unused", aircall_tokens=TOKENS)
    del env["RELAY_DATABASE_URL"]
    assert run_relay("--config", str(config), "migrate", env=env).returncode == 0
    assert (tmp_path / "from-file.sqlite3").exists()
    env["RELAY_DATABASE_URL"] = f"sqlite:///{tmp_path}/from-env.sqlite3"
    assert run_relay("--config", str(config), "migrate", env=env).returncode == 0
    assert (tmp_path / "from-env.sqlite3").exists()


def test_migrate_then_check(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/outbox.sqlite3"
    env = relay_env(url, aircall_tokens=TOKENS, segment_write_key="wk_migrate_then_check_0")
    before = run_relay("check", env=env)
    assert before.returncode == 3, before.stdout + before.stderr
    assert "Not ready" in before.stdout
    assert "run `aircall-relay migrate`" in before.stdout
    migrated = run_relay("migrate", env=env)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    assert run_relay("migrate", env=env).returncode == 0  # idempotent
    after = run_relay("check", env=env)
    assert after.returncode == 0, after.stdout
    assert after.stdout.strip().endswith("Ready for the receiver and the drainer.")
    assert count_rows(url) == 0


@pytest.mark.postgres
def test_check_on_postgresql(postgres_database: OutboxDatabase) -> None:
    env = relay_env(postgres_database.url, aircall_tokens=TOKENS)
    result = run_relay("check", "--role", "receiver", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "postgres" in result.stdout
