"""Migrations: they build the schema the table definitions describe, on both databases, and
run down and up again; the SQLite connection settings that make a 200 durable are in force."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
import threading
from pathlib import Path

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import CheckConstraint, inspect, text

from relay.db.engine import create_engine
from relay.db.migrate import alembic_config, downgrade_to, head_revision, upgrade_to_head
from relay.db.tables import outbox
from tests.support import DatabaseFactory, execute_async, fetch_all


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_database_url(
    request: pytest.FixtureRequest, database_factory: DatabaseFactory, tmp_path: Path
) -> str:
    return database_factory.make(request.param, tmp_path, migrated=False).url


def _tables(url: str) -> set[str]:
    if url.startswith("sqlite"):
        rows = fetch_all(url, "SELECT name FROM sqlite_master WHERE type = 'table'")
    else:
        rows = fetch_all(url, "SELECT tablename AS name FROM pg_tables WHERE schemaname = 'public'")
    return {row["name"] for row in rows} - {"sqlite_sequence"}


def test_one_head() -> None:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert len(script.get_heads()) == 1
    assert head_revision() == script.get_current_head()


def test_migrations_match_the_table_definitions(empty_database_url: str) -> None:
    upgrade_to_head(empty_database_url)
    # Raises if autogenerate finds any difference between the database and relay.db.tables.
    command.check(alembic_config(empty_database_url))
    assert {"outbox", "delivery_requests", "alembic_version"} <= _tables(empty_database_url)
    [row] = fetch_all(empty_database_url, "SELECT version_num FROM alembic_version")
    assert row["version_num"] == head_revision()


def test_migrate_waits_for_a_lock_as_long_as_the_timeout_setting_says(tmp_path: Path) -> None:
    """`migrate` takes RELAY_DATABASE_TIMEOUT_SECONDS (here 8 s): a write lock another
    connection holds for 3 s, longer than the engine's default wait, is waited out."""
    path = tmp_path / "locked.sqlite3"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("PRAGMA journal_mode=WAL")
    holder.execute("BEGIN IMMEDIATE")
    timer = threading.Timer(3.0, lambda: holder.execute("ROLLBACK"))
    timer.start()
    try:
        upgrade = upgrade_to_head(f"sqlite+aiosqlite:///{path}", timeout_seconds=8.0)
    finally:
        timer.join()
        holder.close()
    assert upgrade.head == head_revision()
    assert "outbox" in _tables(f"sqlite+aiosqlite:///{path}")


def test_downgrade_to_base_and_up_again(empty_database_url: str) -> None:
    upgrade_to_head(empty_database_url)
    downgrade_to(empty_database_url, "base")
    assert _tables(empty_database_url) <= {"alembic_version"}
    upgrade_to_head(empty_database_url)
    assert {"outbox", "delivery_requests"} <= _tables(empty_database_url)


def test_the_rate_limits_migration_adds_an_empty_table_and_keeps_rows(
    empty_database_url: str,
) -> None:
    url = empty_database_url
    # Found by its file's name: its revision id is written in that file only.
    script = ScriptDirectory.from_config(alembic_config(url))
    [migration] = [
        revision
        for revision in script.walk_revisions()
        if revision.path.endswith("_rate_limits.py")
    ]
    assert isinstance(migration.down_revision, str)
    command.upgrade(alembic_config(url), migration.down_revision)
    _execute(url, _outbox_row("a" * 64, due=True))
    assert "rate_limits" not in _tables(url)

    command.upgrade(alembic_config(url), migration.revision)
    assert fetch_all(url, "SELECT * FROM rate_limits") == []
    assert [row["dedup_key"] for row in fetch_all(url, "SELECT dedup_key FROM outbox")] == [
        "a" * 64
    ]

    command.downgrade(alembic_config(url), migration.down_revision)
    assert "rate_limits" not in _tables(url)
    assert len(fetch_all(url, "SELECT id FROM outbox")) == 1


def test_sqlite_connections_are_wal_full_sync_with_busy_timeout(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/outbox.sqlite3"
    upgrade_to_head(url)

    async def pragmas() -> tuple[str, int, int]:
        engine = create_engine(url, timeout_seconds=1.5)
        try:
            async with engine.connect() as connection:
                mode = await connection.scalar(text("PRAGMA journal_mode"))
                synchronous = await connection.scalar(text("PRAGMA synchronous"))
                busy = await connection.scalar(text("PRAGMA busy_timeout"))
                return str(mode), int(synchronous or 0), int(busy or 0)
        finally:
            await engine.dispose()

    assert asyncio.run(pragmas()) == ("wal", 2, 1500)  # synchronous 2 is FULL


def _execute(url: str, *statements: str) -> None:
    asyncio.run(execute_async(url, *statements))


def _outbox_row(dedup_key: str, due: bool = False) -> str:
    """A pending row as migrations before 0006 allowed it; `due`: with the `next_attempt_at`
    that 0006's constraints require of it."""
    moment = "'2026-01-01 00:00:00'"
    columns = ", next_attempt_at" if due else ""
    due_at = f", {moment}" if due else ""
    return (
        "INSERT INTO outbox (dedup_key, message_id, source, resource, event, ordering_key,"
        f" occurred_at, received_at, last_received_at, payload, status{columns}) VALUES"
        f" ('{dedup_key}', 'aircall-{dedup_key}', 'default', 'call', 'call.hungup', 'call:1',"
        f" {moment}, {moment}, {moment}, '{{}}', 'pending'{due_at})"
    )


def test_0004_drops_the_message_id_index_and_keeps_rows_views_and_ids(
    empty_database_url: str,
) -> None:
    url = empty_database_url
    command.upgrade(alembic_config(url), "0003")
    _execute(url, _outbox_row("a" * 64), _outbox_row("b" * 64))
    # The newest rows were purged: the next receipt id must still come after them.
    _execute(url, "DELETE FROM outbox WHERE dedup_key = '" + "b" * 64 + "'")

    command.upgrade(alembic_config(url), "0004")

    rows = fetch_all(url, "SELECT id, dedup_key, message_id FROM outbox")
    assert rows == [{"id": 1, "dedup_key": "a" * 64, "message_id": "aircall-" + "a" * 64}]
    assert fetch_all(url, "SELECT event, events FROM outbox_backlog") == [
        {"event": "call.hungup", "events": 1}
    ]
    assert [row["call_id"] for row in fetch_all(url, "SELECT * FROM calls_awaiting_call_ended")]
    _execute(url, _outbox_row("c" * 64))
    [new] = fetch_all(url, "SELECT id FROM outbox WHERE dedup_key = '" + "c" * 64 + "'")
    assert new["id"] == 3
    # The same messageId twice is no longer refused by the database itself (dedup_key still is).
    _execute(
        url,
        _outbox_row("d" * 64).replace("'aircall-" + "d" * 64, "'aircall-" + "a" * 64),
    )

    _execute(url, "DELETE FROM outbox WHERE dedup_key = '" + "d" * 64 + "'")
    command.downgrade(alembic_config(url), "0003")
    assert len(fetch_all(url, "SELECT id FROM outbox")) == 2
    with pytest.raises(Exception, match=r"(?i)unique"):
        _execute(
            url,
            _outbox_row("e" * 64).replace("'aircall-" + "e" * 64, "'aircall-" + "a" * 64),
        )


def _outbox_indexes(url: str) -> set[str]:
    if url.startswith("sqlite"):
        sql = "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'outbox'"
    else:
        sql = "SELECT indexname AS name FROM pg_indexes WHERE tablename = 'outbox'"
    return {row["name"] for row in fetch_all(url, sql)}


def test_0005_swaps_the_event_index_for_a_partial_one_and_keeps_rows(
    empty_database_url: str,
) -> None:
    url = empty_database_url
    command.upgrade(alembic_config(url), "0004")
    _execute(url, _outbox_row("a" * 64))
    dropped = {
        "ix_outbox_ordering_key_occurred_at",
        "ix_outbox_status_next_attempt_at",
        "ix_outbox_event_received_at",
    }
    assert dropped <= _outbox_indexes(url)

    command.upgrade(alembic_config(url), "0005")

    indexes = _outbox_indexes(url)
    assert not dropped & indexes
    assert "ix_outbox_call_hungup_received_at" in indexes
    assert [row["dedup_key"] for row in fetch_all(url, "SELECT dedup_key FROM outbox")] == [
        "a" * 64
    ]
    assert [row["call_id"] for row in fetch_all(url, "SELECT * FROM calls_awaiting_call_ended")]

    command.downgrade(alembic_config(url), "0004")
    indexes = _outbox_indexes(url)
    assert dropped <= indexes
    assert "ix_outbox_call_hungup_received_at" not in indexes


def _check_constraints(url: str) -> set[str]:
    async def names() -> set[str]:
        engine = create_engine(url, timeout_seconds=2.0)
        try:
            async with engine.connect() as connection:
                found = await connection.run_sync(
                    lambda sync: inspect(sync).get_check_constraints("outbox")
                )
        finally:
            await engine.dispose()
        return {constraint["name"] for constraint in found}

    return asyncio.run(names())


def test_the_check_constraints_are_those_of_the_table_definitions(
    empty_database_url: str,
) -> None:
    # `alembic check` does not compare CHECK constraints: compared here, by name.
    upgrade_to_head(empty_database_url)
    declared = {
        str(constraint.name)
        for constraint in outbox.constraints
        if isinstance(constraint, CheckConstraint)
    }
    assert len(declared) == 10
    assert _check_constraints(empty_database_url) == declared


# Rows of every status as the relay writes them, then rows as SQL written by hand could leave
# them: each of the latter breaks one of migration 0006's constraints.
_ROW_COLUMNS = (
    "dedup_key, message_id, source, resource, event, ordering_key, occurred_at, received_at,"
    " last_received_at, payload, status, attempts, next_attempt_at, last_error, claimed_by,"
    " claimed_until, delivered_at"
)
_RECEIVED = "2026-01-01 00:00:00"
_STATES = {
    # name: (status, attempts, next_attempt_at, last_error, claimed_by, claimed_until,
    #        delivered_at)
    "pending": ("pending", 0, _RECEIVED, None, None, None, None),
    "retrying": ("pending", 2, "2026-01-01 00:01:00", "Segment answered 503", None, None, None),
    "delivering": ("delivering", 0, _RECEIVED, None, "vm:1:ab", "2026-01-01 00:02:00", None),
    "delivered": ("delivered", 1, None, None, None, None, "2026-01-01 00:00:07"),
    "dead": ("dead", 1, None, "Segment refused the message with 400", None, None, None),
    "skipped": ("skipped", 0, None, "filtered: event not forwarded", None, None, None),
    "requeued delivered": ("pending", 1, _RECEIVED, "requeued", None, None, "2026-01-01 00:00:07"),
    # Made by hand:
    "pending, never due": ("pending", 0, None, None, None, None, None),
    "delivering, no expiry": ("delivering", 0, _RECEIVED, None, "vm:1:ab", None, None),
    "delivering, no owner": ("delivering", 0, None, None, None, "2026-01-01 00:02:00", None),
    "delivering, never due": ("delivering", 0, None, None, "vm:1:ab", "2026-01-01 00:02:00", None),
    "pending, lease left": ("pending", 0, _RECEIVED, None, "vm:1:ab", "2026-01-01 00:02:00", None),
    "delivered, no time": ("delivered", 1, None, None, None, None, None),
    "dead, no reason": ("dead", 1, None, None, None, None, None),
    "skipped, no reason": ("skipped", 0, None, None, None, None, None),
    "negative attempts": ("pending", -3, _RECEIVED, None, None, None, None),
}
_MADE_BY_HAND = list(_STATES)[7:]


def _key(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def _insert_state(name: str, key: str | None = None) -> str:
    key = key or _key(name)
    values = (
        key, f"aircall-{key}", "default", "call", "call.hungup", f"call:{len(name)}", _RECEIVED,
        _RECEIVED, _RECEIVED, "{}", *_STATES[name],
    )  # fmt: skip
    literals = ", ".join(
        "NULL" if value is None else str(value) if isinstance(value, int) else f"'{value}'"
        for value in values
    )
    return f"INSERT INTO outbox ({_ROW_COLUMNS}) VALUES ({literals})"


def _rows_by_state(url: str) -> dict[str, dict[str, object]]:
    by_key = {_key(name): name for name in _STATES}
    columns = "id, status, attempts, next_attempt_at, last_error, claimed_by, claimed_until,"
    rows = fetch_all(url, f"SELECT dedup_key, {columns} delivered_at FROM outbox")
    return {by_key.get(key, key): row for row in rows if (key := row.pop("dedup_key"))}


def test_0006_mends_rows_made_by_hand_then_refuses_them_and_keeps_every_row(
    empty_database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = empty_database_url
    command.upgrade(alembic_config(url), "0005")
    _execute(url, *(_insert_state(name) for name in _STATES), _outbox_row("z" * 64))
    # The newest row was purged: the next receipt id must still come after it.
    _execute(url, "DELETE FROM outbox WHERE dedup_key = '" + "z" * 64 + "'")
    before = _rows_by_state(url)
    indexes = _outbox_indexes(url)

    with caplog.at_level(logging.WARNING, logger="relay_migrations"):
        command.upgrade(alembic_config(url), "0006")

    after = _rows_by_state(url)
    assert after.keys() == before.keys()
    # The relay's own rows are untouched, ids included.
    for name in list(_STATES)[:7]:
        assert after[name] == before[name], name
    # Each row made by hand is mended in the way that loses nothing.
    mended = {name: after[name] for name in _MADE_BY_HAND}
    assert mended["pending, never due"]["next_attempt_at"] is not None
    # Its lease expiring gives it back to pending as it is: it must be due then.
    assert mended["delivering, never due"]["next_attempt_at"] is not None
    assert mended["delivering, never due"]["claimed_by"] == "vm:1:ab"
    for name in ("delivering, no expiry", "delivering, no owner"):
        assert mended[name]["status"] == "pending"  # given back: sent again, same messageId
        assert mended[name]["next_attempt_at"] is not None
        assert mended[name]["claimed_by"] is None and mended[name]["claimed_until"] is None
    assert mended["pending, lease left"]["claimed_by"] is None
    assert mended["pending, lease left"]["claimed_until"] is None
    assert mended["delivered, no time"]["delivered_at"] is not None
    assert mended["dead, no reason"]["last_error"] == (
        "dead before migration 0006, reason not recorded"
    )
    assert mended["skipped, no reason"]["last_error"] == (
        "skipped before migration 0006, reason not recorded"
    )
    assert mended["negative attempts"]["attempts"] == 0
    warnings = [record.getMessage() for record in caplog.records]
    assert (
        "migration 0006 mended 2 row(s): delivering without a whole lease, given back as pending"
        in warnings
    )
    assert len(warnings) == 6, warnings
    # Nothing else changed: indexes (the partial one too), views, the receipt counter.
    assert _outbox_indexes(url) == indexes
    assert fetch_all(url, "SELECT count(*) AS n FROM outbox_dead") == [{"n": 2}]
    assert [row["call_id"] for row in fetch_all(url, "SELECT * FROM calls_awaiting_call_ended")]
    _execute(url, _insert_state("pending", key="c" * 64))
    [new] = fetch_all(url, "SELECT id FROM outbox WHERE dedup_key = '" + "c" * 64 + "'")
    assert new["id"] == len(_STATES) + 2
    # Now the database refuses such rows: here a pending row that would never be due.
    never_due = "UPDATE outbox SET next_attempt_at = NULL WHERE dedup_key = '" + "c" * 64 + "'"
    with pytest.raises(Exception, match="ck_outbox_pending_or_delivering_has_next_attempt_at"):
        _execute(url, never_due)

    command.downgrade(alembic_config(url), "0005")
    assert _check_constraints(url) == {"ck_outbox_status", "ck_outbox_received_count"}
    assert _outbox_indexes(url) == indexes
    assert _rows_by_state(url).keys() == {*after, "c" * 64}
    assert fetch_all(url, "SELECT count(*) AS n FROM outbox_dead") == [{"n": 2}]
    _execute(url, never_due)  # accepted at 0005, and mended by the next upgrade
    command.upgrade(alembic_config(url), "head")
    assert len(_check_constraints(url)) == 10  # and 0008's origin
    [row] = fetch_all(
        url, "SELECT next_attempt_at FROM outbox WHERE dedup_key = '" + "c" * 64 + "'"
    )
    assert row["next_attempt_at"] is not None


def test_0008_marks_existing_rows_webhook_adds_reconcile_runs_and_goes_down(
    empty_database_url: str,
) -> None:
    url = empty_database_url
    command.upgrade(alembic_config(url), "0007")
    _execute(url, _outbox_row("a" * 64, due=True))
    indexes = _outbox_indexes(url)

    command.upgrade(alembic_config(url), "0008")
    assert fetch_all(url, "SELECT dedup_key, origin FROM outbox") == [
        {"dedup_key": "a" * 64, "origin": "webhook"}
    ]
    assert fetch_all(url, "SELECT * FROM reconcile_runs") == []
    assert fetch_all(url, "SELECT * FROM last_reconcile_run") == []
    assert _outbox_indexes(url) == indexes  # the column is added in place, indexes untouched
    with pytest.raises(Exception, match="ck_outbox_origin"):
        _execute(url, "UPDATE outbox SET origin = 'guessed'")
    _execute(
        url,
        "INSERT INTO reconcile_runs (window_since, window_until, backfill, calls_seen, missing,"
        " awaiting_call_ended, not_yet_due, backfilled, errors, started_at, finished_at, outcome)"
        " VALUES ('2026-01-01 00:00:00', '2026-01-02 00:00:00', true, 5, 1, 1, 0, 2, 0,"
        " '2026-01-02 00:00:01', '2026-01-02 00:00:02', 'complete')",
    )
    [last] = fetch_all(url, "SELECT calls_seen, backfilled, outcome FROM last_reconcile_run")
    assert last == {"calls_seen": 5, "backfilled": 2, "outcome": "complete"}

    command.downgrade(alembic_config(url), "0007")
    assert "reconcile_runs" not in _tables(url)
    assert [row["dedup_key"] for row in fetch_all(url, "SELECT * FROM outbox")] == ["a" * 64]
    assert "origin" not in fetch_all(url, "SELECT * FROM outbox")[0]
    assert _outbox_indexes(url) == indexes
