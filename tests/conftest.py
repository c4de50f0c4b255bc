"""Fixtures shared by every tier of tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.settings import AircallToken, Secret, Settings
from tests.support import SAMPLE_TOKEN, SECOND_TOKEN, DatabaseFactory, OutboxDatabase


@pytest.fixture(scope="session")
def database_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DatabaseFactory]:
    factory = DatabaseFactory(tmp_path_factory.mktemp("templates"))
    yield factory
    factory.cleanup()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database(
    request: pytest.FixtureRequest, database_factory: DatabaseFactory, tmp_path: Path
) -> OutboxDatabase:
    """A migrated outbox database: every test using it runs on SQLite and on PostgreSQL."""
    return database_factory.make(request.param, tmp_path)


@pytest.fixture
def sqlite_database(database_factory: DatabaseFactory, tmp_path: Path) -> OutboxDatabase:
    return database_factory.sqlite(tmp_path)


@pytest.fixture
def postgres_database(database_factory: DatabaseFactory) -> OutboxDatabase:
    return database_factory.postgresql()


def make_settings(database: OutboxDatabase, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": database.url,
        "aircall_tokens": (
            AircallToken("main", Secret(SAMPLE_TOKEN)),
            AircallToken("second", Secret(SECOND_TOKEN)),
        ),
        "log_format": "json",
        "shutdown_grace_seconds": 5.0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
