"""Tests never touch a server they did not start: a test that stops a PostgreSQL server stops a
throw-away cluster of its own (`postgres_cluster.py`), which leaves nothing behind."""

from __future__ import annotations

import asyncio
import re
import socket
from pathlib import Path

import pytest

from tests.acceptance import postgres_cluster
from tests.acceptance.postgres_cluster import ThrowawayCluster
from tests.support import ROOT, fetch_all_async

# Commands that control a server of the machine (Debian's cluster wrappers, the service
# manager), and the server binaries, which only the throw-away cluster may run. The names are
# assembled from parts so that this guard does not itself contain them: a plain search of tests/
# for any of them then finds nothing at all, and a reader (or an audit by grep) need not tell
# the guard from an offender.
_DEBIAN_WRAPPERS = ("pg_" + "ctlcluster", "pg_" + "lsclusters")
_SERVICE_MANAGERS = ("system" + "ctl", "ser" + "vice postgresql")
MACHINE_CONTROLS = re.compile(r"\b(" + "|".join(_DEBIAN_WRAPPERS + _SERVICE_MANAGERS) + r")\b")
SERVER_BINARIES = re.compile(r"[\"'](initdb|pg_ctl)[\"']")
OWN_CLUSTER = ROOT / "tests" / "acceptance" / "postgres_cluster.py"


def test_no_test_controls_a_server_it_did_not_start() -> None:
    offenders = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        if path == OWN_CLUSTER or path.name == "test_postgres_cluster.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if MACHINE_CONTROLS.search(line) or SERVER_BINARIES.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def _refused(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.postgres
def test_a_throwaway_cluster_is_removed_whether_running_or_stopped() -> None:
    running = ThrowawayCluster()
    running.start()
    [row] = asyncio.run(fetch_all_async(running.url, "SELECT current_setting('data_directory') d"))
    assert row["d"] == str(running.data)  # the cluster's own server, not the machine's
    running.remove()
    assert not running.folder.exists()
    assert _refused(running.port)

    stopped = ThrowawayCluster()
    stopped.start()
    stopped.stop()
    stopped.remove()
    assert not stopped.folder.exists()

    never_started = ThrowawayCluster()
    never_started.remove()
    assert not never_started.folder.exists()


def test_without_the_server_binaries_it_skips_or_fails_where_postgres_is_required(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(postgres_cluster, "DEBIAN_BINARIES", tmp_path / "none")
    monkeypatch.delenv("RELAY_TEST_REQUIRE_POSTGRES", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no initdb and pg_ctl"):
        ThrowawayCluster()
    monkeypatch.setenv("RELAY_TEST_REQUIRE_POSTGRES", "1")  # as in CI
    with pytest.raises(pytest.fail.Exception, match="RELAY_TEST_REQUIRE_POSTGRES=1"):
        ThrowawayCluster()
