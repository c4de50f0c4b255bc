"""A PostgreSQL server of a test's own, for a test that stops and starts the server: a throw-away
cluster (`initdb`, `pg_ctl`) in a temporary folder, on a free loopback port, removed at the end.
Tests never stop, restart or reconfigure a server they did not start, such as the machine's.

As root, `initdb` refuses to run: the cluster then belongs to the `postgres` OS user (which a
PostgreSQL package creates), and its commands run as that user (`runuser`). Without the server
binaries the test is skipped with the reason, or fails where PostgreSQL is required
(`RELAY_TEST_REQUIRE_POSTGRES=1`, as in CI).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest

# Debian and Ubuntu keep the server's binaries here, not on PATH.
DEBIAN_BINARIES = Path("/usr/lib/postgresql")


def _missing(reason: str) -> None:
    if os.environ.get("RELAY_TEST_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"{reason} (RELAY_TEST_REQUIRE_POSTGRES=1: PostgreSQL is required here)")
    pytest.skip(reason)


def server_binaries() -> Path:
    """The folder holding `initdb` and `pg_ctl`: from PATH, else Debian's newest version."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl and Path(initdb).resolve().parent == Path(pg_ctl).resolve().parent:
        return Path(initdb).resolve().parent
    versions = sorted(
        (folder for folder in DEBIAN_BINARIES.glob("*/bin") if (folder / "initdb").exists()),
        key=lambda folder: int(folder.parent.name) if folder.parent.name.isdigit() else 0,
    )
    if versions and (versions[-1] / "pg_ctl").exists():
        return versions[-1]
    _missing(
        "no initdb and pg_ctl on PATH or in /usr/lib/postgresql/*/bin: the PostgreSQL server "
        "binaries are needed for a cluster of the test's own"
    )
    raise AssertionError("unreachable")  # pragma: no cover


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ThrowawayCluster:
    """`initdb` in a temporary folder, then `start`, `stop` and `start` again at will; `remove`
    stops the server (at once) and deletes the folder, and may be called in any state."""

    def __init__(self) -> None:
        self.bindir = server_binaries()
        self.owner: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self.owner = pwd.getpwnam("postgres")
            except KeyError:
                _missing("running as root, and no `postgres` OS user to own a test cluster")
        self.folder = Path(tempfile.mkdtemp(prefix="relay-test-postgres-"))
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"
        self.port = 0
        if self.owner is not None:
            os.chown(self.folder, self.owner.pw_uid, self.owner.pw_gid)
        try:
            self._run(
                "initdb", "--pgdata", str(self.data), "--username", "postgres",
                "--auth", "trust", "--encoding", "UTF8", "--locale", "C", "--no-sync",
            )  # fmt: skip
        except BaseException:
            self.remove()
            raise

    @property
    def url(self) -> str:
        """The `postgres` database of this cluster, as superuser `postgres`."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, program: str, *arguments: str) -> subprocess.CompletedProcess[str]:
        command: Sequence[str] = [str(self.bindir / program), *arguments]
        if self.owner is not None:
            command = ["runuser", "-u", self.owner.pw_name, "--", *command]
        result = subprocess.run(
            command, cwd=self.folder, capture_output=True, text=True, timeout=120, check=False
        )
        if result.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise AssertionError(
                f"{program} {' '.join(arguments[:1])} exited {result.returncode}:\n"
                f"{result.stdout}{result.stderr}{log}"
            )
        return result

    def start(self) -> None:
        """Start the server (on a free port the first time, the same one after) and wait until
        it accepts connections."""
        attempts = 3 if self.port == 0 else 1
        for attempt in range(attempts):
            port = self.port or _free_port()
            options = (
                f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.folder}"
            )
            try:
                self._run(
                    "pg_ctl", "start", "--pgdata", str(self.data), "--log", str(self.log),
                    "--wait", "--timeout", "60", "--options", options,
                )  # fmt: skip
            except AssertionError:
                if attempt == attempts - 1:
                    raise
                continue  # another process took the port meanwhile: another one
            self.port = port
            return

    def stop(self) -> None:
        """A fast shutdown: sessions are ended, and the server is down when this returns."""
        self._run("pg_ctl", "stop", "--pgdata", str(self.data), "--mode", "fast", "--wait")

    def running(self) -> bool:
        command = [str(self.bindir / "pg_ctl"), "status", "--pgdata", str(self.data)]
        if self.owner is not None:
            command = ["runuser", "-u", self.owner.pw_name, "--", *command]
        result = subprocess.run(
            command, cwd=self.folder, capture_output=True, timeout=60, check=False
        )
        return result.returncode == 0

    def remove(self) -> None:
        try:
            if self.data.exists() and self.running():
                self._run(
                    "pg_ctl", "stop", "--pgdata", str(self.data), "--mode", "immediate", "--wait"
                )
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
