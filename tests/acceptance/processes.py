"""Running the real `aircall-relay` command in a subprocess, reading its JSON log lines."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support import OutboxDatabase

VENV_BIN = Path(sys.executable).parent
RELAY = str(VENV_BIN / "aircall-relay")


def relay_env(database_url: str, **settings: str) -> dict[str, str]:
    """A clean environment: no RELAY_* from the caller, only what the test gives."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("RELAY_")}
    env["RELAY_DATABASE_URL"] = database_url
    env["RELAY_LOG_FORMAT"] = "json"
    # Any free port for each drainer's /metrics: tests run several drainers at once, and other
    # test runs may share the machine (the default, 9101, would be taken by the first).
    env["RELAY_DRAINER_METRICS_PORT"] = "0"
    env["RELAY_RECEIVER_METRICS_PORT"] = "0"  # the same for the receiver's (default 9102)
    env.update({f"RELAY_{key.upper()}": value for key, value in settings.items()})
    return env


def run_relay(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [RELAY, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


class RelayProcess:
    """`aircall-relay <args>` in the background; its stdout is collected line by line.
    `options` go to `subprocess.Popen` (e.g. `user` and `group` to run as another user)."""

    def __init__(self, *args: str, env: dict[str, str], **options: Any) -> None:
        self.process = subprocess.Popen(
            [RELAY, *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            **options,
        )
        self.lines: list[str] = []
        self._new_line = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._new_line:
                self.lines.append(line.rstrip("\n"))
                self._new_line.notify_all()

    def records(self) -> list[dict[str, Any]]:
        result = []
        for line in list(self.lines):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                result.append(record)
        return result

    def wait_for_log(self, event: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._new_line:
            while True:
                for record in self.records():
                    if record.get("event") == event:
                        return record
                if self.process.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(
                        f"process exited ({self.process.returncode}) before logging {event!r}:\n"
                        + "\n".join(self.lines[-30:])
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"no {event!r} log line within {timeout} s:\n" + "\n".join(self.lines[-30:])
                    )
                self._new_line.wait(min(remaining, 0.2))

    def port(self) -> int:
        return int(self.wait_for_log("listening")["port"])

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port()}"

    def metrics_url(self) -> str:
        """Where this process answers `GET /metrics` (a port of its own)."""
        return f"http://127.0.0.1:{self.wait_for_log('metrics_listening')['port']}/metrics"

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = 30) -> int:
        code = self.process.wait(timeout)
        self._reader.join(5)
        return code

    def output(self) -> str:
        return "\n".join(self.lines)

    @property
    def pid(self) -> int:
        return self.process.pid

    def tail(self, count: int = 40) -> str:
        """The last lines of output, for failure messages."""
        return "\n".join(self.lines[-count:])

    def kill(self) -> int:
        """SIGKILL, then the exit code (minus the signal number)."""
        self.process.kill()
        return self.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._reader.join(5)


# --- running as the service user, on files it may or may not write -----------------------------

NOBODY = 65534  # the conventional uid and gid of `nobody`: a user with no rights of its own


@contextmanager
def service_user() -> Iterator[tuple[Path, dict[str, Any]]]:
    """A directory of the user the relay runs as, and the `Popen` options that run it as
    that user. File permissions bind only a user without root's rights: as root (CI), the
    relay runs as `nobody`; otherwise as the current user."""
    directory = Path(tempfile.mkdtemp(prefix="relay-recovery-"))  # not under pytest's 0700 dir
    options: dict[str, Any] = {}
    opened: list[tuple[Path, int]] = []
    try:
        if os.geteuid() == 0:
            options = {"user": NOBODY, "group": NOBODY, "extra_groups": []}
            os.chown(directory, NOBODY, NOBODY)
            for folder in (Path(RELAY).parent, Path(sys.executable).resolve().parent):
                opened += _let_others_through(folder)
            probe = subprocess.run(
                [RELAY, "--version"], capture_output=True, text=True, check=False, **options
            )
            if probe.returncode != 0:
                pytest.skip(f"the relay cannot run as uid {NOBODY} here: {probe.stderr.strip()}")
        yield directory, options
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        for folder, mode in reversed(opened):
            folder.chmod(mode)


def _let_others_through(folder: Path) -> list[tuple[Path, int]]:
    """Let other users traverse (o+x, not list) each folder from / down to `folder` that they
    cannot, so that `nobody` reaches the virtualenv of a checkout made in a private folder
    (`mktemp -d` makes it 0700); returns what to restore, outermost first."""
    changed = []
    for ancestor in [*reversed(folder.resolve().parents), folder.resolve()]:
        mode = stat.S_IMODE(ancestor.stat().st_mode)
        if not mode & stat.S_IXOTH:
            ancestor.chmod(mode | stat.S_IXOTH)
            changed.append((ancestor, mode))
    return changed


def chmod_all(directory: Path, mode: int) -> None:
    """The database file and its -wal and -shm files, when there."""
    for path in directory.iterdir():
        path.chmod(mode)


# --- looking at the outbox while processes work on it ------------------------------------------


def statuses(database: OutboxDatabase) -> dict[str, int]:
    rows = database.rows("SELECT status, count(*) AS n FROM outbox GROUP BY status")
    return {row["status"]: int(row["n"]) for row in rows}


def held_by(database: OutboxDatabase, pid: int) -> int:
    """Rows in flight under a lease of the drainer process `pid` (owner `host:pid:random`)."""
    rows = database.rows(
        "SELECT count(*) AS n FROM outbox WHERE status = 'delivering' AND claimed_by LIKE :owner",
        owner=f"%:{pid}:%",
    )
    return int(rows[0]["n"])


def wait_until(
    condition: Callable[[], bool],
    what: str,
    timeout: float,
    process: RelayProcess | None = None,
    detail: Callable[[], object] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        ended = process is not None and process.process.poll() is not None
        if ended or time.monotonic() > deadline:
            reason = "the process exited" if ended else f"not within {timeout} s"
            message = f"waiting for {what}: {reason}"
            if detail is not None:
                message += f"\n{detail()}"
            if process is not None:
                code = process.process.poll()
                message += f"\n--- process output (exit {code}):\n{process.tail()}"
            raise AssertionError(message)
        time.sleep(0.05)
