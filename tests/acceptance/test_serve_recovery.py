"""`aircall-relay serve` on a SQLite file that stops taking writes for a while (its files made
read-only, its disk full) answers 503 and says "not ready" meanwhile, and takes webhooks again,
and says "ready", as soon as the file does: no restart needed (issue 10, fault 2)."""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path
from typing import Any

import httpx

from relay.db.migrate import upgrade_to_head
from tests.acceptance.processes import NOBODY, RelayProcess, chmod_all, relay_env, service_user
from tests.support import SAMPLE_TOKEN, count_rows, sample

WEBHOOK = "/aircall/webhook"
JSON = {"content-type": "application/json"}
TOKENS = f"main:{SAMPLE_TOKEN}"


def post(url: str, call_id: int) -> httpx.Response:
    body = sample("call.created")
    body["data"]["id"] = call_id
    return httpx.post(url + WEBHOOK, content=json.dumps(body), headers=JSON, timeout=30)


def assert_503(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"].isdigit()
    assert response.json()["error"] == "database_unavailable"


def readiness(url: str) -> tuple[int, dict[str, Any]]:
    response = httpx.get(url + "/readyz", timeout=30)
    body: dict[str, Any] = response.json()
    return response.status_code, body


def test_serve_recovers_after_its_database_files_were_read_only() -> None:
    with service_user() as (directory, options):
        path = directory / "outbox.sqlite3"
        url = f"sqlite+aiosqlite:///{path}"
        upgrade_to_head(url)
        if options:
            os.chown(path, NOBODY, NOBODY)
        chmod_all(directory, 0o444)
        relay = RelayProcess(
            "serve", "--port", "0", env=relay_env(url, aircall_tokens=TOKENS), **options
        )
        try:
            base = relay.url()
            status, body = readiness(base)
            assert status == 503, body
            assert body["writes"].startswith("failing (") and "readonly" in body["writes"]
            assert_503(post(base, 7_000_000_001))
            assert readiness(base)[0] == 503

            chmod_all(directory, 0o644)  # the database, its -wal and -shm are writable again
            assert post(base, 7_000_000_002).json()["status"] == "stored"
            assert post(base, 7_000_000_001).json()["status"] == "stored"  # Aircall's retry
            status, body = readiness(base)
            assert (status, body["status"], body["writes"]) == (200, "ready", "ok")
        finally:
            relay.stop()
        assert count_rows(url) == 2


def test_serve_recovers_after_its_disk_was_full(tmp_path: Path) -> None:
    """A full disk, made real for the receiver's process alone: its file size limit
    (RLIMIT_FSIZE, set on the running process) lowered to just past the end of the database's
    WAL, so that the next commit cannot write its frames, then raised again. The kernel then
    refuses the write with EFBIG, which SQLite reports as "disk I/O error" where a full disk
    (ENOSPC) gives "database or disk is full": the same failure for the receiver."""
    path = tmp_path / "outbox.sqlite3"
    url = f"sqlite+aiosqlite:///{path}"
    upgrade_to_head(url)
    relay = RelayProcess("serve", "--port", "0", env=relay_env(url, aircall_tokens=TOKENS))
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        base = relay.url()
        assert post(base, 7_000_000_011).json()["status"] == "stored"
        wal = path.with_name(path.name + "-wal")
        resource.prlimit(relay.pid, resource.RLIMIT_FSIZE, (wal.stat().st_size + 100, hard))

        assert_503(post(base, 7_000_000_012))
        assert_503(post(base, 7_000_000_012))  # still full: the same answer
        status, body = readiness(base)
        assert status == 503, body
        assert body["writes"].startswith("failing (OperationalError: ")

        resource.prlimit(relay.pid, resource.RLIMIT_FSIZE, (hard, hard))  # space again
        assert post(base, 7_000_000_012).json()["status"] == "stored"
        status, body = readiness(base)
        assert (status, body["writes"]) == (200, "ok"), body
    finally:
        relay.stop()
    assert count_rows(url) == 2
