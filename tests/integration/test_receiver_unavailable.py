"""A database that cannot take the write: 503 with Retry-After, nothing half-written, and the
receiver recovers by itself once the database is back. A row the database refuses fails only
its own webhooks, not the others of its group commit."""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.conftest import make_settings
from tests.support import (
    OutboxDatabase,
    refuse_rows_of_event,
    running_receiver,
    sample,
    writes_held,
)

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


# --- one row the database refuses (issue 10, fault 1) -----------------------------------------

POISONED = "call.poisoned"


async def _until(condition: Callable[[], bool], what: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        await asyncio.sleep(0.01)


def _call(event: str, call_id: int) -> dict[str, Any]:
    body = sample("call.created")
    body["event"] = event
    body["data"]["id"] = call_id
    return body


def test_a_row_the_database_refuses_fails_only_its_own_webhooks(
    database: OutboxDatabase,
) -> None:
    """Webhooks queued together behind a held write lock form one group commit. The database
    refuses the rows of one event (a trigger); only that event's webhooks get 503 and store
    nothing; every other one gets its normal answer, duplicates counted right."""
    asyncio.run(refuse_rows_of_event(database, POISONED))
    settings = make_settings(database, database_timeout_seconds=20)
    already = _call("call.created", 6_000_000_001)
    plug = _call("call.created", 6_000_000_002)
    fresh = [_call("call.answered", 6_000_000_100 + n) for n in range(30)]
    thrice = _call("call.hungup", 6_000_000_200)
    poisoned = [_call(POISONED, 6_000_000_300 + n) for n in range(2)]
    bodies = [*fresh, thrice, thrice, thrice, already, *poisoned, poisoned[0]]
    random.Random(10).shuffle(bodies)

    with running_receiver(settings) as receiver:
        batcher = receiver.app.extensions["relay"].batcher

        def post(body: dict[str, Any]) -> httpx.Response:
            return httpx.post(
                receiver.url + WEBHOOK, content=json.dumps(body), headers=JSON, timeout=60
            )

        assert post(already).json()["status"] == "stored"

        async def scenario() -> tuple[httpx.Response, list[httpx.Response]]:
            loop = asyncio.get_running_loop()
            with ThreadPoolExecutor(max_workers=len(bodies) + 1) as pool:
                async with writes_held(database):
                    first = loop.run_in_executor(pool, post, plug)
                    await _until(lambda: batcher.in_flight == 1, "the plug waits on the lock")
                    others = [loop.run_in_executor(pool, post, body) for body in bodies]
                    await _until(lambda: batcher.waiting == len(bodies), "all queued")
                return await first, list(await asyncio.gather(*others))

        plugged, responses = asyncio.run(scenario())

    assert plugged.json()["status"] == "stored"
    statuses: dict[int, list[Any]] = {}
    for body, response in zip(bodies, responses, strict=True):
        call_id = body["data"]["id"]
        if body["event"] == POISONED:
            _assert_503(response)
            statuses.setdefault(call_id, []).append(503)
        else:
            assert response.status_code == 200, response.text
            statuses.setdefault(call_id, []).append(response.json()["status"])
    assert statuses[6_000_000_300] == [503, 503]
    assert statuses[6_000_000_301] == [503]
    assert sorted(statuses[6_000_000_200]) == ["duplicate", "duplicate", "stored"]
    assert statuses[6_000_000_001] == ["duplicate"]
    assert all(statuses[6_000_000_100 + n] == ["stored"] for n in range(30))

    rows = database.rows("SELECT event, resource_id, received_count FROM outbox")
    assert not [row for row in rows if row["event"] == POISONED]
    counts = {int(row["resource_id"]): row["received_count"] for row in rows}
    assert len(counts) == 33
    assert counts[6_000_000_200] == 3
    assert counts[6_000_000_001] == 2
    assert counts[6_000_000_002] == 1


# --- the writer task (issue 10, fault 3) ------------------------------------------------------


def test_a_writer_task_that_ends_is_restarted_and_readyz_says_so_meanwhile(
    sqlite_database: OutboxDatabase,
) -> None:
    with running_receiver(make_settings(sqlite_database)) as receiver:
        batcher = receiver.app.extensions["relay"].batcher
        assert httpx.get(receiver.url + "/readyz").status_code == 200
        batcher._restart_seconds = 3.0  # a window wide enough to look into
        # The task ends as if something cancelled it from outside (anything but an Exception).
        batcher._loop.call_soon_threadsafe(batcher._task.cancel)
        deadline = time.monotonic() + 10
        while batcher.running or batcher.writer_restarts == 0:
            assert time.monotonic() < deadline, "the writer task did not end"
            time.sleep(0.01)
        ready = httpx.get(receiver.url + "/readyz")
        assert ready.status_code == 503
        assert ready.json()["writes"] == (
            "failing (the commit writer is not running (it is being restarted))"
        )
        # A webhook meanwhile waits for the restarted writer, within its bound.
        assert _post(receiver.url, "call.created").json()["status"] == "stored"
        assert httpx.get(receiver.url + "/readyz").status_code == 200
    assert sqlite_database.count() == 1
