"""Test helpers shared by every tier: databases (SQLite files, PostgreSQL databases), the sample
payloads, a receiver served over real HTTP in a background thread, and SQL queries for checks.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import threading
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from relay.aircall import SAMPLE_CALL_EVENTS, Envelope, message_id_for
from relay.database_url import normalise_database_url
from relay.db.migrate import upgrade_to_head
from relay.segment import OutboxEvent
from relay.testing.sample_payloads import SAMPLES_DIRECTORY, sample_files, sample_payload
from relay.testing.sample_payloads import sample_events as sample_events

if TYPE_CHECKING:
    from relay.testing import FakeSegmentState

ROOT = Path(__file__).resolve().parents[1]
# The sample payloads the package ships (relay/testing/samples/), for parametrized tests (a test
# checks that all 26 are there, so that a missing one fails rather than skips).
EXAMPLES = SAMPLES_DIRECTORY
SAMPLE_FILES = sample_files()
SAMPLE_TOKEN = "7c2e91a04bd35f6e8a1d0c9b47f2e6a3"
SECOND_TOKEN = "f00dfeedf00dfeedf00dfeedf00dfeed"
POSTGRES_ADMIN_URL = os.environ.get(
    "RELAY_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)


def sample(event: str) -> dict[str, Any]:
    """A fresh copy of the sample payload of `event`, with the token of the tests' first
    Aircall webhook (`SAMPLE_TOKEN`), as Aircall sends it."""
    try:
        return sample_payload(event, token=SAMPLE_TOKEN)
    except LookupError as error:
        pytest.fail(str(error))


# ---------------------------------------------------------------------------------------------
# PostgreSQL


_postgres_state: dict[str, str | None] = {}


def postgres_unavailable_reason() -> str | None:
    """None when the server answers; else why not (cached for the session)."""
    if "reason" not in _postgres_state:

        async def probe() -> None:
            engine = create_async_engine(POSTGRES_ADMIN_URL, connect_args={"timeout": 3})
            try:
                async with engine.connect() as connection:
                    await connection.execute(text("SELECT 1"))
            finally:
                await engine.dispose()

        try:
            asyncio.run(probe())
            _postgres_state["reason"] = None
        except Exception as error:
            _postgres_state["reason"] = f"no PostgreSQL at {POSTGRES_ADMIN_URL}: {error!r}"
    return _postgres_state["reason"]


def require_postgres() -> None:
    reason = postgres_unavailable_reason()
    if reason is None:
        return
    if os.environ.get("RELAY_TEST_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"{reason} (RELAY_TEST_REQUIRE_POSTGRES=1: PostgreSQL is required here)")
    pytest.skip(reason)


async def _admin(*statements: str) -> None:
    await execute_async(POSTGRES_ADMIN_URL, *statements, autocommit=True)


def postgres_url(database: str) -> str:
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
    return f"{base}/{database}"


def create_postgres_database(template: str | None = None) -> str:
    name = f"relay_t_{uuid.uuid4().hex[:12]}"
    clause = f" TEMPLATE {template}" if template else ""
    asyncio.run(_admin(f'CREATE DATABASE "{name}"{clause}'))
    return name


def drop_postgres_database(name: str) -> None:
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# ---------------------------------------------------------------------------------------------
# Queries for assertions


async def fetch_all_async(url: str, sql: str, **params: Any) -> list[dict[str, Any]]:
    engine = create_async_engine(normalise_database_url(url))
    try:
        async with engine.connect() as connection:
            result = await connection.execute(text(sql), params)
            return [dict(row._mapping) for row in result]
    finally:
        await engine.dispose()


def fetch_all(url: str, sql: str, **params: Any) -> list[dict[str, Any]]:
    return asyncio.run(fetch_all_async(url, sql, **params))


async def execute_async(url: str, *statements: str, autocommit: bool = False) -> None:
    """Run SQL `statements` in one transaction, as a person at a SQL prompt would (`autocommit`:
    each on its own, for those that cannot run in a transaction, such as CREATE DATABASE)."""
    options: dict[str, Any] = {"isolation_level": "AUTOCOMMIT"} if autocommit else {}
    engine = create_async_engine(normalise_database_url(url), **options)
    try:
        async with engine.begin() as connection:
            for statement in statements:
                await connection.execute(text(statement))
    finally:
        await engine.dispose()


def count_rows(url: str, table: str = "outbox") -> int:
    return int(fetch_all(url, f"SELECT count(*) AS n FROM {table}")[0]["n"])


# ---------------------------------------------------------------------------------------------
# Making a database refuse writes, for real


async def refuse_rows_of_event(database: OutboxDatabase, event: str) -> None:
    """Add a trigger that makes the database refuse every outbox row of `event` (SQLite: a
    constraint error; PostgreSQL: a PL/pgSQL RAISE): an error of one row's values, as a NUL
    byte in text or an over-long id is on PostgreSQL."""
    if database.kind == "sqlite":
        statements = [
            f"CREATE TRIGGER refuse_event BEFORE INSERT ON outbox WHEN NEW.event = '{event}' "
            "BEGIN SELECT RAISE(ABORT, 'row refused by a test trigger'); END"
        ]
    else:
        statements = [
            "CREATE FUNCTION refuse_event() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF NEW.event = '{event}' THEN RAISE EXCEPTION 'row refused by a test trigger'; "
            "END IF; RETURN NEW; END $$",
            "CREATE TRIGGER refuse_event BEFORE INSERT ON outbox FOR EACH ROW "
            "EXECUTE FUNCTION refuse_event()",
        ]
    engine = create_async_engine(normalise_database_url(database.url))
    try:
        async with engine.begin() as connection:
            for statement in statements:
                await connection.exec_driver_sql(statement)
    finally:
        await engine.dispose()


@asynccontextmanager
async def writes_held(database: OutboxDatabase) -> AsyncIterator[None]:
    """Hold the outbox's write lock from another connection until the end of the block: writes
    wait for it (up to their timeout); reads go on."""
    if database.kind == "sqlite":
        holder = sqlite3.connect(database.url.split("///", 1)[1], isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        return
    engine = create_async_engine(database.url)
    try:
        async with engine.connect() as connection:
            await connection.execute(text("LOCK TABLE outbox IN EXCLUSIVE MODE"))
            yield
            await connection.rollback()
    finally:
        await engine.dispose()


# ---------------------------------------------------------------------------------------------
# Databases for tests: a migrated template per session, copied for each test


@dataclass
class OutboxDatabase:
    kind: str  # "sqlite" or "postgresql"
    url: str

    def rows(
        self, sql: str = "SELECT * FROM outbox ORDER BY id", **params: Any
    ) -> list[dict[str, Any]]:
        return fetch_all(self.url, sql, **params)

    def count(self, table: str = "outbox") -> int:
        return count_rows(self.url, table)

    async def rows_async(
        self, sql: str = "SELECT * FROM outbox ORDER BY id", **params: Any
    ) -> list[dict[str, Any]]:
        return await fetch_all_async(self.url, sql, **params)


class DatabaseFactory:
    """Makes migrated databases quickly: SQLite by copying a migrated file, PostgreSQL by
    `CREATE DATABASE ... TEMPLATE` of a migrated template."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._sqlite_template: Path | None = None
        self._postgres_template: str | None = None
        self._created: list[str] = []

    def sqlite(self, directory: Path, migrated: bool = True) -> OutboxDatabase:
        path = directory / "outbox.sqlite3"
        if migrated:
            if self._sqlite_template is None:
                self._sqlite_template = self.workdir / "template.sqlite3"
                upgrade_to_head(f"sqlite+aiosqlite:///{self._sqlite_template}")
            shutil.copyfile(self._sqlite_template, path)
        return OutboxDatabase("sqlite", f"sqlite+aiosqlite:///{path}")

    def postgresql(self, migrated: bool = True) -> OutboxDatabase:
        require_postgres()
        if migrated and self._postgres_template is None:
            self._postgres_template = create_postgres_database()
            self._created.append(self._postgres_template)
            upgrade_to_head(postgres_url(self._postgres_template))
        name = create_postgres_database(self._postgres_template if migrated else None)
        self._created.append(name)
        return OutboxDatabase("postgresql", postgres_url(name))

    def make(self, kind: str, directory: Path, migrated: bool = True) -> OutboxDatabase:
        if kind == "sqlite":
            return self.sqlite(directory, migrated)
        return self.postgresql(migrated)

    def cleanup(self) -> None:
        for name in reversed(self._created):
            drop_postgres_database(name)
        self._created.clear()


# ---------------------------------------------------------------------------------------------
# A receiver over real HTTP, in a background thread of this process


class ReceiverThread:
    """Runs the real Quart app on Hypercorn in a thread with its own event loop."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings.with_overrides(port=0, receiver_metrics_port=0)
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="receiver", daemon=True)
        self.app: Any = None

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as error:
            self._error = error
            self._ready.set()

    async def _serve(self) -> None:
        from relay.compose import build_receiver_app
        from relay.receiver.serve import serve_in_process

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.app = build_receiver_app(self.settings)

        def listening(port: int) -> None:
            self.port = port
            self._ready.set()

        await serve_in_process(self.app, self.settings, self._stop.wait, on_listening=listening)

    def start(self) -> ReceiverThread:
        self._thread.start()
        if not self._ready.wait(30) or self.port is None:
            raise RuntimeError(f"receiver did not start: {self._error!r}")
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        """Where `GET /metrics` is answered: a port of its own."""
        return f"http://127.0.0.1:{self.app.extensions['relay'].metrics_port}/metrics"

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        if self._thread.is_alive():
            raise RuntimeError("receiver did not stop within 30 s")


@contextmanager
def running_receiver(settings: Any) -> Iterator[ReceiverThread]:
    receiver = ReceiverThread(settings).start()
    try:
        yield receiver
    finally:
        receiver.stop()


# ---------------------------------------------------------------------------------------------
# Event streams built from the samples


def call_lifecycle(call_id: int, shift_seconds: int = 0) -> list[dict[str, Any]]:
    """The sample call's twelve events, in life-cycle order, for call `call_id` (token removed).

    Their Aircall timestamps are the samples' (strictly increasing), shifted by `shift_seconds`.
    """
    events = []
    for name in SAMPLE_CALL_EVENTS:
        body = sample(name)
        del body["token"]
        body["data"]["id"] = call_id
        body["timestamp"] += shift_seconds
        events.append(body)
    return events


def incoming_event(
    body: dict[str, Any], received_at: Any, source: str = "main", forward: bool = True
) -> Any:
    """An `IncomingEvent` for `OutboxStore.insert_events`, as the receiver would build it from
    `body` (a webhook without its token) received at `received_at`, forwarded or (with
    `forward=False`) to be stored `skipped` with the receiver's reason."""
    from relay import aircall
    from relay.db.store import IncomingEvent

    envelope = aircall.validate_envelope(body)
    return IncomingEvent(
        dedup_key=envelope.dedup_key,
        message_id=envelope.message_id,
        source=source,
        resource=envelope.resource,
        event=envelope.event,
        resource_id=envelope.resource_id,
        ordering_key=envelope.ordering_key,
        occurred_at=envelope.occurred_at,
        received_at=received_at,
        payload=envelope.payload,
        forward=forward,
        skip_reason=None if forward else aircall.skip_reason(envelope.event),
    )


def aircall_call(call_id: int, shift_seconds: int) -> list[dict[str, Any]]:
    """A call's webhooks in the order they must reach Segment: Aircall timestamp, then the call
    life cycle for payloads built in the same second (a third of the calls ring in the second
    they are created, another third hang up in the second they are transferred)."""
    events = call_lifecycle(call_id, shift_seconds=shift_seconds)
    by_name = {body["event"]: body for body in events}
    if call_id % 3 == 0:
        by_name["call.ringing_on_agent"]["timestamp"] = by_name["call.created"]["timestamp"]
    elif call_id % 3 == 1:
        by_name["call.hungup"]["timestamp"] = by_name["call.transferred"]["timestamp"]
    timestamps = [body["timestamp"] for body in events]
    assert timestamps == sorted(timestamps)
    return events


# ---------------------------------------------------------------------------------------------
# What the fake Segment accepted, against what it should have


@dataclass(frozen=True)
class Backlog:
    bodies: list[dict[str, Any]]  # in receipt order (shuffled)
    expected: dict[int, list[str]]  # call id -> its messageIds in the order Segment must see

    @property
    def message_ids(self) -> set[str]:
        return {message_id for ids in self.expected.values() for message_id in ids}


def call_id_of(message: dict[str, Any]) -> int:
    return int(message["properties"]["call_id"])


def assert_accepted_once(fake: FakeSegmentState, message_ids: set[str]) -> None:
    """Every one of `message_ids` accepted once, nothing else, no discard."""
    ids = [message["messageId"] for message in fake.accepted()]
    twice = [message_id for message_id, n in Counter(ids).items() if n > 1]
    assert not twice, f"{len(twice)} messageIds accepted twice, e.g. {twice[:3]}"
    missing = message_ids - set(ids)
    assert not missing, f"{len(missing)} of {len(message_ids)} never accepted"
    unknown = set(ids) - message_ids
    assert not unknown, f"{len(unknown)} accepted messageIds are not ours"
    assert fake.discarded() == []


def assert_resends_are_copies(fake: FakeSegmentState) -> int:
    """Every duplicate the fake saw is a re-send of an accepted message (same messageId, event
    and call); returns how many there were."""
    duplicates = fake.duplicates()
    first = {message["messageId"]: message for message in fake.accepted()}
    for duplicate in duplicates:
        original = first.get(duplicate["messageId"])
        assert original is not None, f"a duplicate of a messageId not ours: {duplicate}"
        assert duplicate["message"]["event"] == original["event"]
        assert call_id_of(duplicate["message"]) == call_id_of(original)
    return len(duplicates)


def assert_accepted_exactly(fake: FakeSegmentState, backlog: Backlog) -> None:
    """Every messageId of the backlog accepted once, nothing else, no discard, and each call's
    events first accepted in the expected order."""
    assert_accepted_once(fake, backlog.message_ids)
    assert_first_accepted_in_order(fake, backlog.expected)


def assert_first_accepted_in_order(fake: FakeSegmentState, expected: dict[int, list[str]]) -> None:
    """The calls of `expected` (call id -> messageIds) had their events first accepted in that
    order."""
    by_call: dict[int, list[str]] = {}
    for message in fake.accepted():
        by_call.setdefault(call_id_of(message), []).append(message["messageId"])
    misordered = [call for call, ids in expected.items() if by_call.get(call) != ids]

    def short(ids: list[str] | None) -> list[str]:  # the first hex digits of each messageId
        return [message_id.removeprefix("aircall-")[:8] for message_id in ids or []]

    assert not misordered, (
        f"{len(misordered)} calls first accepted out of order, e.g. call "
        f"{misordered[0]}: expected {short(expected[misordered[0]])}, "
        f"got {short(by_call.get(misordered[0]))}"
    )


def outbox_event(body: dict[str, Any], payload: Any = None) -> OutboxEvent:
    """The OutboxEvent of a webhook body, computed the way the receiver stores its row; its
    payload the parsed one, or `payload` (e.g. the stored JSON text) when given. The envelope
    is not checked as the receiver checks it: mapping must map any stored row, rows stored
    before a check was added (a control character in `data.id`) included."""
    envelope = Envelope(
        resource=body["resource"],
        event=body["event"],
        timestamp=body["timestamp"],
        data=body["data"],
        payload={key: value for key, value in body.items() if key != "token"},
    )
    return OutboxEvent(
        message_id=message_id_for(envelope.dedup_key),
        resource=envelope.resource,
        event=envelope.event,
        resource_id=envelope.resource_id,
        occurred_at=envelope.occurred_at,
        payload=envelope.payload if payload is None else payload,
    )
