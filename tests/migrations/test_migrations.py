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
