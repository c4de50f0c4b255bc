"""What the commands tell the operator (issue 10, faults 15 and 16): `--help` lists every `outbox`
action, `migrate` says what it did, `outbox copy` and `outbox purge` show their progress on
stderr (rewritten in place on a terminal, plain lines otherwise), never on stdout."""

from __future__ import annotations

import argparse
import asyncio
import os
import pty
import re
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory

from relay.cli import build_parser
from relay.db.engine import create_engine
from relay.db.migrate import alembic_config, downgrade_to, head_revision
from relay.db.store import OutboxStore
from tests.acceptance.processes import RELAY, relay_env, run_relay
from tests.support import DatabaseFactory, OutboxDatabase, call_lifecycle
from tests.support import incoming_event as incoming


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The sub-commands the parser really has."""
    [sub_commands] = [
        action for action in parser._actions if isinstance(action, argparse._SubParsersAction)
    ]
    return dict(sub_commands.choices)


def test_the_top_level_help_lists_every_outbox_action() -> None:
    outbox_actions = list(_actions(_actions(build_parser())["outbox"]))
    assert {"stats", "list", "show", "requeue", "purge", "copy"} <= set(outbox_actions)
    shown = run_relay("--help", env=relay_env("sqlite://"))
    assert shown.returncode == 0, shown.stderr
    help_text = " ".join(shown.stdout.split())  # argparse wraps lines
    assert f"outbox inspect and manage outbox rows ({', '.join(outbox_actions)})" in help_text


def test_migrate_says_what_it_applied_or_that_it_was_already_at_head(tmp_path: Path) -> None:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    revisions = [revision.revision for revision in reversed(list(script.walk_revisions()))]
    head = head_revision()
    assert revisions[-1] == head
    database = f"sqlite:///{tmp_path}/outbox.sqlite3"
    described = f"sqlite+aiosqlite:///{tmp_path}/outbox.sqlite3"
    env = relay_env(database)

    created = run_relay("migrate", env=env)
    assert created.returncode == 0, created.stderr
    assert created.stdout == (
        f"created the schema at head ({head}): applied {', '.join(revisions)} "
        f"(database: {described})\n"
    )
    again = run_relay("migrate", env=env)
    assert again.stdout == f"already at head ({head}), nothing to do (database: {described})\n"

    previous = revisions[-2]
    downgrade_to(described, previous)
    upgraded = run_relay("migrate", env=env)
    assert upgraded.stdout == (
        f"migrated from {previous} to head ({head}): applied {head} (database: {described})\n"
    )


def _skipped_rows(database: OutboxDatabase, count_calls: int, days_ago: float) -> int:
    """Store the sample call's events for `count_calls` calls, received `days_ago`, skipped."""

    async def store() -> int:
        engine = create_engine(database.url, timeout_seconds=2.0)
        received = datetime.now(UTC) - timedelta(days=days_ago)
        bodies = [body for call in range(count_calls) for body in call_lifecycle(call + 1)]
        try:
            await OutboxStore(engine).insert_events(
                [incoming(body, received, forward=False) for body in bodies]
            )
        finally:
            await engine.dispose()
        return len(bodies)

    return asyncio.run(store())


def _run_on_a_terminal(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """`aircall-relay <args>` with its stderr on a pseudo-terminal: (exit code, stdout, what the
    terminal received)."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [RELAY, *args], env=env, stdout=subprocess.PIPE, stderr=terminal, text=True
    )
    os.close(terminal)
    received = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the process closed the terminal's last end
            break
        if not chunk:
            break
        received += chunk
    os.close(controller)
    stdout, _ = process.communicate(timeout=60)
    return process.returncode, stdout, received.decode()


@pytest.fixture
def source(database_factory: DatabaseFactory, tmp_path: Path) -> tuple[OutboxDatabase, int]:
    (tmp_path / "source").mkdir()
    database = database_factory.sqlite(tmp_path / "source")
    return database, _skipped_rows(database, count_calls=3, days_ago=0)


def _empty_target(database_factory: DatabaseFactory, tmp_path: Path, name: str) -> OutboxDatabase:
    (tmp_path / name).mkdir()
    return database_factory.sqlite(tmp_path / name)


def test_copy_shows_progress_in_plain_lines_on_stderr_when_not_a_terminal(
    source: tuple[OutboxDatabase, int], database_factory: DatabaseFactory, tmp_path: Path
) -> None:
    database, rows = source
    target = _empty_target(database_factory, tmp_path, "target")
    copied = run_relay(
        "outbox", "copy", "--from", database.url, "--batch-size", "5",
        env=relay_env(target.url),
    )  # fmt: skip
    assert copied.returncode == 0, copied.stderr
    assert copied.stdout == f"copied {rows} outbox row(s) and 0 delivery request(s)\n"
    assert copied.stderr.splitlines() == [
        f"outbox rows: 0 of {rows} (0%)",
        f"outbox rows: {rows} of {rows} (100%)",
        "delivery requests: 0 of 0 (100%)",
    ]


def test_copy_rewrites_one_progress_line_on_a_terminal(
    source: tuple[OutboxDatabase, int], database_factory: DatabaseFactory, tmp_path: Path
) -> None:
    database, rows = source
    target = _empty_target(database_factory, tmp_path, "target")
    code, stdout, terminal = _run_on_a_terminal(
        "outbox", "copy", "--from", database.url, "--batch-size", "5",
        env=relay_env(target.url),
    )  # fmt: skip
    assert code == 0, terminal
    assert stdout == f"copied {rows} outbox row(s) and 0 delivery request(s)\n"
    assert terminal.startswith(f"\r[....................] outbox rows: 0 of {rows} (0%)")
    # Redrawn in place (`\r`), each kind of work ending its own line (`\r\n` on a terminal).
    assert f"\r[####################] outbox rows: {rows} of {rows} (100%)\r\n" in terminal
    assert terminal.endswith("\r[####################] delivery requests: 0 of 0 (100%)\r\n")
    assert re.sub(r"\r\[[#.]{20}\] [^\r]*", "", terminal) == "\r\n\r\n"


def test_purge_shows_progress_on_stderr_and_none_for_a_dry_run(
    database_factory: DatabaseFactory, tmp_path: Path
) -> None:
    database = database_factory.sqlite(tmp_path)
    rows = _skipped_rows(database, count_calls=2, days_ago=40)
    env = relay_env(database.url)
    dry = run_relay("outbox", "purge", "--skipped-older-than", "30", "--dry-run", env=env)
    assert (dry.returncode, dry.stderr) == (0, "")
    assert dry.stdout == f"would delete {rows} skipped row(s) older than 30 day(s)\n"

    purged = run_relay(
        "outbox", "purge", "--skipped-older-than", "30", "--batch-size", "4", env=env
    )
    assert purged.returncode == 0, purged.stderr
    assert purged.stdout == f"deleted {rows} skipped row(s) older than 30 day(s)\n"
    assert purged.stderr.splitlines() == [
        f"skipped rows: 0 of {rows} (0%)",
        f"skipped rows: {rows} of {rows} (100%)",
    ]
    assert database.count() == 0
