"""The real `aircall-relay` command before it serves or drains (issue 10, items 9 and 10): a
schema not at head stops `serve`, `run` and `drain` before they listen or claim, with exit 3 and
what to do; `check` says, per role, what is missing, in sentences or JSON, with the database's
own message, and exit codes that tell a setting (2), the database (1) and the schema (3) apart.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from relay.db.engine import create_engine
from relay.db.migrate import head_revision
from tests.acceptance.processes import relay_env, run_relay
from tests.support import SAMPLE_TOKEN, DatabaseFactory, OutboxDatabase

TOKENS = f"main:{SAMPLE_TOKEN}"
WRITE_KEY = "wk_startup_checks_Hq4Vn8Zt2Lp6"
EVERYTHING = {"aircall_tokens": TOKENS, "segment_write_key": WRITE_KEY}
# What a command that went on to serve or drain logs: none of it may appear.
STARTED = ('"listening"', '"drainer_started"', '"claim_failed"', '"delivery_paused"')
COMMANDS = (
    ("serve", "--port", "0"),
    ("serve", "--port", "0", "--workers", "2"),
    ("run", "--port", "0"),
    ("drain",),
    ("drain", "--once"),
)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def unmigrated(
    request: pytest.FixtureRequest, database_factory: DatabaseFactory, tmp_path: Path
) -> OutboxDatabase:
    """An empty database, never migrated, on SQLite and on PostgreSQL."""
    return database_factory.make(request.param, tmp_path, migrated=False)


def _set_revision(database: OutboxDatabase, revision: str) -> None:
    """Make the database say its schema is at `revision` (as if migrated by another version)."""

    async def update() -> None:
        engine = create_engine(database.url, timeout_seconds=2.0)
        try:
            async with engine.begin() as connection:
                statement = text("UPDATE alembic_version SET version_num = :revision")
                await connection.execute(statement, {"revision": revision})
        finally:
            await engine.dispose()

    asyncio.run(update())


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_an_unmigrated_database_stops_the_command_before_it_listens_or_claims(
    unmigrated: OutboxDatabase, command: tuple[str, ...]
) -> None:
    result = run_relay(*command, env=relay_env(unmigrated.url, **EVERYTHING), timeout=30)
    output = result.stdout + result.stderr
    assert result.returncode == 3, output
    assert "no outbox schema" in result.stderr
    assert "run `aircall-relay migrate`" in result.stderr
    assert "Traceback" not in output
    for line in STARTED:
        assert line not in output
    for secret in (SAMPLE_TOKEN, WRITE_KEY):
        assert secret not in output


@pytest.mark.parametrize("command", [("serve", "--port", "0"), ("drain", "--once")], ids=" ".join)
def test_a_schema_behind_or_ahead_of_the_code_is_refused_saying_which(
    database: OutboxDatabase, command: tuple[str, ...]
) -> None:
    env = relay_env(database.url, **EVERYTHING)
    _set_revision(database, "0004")
    behind = run_relay(*command, env=env, timeout=30)
    assert behind.returncode == 3, behind.stdout + behind.stderr
    assert f"at revision 0004, older than this version's {head_revision()}" in behind.stderr
    assert "run `aircall-relay migrate`" in behind.stderr

    _set_revision(database, "9999")
    ahead = run_relay(*command, env=env, timeout=30)
    assert ahead.returncode == 3, ahead.stdout + ahead.stderr
    assert "at revision 9999, newer than this version knows" in ahead.stderr
    assert "aircall-relay migrate" not in ahead.stderr  # a newer version is needed instead
    for line in STARTED:
        assert line not in ahead.stdout + behind.stdout


def test_an_unreachable_database_stops_the_command_with_exit_1_and_its_message(
    tmp_path: Path,
) -> None:
    # A directory where the file should be: SQLite cannot open it.
    env = relay_env(f"sqlite:///{tmp_path}", **EVERYTHING)
    result = run_relay("drain", "--once", env=env, timeout=30)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "does not answer: unable to open database file" in result.stderr
    assert '"drainer_started"' not in result.stdout


# --- check ---------------------------------------------------------------------------------


def test_check_is_ready_only_with_what_each_role_needs(database: OutboxDatabase) -> None:
    receiver_only = relay_env(database.url, aircall_tokens=TOKENS)
    result = run_relay("check", "--role", "receiver", env=receiver_only)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("Ready for the receiver.")
    assert "1 Aircall token configured (labels: main)." in result.stdout

    # The default role is both: the drainer's write key is missing.
    result = run_relay("check", env=receiver_only)
    assert result.returncode == 2, result.stdout
    assert "Drainer: FAILED: RELAY_SEGMENT_WRITE_KEY: not set" in result.stdout
    assert "Not ready for the receiver and the drainer: 1 problem" in result.stdout

    # A drainer needs no Aircall token; `serve` does, and `check` says so (it said "ready").
    drainer_only = relay_env(database.url, segment_write_key=WRITE_KEY)
    assert run_relay("check", "--role", "drainer", env=drainer_only).returncode == 0
    result = run_relay("check", "--role", "receiver", env=drainer_only)
    assert result.returncode == 2, result.stdout
    assert "Receiver: FAILED: RELAY_AIRCALL_TOKENS" in result.stdout

    result = run_relay("check", env=relay_env(database.url, **EVERYTHING))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Schema: at revision {head_revision()}" in result.stdout
    assert result.stdout.strip().endswith("Ready for the receiver and the drainer.")
    for output in (result.stdout, result.stderr):
        assert "None" not in output  # sentences, not Python values
        assert SAMPLE_TOKEN not in output and WRITE_KEY not in output


def test_check_says_whether_aircalls_side_is_watched_and_never_fails_on_it(
    database: OutboxDatabase,
) -> None:
    api_token = "aircall-api-token-Zq81"
    without = relay_env(database.url, segment_write_key=WRITE_KEY)
    result = run_relay("check", "--role", "drainer", env=without)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Aircall: NOT CHECKED: RELAY_AIRCALL_API_ID and RELAY_AIRCALL_API_TOKEN" in result.stdout

    with_api = relay_env(
        database.url,
        segment_write_key=WRITE_KEY,
        aircall_api_id="aircall-api-id",
        aircall_api_token=api_token,
        aircall_api_url="https://api.aircall.example",
    )
    result = run_relay("check", "--role", "drainer", env=with_api)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        "Aircall: Aircall's Public API is set (https://api.aircall.example): the drainer probes "
        "Aircall's webhooks every 300 s" in result.stdout
    )
    assert api_token not in result.stdout + result.stderr
    result = run_relay("check", "--json", "--role", "drainer", env=with_api)
    statuses = {item["check"]: item["status"] for item in json.loads(result.stdout)["checks"]}
    assert statuses["aircall"] == "ok"

    # The receiver's role does not look at it.
    receiver = relay_env(database.url, aircall_tokens=TOKENS)
    assert "Aircall:" not in run_relay("check", "--role", "receiver", env=receiver).stdout


def test_check_json(database: OutboxDatabase) -> None:
    result = run_relay("check", "--json", env=relay_env(database.url, aircall_tokens=TOKENS))
    assert result.returncode == 2, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ready"] is False
    assert report["role"] == "all"
    assert report["exit_code"] == 2
    assert report["schema_revision"] == report["expected_revision"] == head_revision()
    statuses = {(item["check"], item["status"]) for item in report["checks"]}
    assert ("drainer", "failed") in statuses
    assert ("database", "ok") in statuses and ("schema", "ok") in statuses
    assert all(isinstance(item["message"], str) for item in report["checks"])

    _set_revision(database, "0004")
    result = run_relay("check", "--json", env=relay_env(database.url, **EVERYTHING))
    assert result.returncode == 3, result.stdout
    report = json.loads(result.stdout)
    assert (report["ready"], report["schema_revision"]) == (False, "0004")


@pytest.mark.postgres
def test_check_shows_the_databases_message_with_the_password_redacted(
    postgres_database: OutboxDatabase,
) -> None:
    password = "Pw-Zk29Lq7Xv3"
    missing = postgres_database.url.rsplit("/", 1)[1] + "_missing"
    url = make_url(postgres_database.url).set(password=password, database=missing)
    env = relay_env(url.render_as_string(hide_password=False), **EVERYTHING)
    result = run_relay("check", env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f'does not answer: database "{missing}" does not exist.' in result.stdout
    assert "Schema: NOT CHECKED" in result.stdout
    assert "DBAPIError" not in result.stdout
    assert password not in result.stdout + result.stderr
    report = json.loads(run_relay("check", "--json", env=env).stdout)
    assert report["exit_code"] == 1
    assert ":***@" in report["database"]


def test_check_calls_a_sqlite_url_without_a_file_a_configuration_error(tmp_path: Path) -> None:
    env = relay_env("sqlite://relative.db", **EVERYTHING)
    for command in (("check",), ("serve",)):
        result = run_relay(*command, env=env)
        assert result.returncode == 2, result.stdout + result.stderr
        assert (
            "configuration error: RELAY_DATABASE_URL: 'sqlite://relative.db' names no file"
            in result.stderr
        )
        assert "sqlite:///" in result.stderr  # how to write it
    report = json.loads(run_relay("check", "--json", env=env).stdout)
    assert report["exit_code"] == 2
    [settings] = report["checks"]
    assert settings["check"] == "settings"
    assert settings["message"].startswith("RELAY_DATABASE_URL: ")


def test_a_short_write_key_stops_the_drainer_naming_the_setting(
    sqlite_database: OutboxDatabase,
) -> None:
    short = "k3y"
    result = run_relay("drain", env=relay_env(sqlite_database.url, segment_write_key=short))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "RELAY_SEGMENT_WRITE_KEY: must be at least 8 characters" in result.stderr
    assert "k3y" not in result.stdout + result.stderr
