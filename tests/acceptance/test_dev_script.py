"""`python3 dev.py run`, the README's first command, as a user on a terminal stops it: Ctrl-C,
which the terminal sends to the whole process group (dev.py and the relay it started)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.acceptance.processes import relay_env
from tests.support import SAMPLE_TOKEN, OutboxDatabase

ROOT = Path(__file__).resolve().parents[2]


def test_ctrl_c_stops_dev_py_run_cleanly(sqlite_database: OutboxDatabase) -> None:
    env = relay_env(sqlite_database.url, aircall_tokens=f"local:{SAMPLE_TOKEN}")
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "dev.py"), "run", "--port", "0"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a process group of its own, as a terminal's foreground job
    )
    lines: list[str] = []
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            assert line, "dev.py run exited early:\n" + "".join(lines)
            lines.append(line)
            if line.startswith("{") and json.loads(line).get("event") == "listening":
                break
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    everything = "".join(lines) + output
    assert process.returncode == 0, everything
    assert "Traceback" not in everything
    assert '"stopped"' in output
