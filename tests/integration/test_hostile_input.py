"""Hostile and unusual webhooks, end to end, on SQLite and PostgreSQL (issue 10, faults 1 and 8).

What the outbox keeps in columns must be storable the same on both databases: a NUL or another
control character in `resource`, `event` or `data.id`, or one too long for its column, is refused
at the door with 400, under concurrent load, and its neighbours are stored. A NUL deep in `data`
or in a key is JSON both databases hold: stored, mapped and delivered as sent. One nesting limit
at the door. Every stored row, however deep (rows stored before the limit, or written by hand),
can be shown, listed and copied; human output escapes control characters.
"""

from __future__ import annotations

import concurrent.futures
import json
import random
import re
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import sqlalchemy as sa

from relay import aircall
from relay.db.delivery import DeliveryStore
from relay.db.engine import create_engine, writer
from relay.db.store import OutboxStore
from relay.drainer.loop import Drainer
from relay.drainer.sender import SegmentSender
from relay.json_text import indent_json
from relay.segment import MappingOptions
from relay.testing import FakeSegment, SourceConfig
from tests.acceptance.processes import relay_env, run_relay
from tests.conftest import make_settings
from tests.integration.test_drainer import FAST, WRITE_KEY
from tests.support import (
    SAMPLE_TOKEN,
    DatabaseFactory,
    OutboxDatabase,
    ReceiverThread,
    call_lifecycle,
    running_receiver,
    sample,
)
from tests.support import incoming_event as incoming

WEBHOOK = "/aircall/webhook"
JSON = {"content-type": "application/json"}
# The drainer tests' settings, with no settle window: what is stored is deliverable at once.
ONCE = replace(FAST, settle_seconds=0)


@pytest.fixture
def receiver(database: OutboxDatabase) -> Iterator[ReceiverThread]:
    with running_receiver(make_settings(database)) as running:
        yield running


@pytest.fixture
def fake() -> Iterator[FakeSegment]:
    with FakeSegment(write_keys={WRITE_KEY: SourceConfig()}) as server:
        yield server


def _webhook(**fields: Any) -> dict[str, Any]:
    body = sample("call.created")
    body.update(fields)
    return body


def _with_data(**fields: Any) -> dict[str, Any]:
    body = sample("call.created")
    body["data"].update(fields)
    return body


# Each refused with 400 `invalid_envelope`, the detail starting with these words.
REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "nul_in_event": (
        _webhook(event="call.cre\x00ated"),
        "event: contains the control character U+0000",
    ),
    "nul_in_resource": (_webhook(resource="ca\x00ll"), "resource: contains the control character"),
    "newline_in_event": (_webhook(event="call.created\n"), "event: contains the control character"),
    "nul_in_a_string_id": (_with_data(id="1903\x00456789"), "data.id: contains the control"),
    "id_of_65_digits": (_with_data(id=10**64), "data.id: an integer too long to be a resource id"),
    "resource_too_long": (_webhook(resource="r" * 65), "resource: 65 characters, longer than"),
    "event_too_long": (_webhook(event="call." + "x" * 124), "event: 129 characters, longer than"),
}

# JSON that both databases hold as JSON text (`\u0000` in the stored text): stored with 200.
STORED: dict[str, dict[str, Any]] = {
    "nul_deep_in_data": _with_data(id=70001, notes={"lines": ["first", "se\x00cond"]}),
    "nul_in_a_key": _with_data(id=70002, **{"ke\x00y": "value", "tags": [{"na\x00me": "\x00"}]}),
}


def _post(url: str, body: dict[str, Any] | bytes) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with httpx.Client(base_url=url, timeout=30) as http:
        return http.post(WEBHOOK, content=content, headers=JSON)


def _payload(row: dict[str, Any]) -> Any:
    value = row["payload"]
    return value if isinstance(value, dict) else json.loads(value)


def _without_token(body: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in body.items() if key != "token"}


# --- fault 1: refused at the door, neighbours stored ---------------------------------------------


def test_bodies_the_outbox_cannot_hold_are_refused_and_their_neighbours_all_stored(
    receiver: ReceiverThread, database: OutboxDatabase
) -> None:
    """Sixteen clients send 240 ordinary webhooks while each hostile body is sent five times
    (Aircall retries): every ordinary one is stored with 200, whichever commit batch it shares
    with a hostile one."""
    ordinary = []
    for call in range(20):
        for body in call_lifecycle(5_000 + call):
            ordinary.append(("ordinary", {**body, "token": SAMPLE_TOKEN}))
    hostile = [(name, body) for name, (body, _) in REFUSED.items() for _ in range(5)]
    hostile += [(name, body) for name, body in STORED.items() for _ in range(5)]
    requests = ordinary + hostile
    random.Random(10).shuffle(requests)

    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(pool.map(lambda request: _post(receiver.url, request[1]), requests))

    answers: dict[str, list[httpx.Response]] = {}
    for (name, _), response in zip(requests, responses, strict=True):
        answers.setdefault(name, []).append(response)
    assert [response.status_code for response in answers["ordinary"]] == [200] * 240
    assert {response.json()["status"] for response in answers["ordinary"]} == {"stored"}
    for name, (_, detail) in REFUSED.items():
        for response in answers[name]:
            assert response.status_code == 400, (name, response.text)
            assert response.json()["error"] == "invalid_envelope"
            assert response.json()["detail"].startswith(detail), (name, response.text)
    for name in STORED:
        statuses = sorted(response.json()["status"] for response in answers[name])
        assert [response.status_code for response in answers[name]] == [200] * 5, name
        assert statuses == ["duplicate"] * 4 + ["stored"], name

    assert database.count() == 240 + len(STORED)
    rows = {row["resource_id"]: row for row in database.rows()}
    for body in STORED.values():
        row = rows[str(body["data"]["id"])]
        assert row["received_count"] == 5
        assert _payload(row) == _without_token(body)


@pytest.mark.anyio
async def test_nul_deep_in_data_and_in_keys_is_delivered_and_shown_as_sent(
    receiver: ReceiverThread, database: OutboxDatabase, fake: FakeSegment
) -> None:
    for body in STORED.values():
        assert _post(receiver.url, body).status_code == 200
    await _drain_once(database, fake)

    fake.assert_no_discards()
    messages = {message["properties"]["call_id"]: message for message in fake.events()}
    assert set(messages) == {70001, 70002}
    assert messages[70001]["properties"]["notes"] == {"lines": ["first", "se\x00cond"]}
    assert messages[70002]["properties"]["ke\x00y"] == "value"
    assert messages[70002]["properties"]["tags"] == [{"na\x00me": "\x00"}]
    rows = await database.rows_async("SELECT id, status, message_id FROM outbox ORDER BY id")
    assert {row["status"] for row in rows} == {"delivered"}
    assert {row["message_id"] for row in rows} == {m["messageId"] for m in messages.values()}

    env = relay_env(database.url)
    for row, body in zip(rows, STORED.values(), strict=True):
        shown = run_relay("outbox", "show", str(row["id"]), "--json", env=env)
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["payload"] == _without_token(body)
        human = run_relay("outbox", "show", str(row["id"]), env=env)
        assert human.returncode == 0, human.stderr
        assert "\\u0000" in human.stdout and "\x00" not in human.stdout


async def _drain_once(database: OutboxDatabase, fake: FakeSegment) -> None:
    engine = create_engine(database.url, timeout_seconds=2.0)
    sender = SegmentSender(fake.base_url, WRITE_KEY, 5.0, max_connections=2)
    try:
        drainer = Drainer(DeliveryStore(engine), sender, ONCE, MappingOptions())
        with anyio.fail_after(60):
            await drainer.run(anyio.Event(), once=True)
    finally:
        await sender.close()
        await engine.dispose()


# --- fault 8: one nesting limit, at the door ----------------------------------------------------


def _nested(levels: int, call_id: int) -> dict[str, Any]:
    """A webhook `levels` deep: the body object is level 1, `data` level 2, then objects."""
    inner: Any = "innermost"
    for _ in range(levels - 2):
        inner = {"k": inner}
    body = _with_data(id=call_id)
    body["data"]["nested"] = inner
    return body


@pytest.mark.anyio
async def test_one_nesting_limit_at_the_door_logged_and_counted(
    receiver: ReceiverThread, database: OutboxDatabase, fake: FakeSegment
) -> None:
    at_limit = _nested(aircall.MAX_NESTING, 80001)
    assert _post(receiver.url, at_limit).status_code == 200
    too_deep = [aircall.MAX_NESTING + 1, 975, 976, 977]
    for levels in too_deep:
        response = _post(receiver.url, _raw_nested(levels))
        assert response.status_code == 400, (levels, response.text)
        assert response.json() == {
            "error": "invalid_body",
            "detail": f"the JSON is nested too deeply: the relay accepts at most "
            f"{aircall.MAX_NESTING} levels (the body object is level 1)",
        }
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(receiver.metrics_url)).text
    assert f'relay_webhooks_total{{event="none",outcome="invalid_body"}} {len(too_deep)}.0' in (
        metrics
    )
    assert len(await database.rows_async()) == 1

    # The body at the limit goes all the way: mapped, validated, accepted by Segment.
    await _drain_once(database, fake)
    fake.assert_no_discards()
    [message] = fake.events()
    assert message["properties"]["nested"] == at_limit["data"]["nested"]


def _raw_nested(levels: int) -> bytes:
    arrays = levels - 2
    body = json.dumps(_with_data(id=80002, nested="@")).encode()
    return body.replace(b'"@"', b"[" * arrays + b"]" * arrays)


# --- fault 8: every stored row shown, listed and copied; terminals protected ---------------------


async def _store(database: OutboxDatabase, body: dict[str, Any]) -> int:
    engine = create_engine(database.url, timeout_seconds=2.0)
    try:
        [row] = await OutboxStore(engine).insert_events([incoming(body, datetime.now(UTC))])
    finally:
        await engine.dispose()
    return row.id


async def _rewrite(database: OutboxDatabase, row_id: int, **values: str) -> None:
    """Change a stored row by hand, as rows stored before this version could be."""
    engine = create_engine(database.url, timeout_seconds=2.0)
    json_cast = "CAST(:payload AS json)" if engine.dialect.name == "postgresql" else ":payload"
    assignments = ", ".join(
        f"{name} = {json_cast if name == 'payload' else ':' + name}" for name in values
    )
    try:
        async with writer(engine).begin() as connection:
            await connection.execute(
                sa.text(f"UPDATE outbox SET {assignments} WHERE id = :id"), {"id": row_id, **values}
            )
    finally:
        await engine.dispose()


def _deep_payload_text(levels: int) -> str:
    """The stored text of a payload nested `levels` deep (the payload object is level 1)."""
    head = '{"resource":"call","event":"call.created","timestamp":1773151326,"data":{"id":9,"n":'
    return head + '{"k":' * (levels - 2) + '"innermost"' + "}" * (levels - 2) + "}}"


@pytest.mark.anyio
@pytest.mark.parametrize("levels", [975, 3_000])
async def test_rows_deeper_than_the_limit_are_shown_listed_and_copied(
    database: OutboxDatabase, database_factory: DatabaseFactory, tmp_path: Path, levels: int
) -> None:
    """975 levels: what the receiver stored before the limit; 3,000: written by hand."""
    body = sample("call.created")
    del body["token"]
    row_id = await _store(database, body)
    stored = _deep_payload_text(levels)
    await _rewrite(database, row_id, payload=stored)
    env = relay_env(database.url)

    human = run_relay("outbox", "show", str(row_id), env=env)
    assert human.returncode == 0, human.stderr[-2000:]
    assert '"innermost"' in human.stdout
    assert "delivery requests (0)" in human.stdout
    as_json = run_relay("outbox", "show", str(row_id), "--json", env=env)
    assert as_json.returncode == 0, as_json.stderr[-2000:]
    assert indent_json(as_json.stdout)  # one JSON object, checked without recursion
    # The payload in it is the stored text, laid out: the same once whitespace is removed.
    shown_payload = as_json.stdout.split('"payload": ', 1)[1].split(',\n  "status"', 1)[0]
    assert re.sub(r"\s", "", shown_payload) == stored
    listed = run_relay("outbox", "list", env=env)
    assert listed.returncode == 0 and "call.created" in listed.stdout

    (tmp_path / "copy").mkdir()
    target = database_factory.sqlite(tmp_path / "copy")
    copied = run_relay("outbox", "copy", "--from", database.url, env=relay_env(target.url))
    assert copied.returncode == 0, copied.stderr[-2000:]
    [row] = await target.rows_async("SELECT CAST(payload AS TEXT) AS payload FROM outbox")
    assert row["payload"] == stored  # byte for byte


HOSTILE_EVENT = "call.created\x1b]0;owned\x07\n\x1b[2J\x9b31mX"
HOSTILE_TEXT = "del\x7f next-line\x85 csi\x9b"


@pytest.mark.anyio
async def test_control_characters_are_escaped_in_human_output_and_exact_in_json(
    database: OutboxDatabase,
) -> None:
    """A row stored before names were checked (or by hand): `outbox list`, `show` and `stats`
    never write its control characters to the terminal; `--json` gives them exactly."""
    body = _with_data(id=90001, comment=HOSTILE_TEXT)
    del body["token"]
    row_id = await _store(database, body)
    await _rewrite(database, row_id, event=HOSTILE_EVENT)
    env = relay_env(database.url)
    escaped_event = "call.created\\x1b]0;owned\\x07\\n\\x1b[2J\\x9b31mX"

    for command in (["list"], ["show", str(row_id)], ["stats"]):
        result = run_relay("outbox", *command, env=env)
        assert result.returncode == 0, result.stderr
        # Nothing but printable text and line breaks reaches the terminal.
        assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]", result.stdout), command
        assert escaped_event in result.stdout, (command, result.stdout)
    shown = run_relay("outbox", "show", str(row_id), env=env).stdout
    assert '"comment": "del\\u007f next-line\\u0085 csi\\u009b"' in shown

    listed = run_relay("outbox", "list", "--json", env=env)
    assert [json.loads(line)["event"] for line in listed.stdout.splitlines()] == [HOSTILE_EVENT]
    as_json = run_relay("outbox", "show", str(row_id), "--json", env=env).stdout
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]", as_json)
    row = json.loads(as_json)
    assert row["event"] == HOSTILE_EVENT
    assert row["payload"]["data"]["comment"] == HOSTILE_TEXT


@pytest.mark.anyio
async def test_a_payload_written_by_hand_that_is_not_json_is_shown_as_stored(
    sqlite_database: OutboxDatabase,
) -> None:
    """SQLite keeps any text in `payload` (PostgreSQL's `json` refuses it): `show` still
    answers, with the text as stored and why it is not shown laid out."""
    body = sample("call.created")
    del body["token"]
    row_id = await _store(sqlite_database, body)
    await _rewrite(sqlite_database, row_id, payload='{"data": {"id": 1} trailing')
    env = relay_env(sqlite_database.url)

    human = run_relay("outbox", "show", str(row_id), env=env)
    assert human.returncode == 0, human.stderr
    assert (
        "payload (not JSON: expected ',' or a closing bracket at character 19; shown as stored):\n"
        '{"data": {"id": 1} trailing\n'
    ) in human.stdout
    as_json = json.loads(run_relay("outbox", "show", str(row_id), "--json", env=env).stdout)
    assert as_json["payload"] is None
    assert as_json["payload_text"] == '{"data": {"id": 1} trailing'
    assert as_json["payload_error"].startswith("not JSON")
