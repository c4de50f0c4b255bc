"""`aircall-relay demo`: a first run that shows the whole flow, as a new user would see it."""

from __future__ import annotations

import re
import sqlite3

from tests.acceptance.processes import relay_env, run_relay
from tests.support import CALL_LIFECYCLE_SAMPLES


def test_demo_delivers_the_shuffled_call_in_order_and_shows_the_sql() -> None:
    result = run_relay("demo", "--seed", "7", env=relay_env("unused"), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout
    assert output.count("-> 200 stored") == 12
    assert "-> 200 duplicate" in output
    assert "-> 401 unauthorized" in output
    delivered = re.findall(r"^\s+\d+\. (call\.\w+)\s", output, flags=re.MULTILINE)
    assert delivered == list(CALL_LIFECYCLE_SAMPLES)
    [path] = re.findall(r"^outbox: (\S+)$", output, flags=re.MULTILINE)
    assert f"sqlite3 {path}" in output
    with sqlite3.connect(path) as connection:
        rows = connection.execute(
            "SELECT status, sum(received_count) FROM outbox GROUP BY status"
        ).fetchall()
    assert rows == [("delivered", 13)]
