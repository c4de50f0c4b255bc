"""A database that cannot take the write: 503 with Retry-After, nothing half-written, and the
receiver recovers by itself once the database is back."""

from __future__ import annotations

import asyncio
import json
import sqlite3

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.conftest import make_settings
from tests.support import OutboxDatabase, running_receiver, sample

WEBHOOK = "/aircall/webhook"
JSON = {"content-type": "application/json"}


def _post(url: str, event: str) -> httpx.Response:
    return httpx.post(url + WEBHOOK, content=json.dumps(sample(event)), headers=JSON, timeout=30)


def _assert_503(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"].isdigit()
    assert response.json()["error"] == "database_unavailable"


def test_locked_sqlite_database_gives_503_and_stores_nothing(
    sqlite_database: OutboxDatabase,
) -> None:
    settings = make_settings(sqlite_database, database_timeout_seconds=0.3)
    path = sqlite_database.url.split("///", 1)[1]
    with running_receiver(settings) as receiver:
        holder = sqlite3.connect(path, isolation_level=None)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            _assert_503(_post(receiver.url, "call.created"))
            _assert_503(_post(receiver.url, "call.answered"))
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert sqlite_database.count() == 0
        # The lock is gone: the same webhooks (as Aircall retries them) are now stored.
        assert _post(receiver.url, "call.created").json()["status"] == "stored"
        assert _post(receiver.url, "call.answered").json()["status"] == "stored"
    assert sqlite_database.count() == 2


def test_unreachable_postgresql_gives_503(sqlite_database: OutboxDatabase) -> None:
    # Port 9 on loopback: nothing listens there, the connection is refused at once.
    settings = make_settings(
        sqlite_database,
        database_url="postgresql+asyncpg://postgres@127.0.0.1:9/none",
        database_timeout_seconds=0.5,
    )
    with running_receiver(settings) as receiver:
        _assert_503(_post(receiver.url, "call.created"))
        ready = httpx.get(receiver.url + "/readyz")
        assert ready.status_code == 503
        assert ready.json()["database"].startswith("unreachable")
        assert httpx.get(receiver.url + "/healthz").status_code == 200


def test_locked_postgresql_table_gives_503_and_stores_nothing(
    postgres_database: OutboxDatabase,
) -> None:
    settings = make_settings(postgres_database, database_timeout_seconds=0.3)
    with running_receiver(settings) as receiver:

        async def while_locked() -> list[httpx.Response]:
            engine = create_async_engine(postgres_database.url)
            try:
                async with engine.connect() as connection:
                    await connection.execute(text("LOCK TABLE outbox IN ACCESS EXCLUSIVE MODE"))
                    responses = [
                        await asyncio.to_thread(_post, receiver.url, event)
                        for event in ("call.created", "call.answered")
                    ]
                    await connection.rollback()
                    return responses
            finally:
                await engine.dispose()

        for response in asyncio.run(while_locked()):
            _assert_503(response)
        assert postgres_database.count() == 0
        assert _post(receiver.url, "call.created").json()["status"] == "stored"
    assert postgres_database.count() == 1
