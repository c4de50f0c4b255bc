"""The receiver contract (PRODUCT §3-4), every row, over real HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from relay.aircall import SEGMENT_CATALOGUE_EVENTS, dedup_key, message_id_for
from tests.conftest import make_settings
from tests.support import (
    SAMPLE_TOKEN,
    SECOND_TOKEN,
    OutboxDatabase,
    ReceiverThread,
    running_receiver,
    sample,
    sample_events,
)

WEBHOOK = "/aircall/webhook"
JSON = {"content-type": "application/json"}


@pytest.fixture
def receiver(database: OutboxDatabase) -> Iterator[ReceiverThread]:
    with running_receiver(make_settings(database)) as running:
        yield running


@pytest.fixture
def client(receiver: ReceiverThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=receiver.url, timeout=10) as http:
        yield http


def post(client: httpx.Client, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(WEBHOOK, content=content, headers=headers or JSON)


def assert_error(response: httpx.Response, status: int, error: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error
    assert isinstance(body["detail"], str) and body["detail"]
    return body


# --- 200: stored ------------------------------------------------------------------------------


def test_forwarded_event_is_stored_pending_with_every_column(
    client: httpx.Client, database: OutboxDatabase
) -> None:
    body = sample("call.created")
    response = post(client, body)
    assert response.status_code == 200
    assert response.json()["status"] == "stored"

    [row] = database.rows()
    expected_key = dedup_key("call", "call.created", body["timestamp"], body["data"])
    assert row["id"] == response.json()["id"]
    assert row["dedup_key"] == expected_key
    assert row["message_id"] == message_id_for(expected_key)
    assert row["source"] == "main"
    assert (row["resource"], row["event"], row["resource_id"]) == (
        "call",
        "call.created",
        "1903456789",
    )
    assert row["ordering_key"] == "call:1903456789"
    assert row["status"] == "pending"
    assert row["received_count"] == 1
    assert row["attempts"] == 0
    assert not row["late"]
    assert row["last_error"] is None
    payload = row["payload"] if isinstance(row["payload"], dict) else json.loads(row["payload"])
    assert "token" not in payload
    assert payload == {key: value for key, value in body.items() if key != "token"}


def test_occurred_at_is_the_aircall_timestamp_in_utc(
    client: httpx.Client, database: OutboxDatabase
) -> None:
    post(client, sample("call.ended"))
    [row] = database.rows(
        "SELECT occurred_at, received_at, last_received_at, next_attempt_at FROM outbox"
    )
    text = str(row["occurred_at"])
    # 1773151668 is 2026-03-10 14:07:48 UTC; readable as such in sqlite3 and psql.
    assert text.startswith("2026-03-10 14:07:48"), text
    assert row["received_at"] == row["last_received_at"]


def test_all_26_sample_events_are_stored(client: httpx.Client, database: OutboxDatabase) -> None:
    events = sample_events()
    assert sorted(events) == sorted(SEGMENT_CATALOGUE_EVENTS)
    for event in events:
        response = post(client, sample(event))
        assert response.status_code == 200, (event, response.text)
        assert response.json()["status"] == "stored", event
    rows = database.rows("SELECT event, status, ordering_key FROM outbox ORDER BY id")
    assert [row["event"] for row in rows] == events
    assert {row["status"] for row in rows} == {"pending"}
    assert all(row["ordering_key"].split(":")[0] == row["event"].split(".")[0] for row in rows)


# --- 200: duplicates --------------------------------------------------------------------------


def test_same_event_again_counts_without_a_new_row(
    client: httpx.Client, database: OutboxDatabase
) -> None:
    first = post(client, sample("call.hungup"))
    again = post(client, sample("call.hungup"))
    assert first.json()["status"] == "stored"
    assert again.status_code == 200
    assert again.json() == {"status": "duplicate", "id": first.json()["id"]}
    [row] = database.rows()
    assert row["received_count"] == 2
    assert row["last_received_at"] >= row["received_at"]


def test_other_key_order_and_spacing_is_the_same_event(
    client: httpx.Client, database: OutboxDatabase
) -> None:
    body = sample("call.answered")
    post(client, body)
    reordered = {key: body[key] for key in reversed(list(body))}
    reordered["data"] = {key: body["data"][key] for key in reversed(list(body["data"]))}
    spaced = json.dumps(reordered, indent=4).encode()
    response = post(client, spaced)
    assert response.json()["status"] == "duplicate"
    assert database.count() == 1


def test_same_event_under_a_second_token_is_the_same_event(
    client: httpx.Client, database: OutboxDatabase
) -> None:
    body = sample("contact.updated")
    post(client, body)
    body["token"] = SECOND_TOKEN
    response = post(client, body)
    assert response.status_code == 200
    assert response.json()["status"] == "duplicate"
    [row] = database.rows()
    assert row["received_count"] == 2
    assert row["source"] == "main"  # the label of the first receipt stays


def test_a_changed_field_is_another_event(client: httpx.Client, database: OutboxDatabase) -> None:
    body = sample("call.tagged")
    post(client, body)
    body["data"]["tags"] = []
    assert post(client, body).json()["status"] == "stored"
    assert database.count() == 2


def test_fifty_concurrent_copies_give_one_row_counted_fifty_times(
    receiver: ReceiverThread, database: OutboxDatabase
) -> None:
    content = json.dumps(sample("call.ended")).encode()

    def send(_: int) -> httpx.Response:
        with httpx.Client(base_url=receiver.url, timeout=30) as http:
            return http.post(WEBHOOK, content=content, headers=JSON)

    with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
        responses = list(pool.map(send, range(50)))
    assert [response.status_code for response in responses] == [200] * 50
    statuses = sorted(response.json()["status"] for response in responses)
    assert statuses == ["duplicate"] * 49 + ["stored"]
    assert len({response.json()["id"] for response in responses}) == 1
    [row] = database.rows()
    assert row["received_count"] == 50


# --- 200: skipped -----------------------------------------------------------------------------


def test_known_event_outside_the_forward_list_is_skipped_with_the_reason(
    client: httpx.Client, database: OutboxDatabase
) -> None:
    body = sample("call.hungup")
    body["event"] = "call.hold"
    response = post(client, body)
    assert response.status_code == 200
    assert response.json()["status"] == "skipped"
    [row] = database.rows()
    assert row["status"] == "skipped"
    assert row["next_attempt_at"] is None
    assert "RELAY_FORWARD_EVENTS" in row["last_error"]
    assert row["last_error"].startswith("filtered")


def test_unknown_event_is_skipped_and_named_unknown(
    client: httpx.Client, database: OutboxDatabase
) -> None:
    body = sample("call.hungup")
    body["event"] = "call.teleported"
    assert post(client, body).json()["status"] == "skipped"
    [row] = database.rows()
    assert row["last_error"].startswith("unknown event")


def test_empty_forward_list_skips_everything(database: OutboxDatabase) -> None:
    with (
        running_receiver(make_settings(database, forward_events=frozenset())) as running,
        httpx.Client(base_url=running.url) as http,
    ):
        assert post(http, sample("call.created")).json()["status"] == "skipped"
    assert [row["status"] for row in database.rows()] == ["skipped"]


def test_forward_list_can_name_newer_events(database: OutboxDatabase) -> None:
    settings = make_settings(database, forward_events=frozenset({"call.comm_assets_generated"}))
    body = sample("call.ended")
    body["event"] = "call.comm_assets_generated"
    with running_receiver(settings) as running, httpx.Client(base_url=running.url) as http:
        assert post(http, body).json()["status"] == "stored"
        assert post(http, sample("call.created")).json()["status"] == "skipped"


# --- 401 --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    [None, "", "not-the-token-at-all-xxxxxxxxxx", SAMPLE_TOKEN[:-1], SAMPLE_TOKEN + "0", 12345],
    ids=["missing", "empty", "unknown", "prefix", "longer", "number"],
)
def test_missing_or_unknown_token_is_401_and_stores_nothing(
    client: httpx.Client, database: OutboxDatabase, token: Any
) -> None:
    body = sample("call.created")
    if token is None:
        del body["token"]
    else:
        body["token"] = token
    response = post(client, body)
    assert_error(response, 401, "unauthorized")
    assert SAMPLE_TOKEN not in response.text
    assert database.count() == 0


def test_bad_token_is_401_even_when_the_envelope_is_also_bad(
    client: httpx.Client, database: OutboxDatabase
) -> None:
    assert_error(post(client, {"token": "wrong-token-wrong-token"}), 401, "unauthorized")
    assert database.count() == 0


# --- 400 --------------------------------------------------------------------------------------


def _with(field: str, value: Any) -> dict[str, Any]:
    body = sample("call.created")
    body[field] = value
    return body


def _without(field: str) -> dict[str, Any]:
    body = sample("call.created")
    del body[field]
    return body


BAD_BODIES: dict[str, bytes] = {
    "truncated": json.dumps(sample("call.created")).encode()[:-20],
    "array": json.dumps([sample("call.created")]).encode(),
    "string": b'"call.created"',
    "null": b"null",
    "empty": b"",
    "invalid_utf8": b'{"token": "' + SAMPLE_TOKEN.encode() + b'", "event": "\xff\xfe"}',
    "nan": b'{"token": "' + SAMPLE_TOKEN.encode() + b'", "timestamp": NaN}',
    "deeply_nested": b'{"token": "x", "data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "trailing_garbage": json.dumps(sample("call.created")).encode() + b" {}",
    "lone_surrogate": json.dumps(sample("call.created"))
    .encode()
    .replace(b'"direction": "inbound"', b'"direction": "\\ud800"'),
}

BAD_ENVELOPES: dict[str, dict[str, Any]] = {
    "resource_missing": _without("resource"),
    "event_missing": _without("event"),
    "timestamp_missing": _without("timestamp"),
    "data_missing": _without("data"),
    "resource_number": _with("resource", 3),
    "resource_object": _with("resource", {}),
    "resource_too_long": _with("resource", "r" * 65),
    "resource_nul": _with("resource", "ca\x00ll"),
    "event_too_long": _with("event", "call." + "x" * 124),
    "event_escape_sequence": _with("event", "call.created\x1b[2J"),
    "event_empty": _with("event", ""),
    "event_object": _with("event", {"name": "call.created"}),
    "timestamp_string": _with("timestamp", "1773151326"),
    "timestamp_float": _with("timestamp", 1773151326.5),
    "timestamp_boolean": _with("timestamp", True),
    "timestamp_milliseconds": _with("timestamp", 1773151326000000),
    "timestamp_negative": _with("timestamp", -1),
    "data_array": _with("data", [1, 2]),
    "data_null": _with("data", None),
    "data_id_nul": _with("data", {"id": "1903\x00456789"}),
    "data_id_of_65_digits": _with("data", {"id": 10**64}),
}


@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_body_that_is_not_one_json_object_is_400(
    client: httpx.Client, database: OutboxDatabase, name: str
) -> None:
    assert_error(post(client, BAD_BODIES[name]), 400, "invalid_body")
    assert database.count() == 0
    assert post(client, sample("call.created")).status_code == 200  # still serving


@pytest.mark.parametrize("name", list(BAD_ENVELOPES))
def test_envelope_field_missing_or_of_the_wrong_type_is_400(
    client: httpx.Client, database: OutboxDatabase, name: str
) -> None:
    body = assert_error(post(client, BAD_ENVELOPES[name]), 400, "invalid_envelope")
    field = name.split("_")[0]
    assert body["detail"].startswith(field), body
    assert database.count() == 0


# --- 413 / 415 --------------------------------------------------------------------------------


def test_ten_megabyte_body_is_413_and_the_server_keeps_serving(
    client: httpx.Client, database: OutboxDatabase
) -> None:
    body = sample("call.created")
    body["data"]["padding"] = "x" * (10 * 1024 * 1024)
    assert_error(post(client, body), 413, "payload_too_large")
    assert database.count() == 0
    assert post(client, sample("call.created")).status_code == 200


def test_oversized_chunked_body_without_length_is_413(
    client: httpx.Client, database: OutboxDatabase
) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"token": "' + SAMPLE_TOKEN.encode() + b'", "data": "'
        for _ in range(40):
            yield b"y" * 16384
        yield b'"}'

    response = client.post(WEBHOOK, content=chunks(), headers=JSON)
    assert_error(response, 413, "payload_too_large")
    assert database.count() == 0


def test_chunked_body_within_the_limit_is_read_whole_and_stored(
    client: httpx.Client, database: OutboxDatabase
) -> None:
    """A body without Content-Length arrives in several pieces; the route joins them."""
    content = json.dumps(sample("call.created")).encode()

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(content), 100):
            yield content[start : start + 100]

    response = client.post(WEBHOOK, content=chunks(), headers=JSON)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "stored"
    assert database.count() == 1


def test_body_just_under_the_limit_is_accepted(database: OutboxDatabase) -> None:
    settings = make_settings(database, max_body_bytes=8192)
    body = sample("call.created")
    base = len(json.dumps(body).encode())
    body["data"]["padding"] = "z" * (8192 - base - len(', "padding": ""'))
    content = json.dumps(body).encode()
    assert len(content) == 8192
    with running_receiver(settings) as running, httpx.Client(base_url=running.url) as http:
        assert post(http, content).status_code == 200
        assert_error(post(http, content + b" "), 413, "payload_too_large")


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "application/xml", None],
)
def test_content_type_other_than_json_is_415(
    client: httpx.Client, database: OutboxDatabase, content_type: str | None
) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    response = client.post(WEBHOOK, content=json.dumps(sample("call.created")), headers=headers)
    assert_error(response, 415, "unsupported_media_type")
    assert database.count() == 0


def test_json_with_charset_parameter_is_accepted(client: httpx.Client) -> None:
    headers = {"content-type": "application/json; charset=utf-8"}
    assert post(client, sample("call.created"), headers).status_code == 200


# --- identity and exactness -------------------------------------------------------------------


def test_ids_above_two_to_the_53_keep_every_digit(
    client: httpx.Client, database: OutboxDatabase
) -> None:
    huge = 2**64 + 7
    body = sample("call.created")
    body["data"]["id"] = huge
    body["data"]["number"]["id"] = 2**53 + 1
    assert post(client, body).status_code == 200
    [row] = database.rows()
    assert row["resource_id"] == str(huge)
    assert row["ordering_key"] == f"call:{huge}"
    raw = database.rows("SELECT CAST(payload AS TEXT) AS payload FROM outbox")[0]["payload"]
    assert str(huge) in raw and str(2**53 + 1) in raw
    assert json.loads(raw)["data"]["id"] == huge


def test_token_is_never_stored(client: httpx.Client, database: OutboxDatabase) -> None:
    body = sample("call.ended")
    body["data"]["note"] = "nothing secret here"
    post(client, body)
    for row in database.rows("SELECT CAST(payload AS TEXT) AS payload, source FROM outbox"):
        assert SAMPLE_TOKEN not in row["payload"]
        assert row["source"] == "main"


# --- health, readiness, metrics ---------------------------------------------------------------


def test_healthz_and_readyz(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"


def test_readyz_is_503_when_the_schema_is_not_at_head(
    database_factory: Any, tmp_path: Any, request: pytest.FixtureRequest
) -> None:
    unmigrated = database_factory.sqlite(tmp_path, migrated=False)
    with running_receiver(make_settings(unmigrated)) as running:
        response = httpx.get(running.url + "/readyz")
        assert response.status_code == 503
        assert response.json()["schema_revision"] is None
        assert response.json()["expected_revision"]


def test_metrics_count_webhooks_by_event_and_outcome(
    client: httpx.Client, receiver: ReceiverThread
) -> None:
    post(client, sample("call.created"))
    post(client, sample("call.created"))
    post(client, {"token": "nope-nope-nope-nope"})
    text = httpx.get(receiver.metrics_url).text
    assert 'relay_webhooks_total{event="call.created",outcome="stored"} 1.0' in text
    assert 'relay_webhooks_total{event="call.created",outcome="duplicate"} 1.0' in text
    assert 'relay_webhooks_total{event="none",outcome="unauthorized"} 1.0' in text
    assert "relay_webhook_duplicates_total 1.0" in text


def test_the_webhook_path_takes_post_only(client: httpx.Client, database: OutboxDatabase) -> None:
    response = client.get(WEBHOOK)
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "POST"
    assert database.count() == 0
    assert post(client, sample("call.created")).status_code == 200


def test_a_failure_inside_the_route_is_a_json_500_and_the_server_keeps_serving(
    client: httpx.Client, receiver: ReceiverThread, database: OutboxDatabase
) -> None:
    state = receiver.app.extensions["relay"]
    label_for = state.tokens.label_for

    def broken(token: str | None) -> str | None:
        raise RuntimeError("a bug")

    state.tokens.label_for = broken
    try:
        assert_error(post(client, sample("call.created")), 500, "internal_error")
    finally:
        state.tokens.label_for = label_for
    assert database.count() == 0
    assert post(client, sample("call.created")).status_code == 200


def test_metrics_have_a_port_of_their_own(client: httpx.Client, receiver: ReceiverThread) -> None:
    """The webhook port (public) neither shows the metrics nor reads the database for them; the
    metrics port (loopback) serves nothing else."""
    assert_error(client.get("/metrics"), 404, "not_found")
    metrics_port = receiver.metrics_url.removesuffix("/metrics")
    assert_error(httpx.post(metrics_port + WEBHOOK, content=b"{}", headers=JSON), 404, "not_found")
    assert_error(httpx.get(metrics_port + "/healthz"), 404, "not_found")
    assert client.get("/healthz").status_code == 200
    assert httpx.get(receiver.metrics_url).status_code == 200
