"""Migrations: they build the schema the table definitions describe, on both databases, and
run down and up again; the SQLite connection settings that make a 200 durable are in force."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import text

from relay.db.engine import create_engine
from relay.db.migrate import alembic_config, downgrade_to, head_revision, upgrade_to_head
from tests.support import DatabaseFactory, fetch_all


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
    _execute(url, _outbox_row("a" * 64))
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
    async def run() -> None:
        engine = create_engine(url)
        try:
            async with engine.begin() as connection:
                for statement in statements:
                    await connection.execute(text(statement))
        finally:
            await engine.dispose()

    asyncio.run(run())


def _outbox_row(dedup_key: str) -> str:
    return (
        "INSERT INTO outbox (dedup_key, message_id, source, resource, event, ordering_key,"
        " occurred_at, received_at, last_received_at, payload, status) VALUES"
        f" ('{dedup_key}', 'aircall-{dedup_key}', 'default', 'call', 'call.hungup', 'call:1',"
        " '2026-01-01 00:00:00', '2026-01-01 00:00:00', '2026-01-01 00:00:00', '{}', 'pending')"
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
