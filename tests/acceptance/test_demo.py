"""`aircall-relay demo`: a first run that shows the whole flow, as a new user would see it."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
from pathlib import Path

from relay.aircall import SAMPLE_CALL_EVENTS
from tests.acceptance.processes import VENV_BIN, relay_env, run_relay


def _new_user_env(tmp_path: Path) -> dict[str, str]:
    """As after `python3 dev.py demo`: the virtualenv's bin folder is not on PATH; temporary
    folders go to `tmp_path`, to see what is left behind."""
    env = relay_env("unused")
    folders = env.get("PATH", "").split(os.pathsep)
    env["PATH"] = os.pathsep.join(folder for folder in folders if Path(folder) != VENV_BIN)
    env["TMPDIR"] = str(tmp_path)
    return env


def _demo_folders(tmp_path: Path) -> list[Path]:
    return sorted(tmp_path.glob("aircall-relay-demo-*"))


def test_demo_delivers_the_shuffled_call_in_order_and_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    result = run_relay("demo", "--seed", "7", env=_new_user_env(tmp_path), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _demo_folders(tmp_path) == []
    output = result.stdout
    assert output.count("-> 200 stored") == 12
    assert "-> 200 duplicate" in output
    assert "-> 401 unauthorized" in output
    delivered = re.findall(r"^\s+\d+\. (call\.\w+)\s", output, flags=re.MULTILINE)
    assert delivered == list(SAMPLE_CALL_EVENTS)
    outbox = re.findall(r"^\s+\d+\s+(call\.\w+)\s+(\w+)\s+(\d+)$", output, flags=re.MULTILINE)
    assert [event for event, _, _ in outbox] == list(SAMPLE_CALL_EVENTS)
    assert {status for _, status, _ in outbox} == {"delivered"}
    assert sum(int(count) for _, _, count in outbox) == 13  # the duplicate is counted
    assert "--keep" in output


def test_demo_keep_prints_commands_that_work_as_printed(tmp_path: Path) -> None:
    env = _new_user_env(tmp_path)
    result = run_relay("demo", "--seed", "7", "--keep", env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout
    [folder] = _demo_folders(tmp_path)
    [path] = re.findall(r"^outbox: (\S+)$", output, flags=re.MULTILINE)
    assert Path(path) == folder / "outbox.sqlite3"
    with sqlite3.connect(path) as connection:
        rows = connection.execute(
            "SELECT status, sum(received_count) FROM outbox GROUP BY status"
        ).fetchall()
    assert rows == [("delivered", 13)]
    commands = [line.strip() for line in output.splitlines() if line.strip().startswith("RELAY_")]
    assert [command.rsplit(" ", 2)[1:] for command in commands] == [
        ["outbox", "stats"],
        ["outbox", "list"],
    ]
    for command in commands:  # in a shell whose PATH does not hold the virtualenv
        shown = subprocess.run(
            ["/bin/sh", "-c", command],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert shown.returncode == 0, command + "\n" + shown.stdout + shown.stderr
        assert "delivered" in shown.stdout
    assert f"sqlite3 {path}" in output
    assert f"rm -r {folder}" in output
