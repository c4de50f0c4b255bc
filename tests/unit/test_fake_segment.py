"""The fake Segment's rules and records (relay/testing/fake_segment.py): the 400s, write keys,
the 200 for dropped messages, validation, enrichment, dedup, the warehouse's reserved columns and
the inspection helpers. Requests go over real loopback HTTP with httpx; faults on the wire are in
tests/integration/test_fake_segment_http.py.
"""

from __future__ import annotations

import base64
import gzip
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from relay.testing import ChaosEntry, FakeSegment, FakeSegmentOptions, Fault, SourceConfig

WRITE_KEY = "write-key-0123456789abcdef012345"
START = datetime(2025, 1, 1, tzinfo=UTC)


class Clock:
    """The fake's clock, moved by hand."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def track(message_id: str | None = "m-1", **fields: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "type": "track",
        "event": "call.created",
        "userId": "user-1",
        "properties": {"call_id": 1},
    }
    if message_id is not None:
        message["messageId"] = message_id
    message.update(fields)
    return message


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake(clock: Clock) -> Iterator[FakeSegment]:
    with FakeSegment(clock=clock) as server:
        yield server


@pytest.fixture
def client(fake: FakeSegment) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.base_url, timeout=5) as http:
        yield http


def post_batch(
    client: httpx.Client, messages: list[Any], *, key: str = WRITE_KEY, **fields: Any
) -> httpx.Response:
    return client.post("/v1/batch", json={"batch": messages, **fields}, auth=(key, ""))


def accepted_ids(fake: FakeSegment) -> list[str]:
    return [message["messageId"] for message in fake.accepted()]


# What gets a 400 (nothing accepted, nothing discarded), and what is not the API


def _batch_over(size: int) -> bytes:
    body = json.dumps(
        {"writeKey": "k", "batch": [track(f"m-{i}", pad="a" * 26_000) for i in range(20)]}
    )
    assert len(body) > size
    return body.encode()


BAD_REQUESTS = [
    ("invalid_json", b"{not json", {}),
    ("invalid_json", b'{"batch": []} extra', {}),
    ("invalid_json", b'{"batch": [], "writeKey": "k", "n": NaN}', {}),
    ("not_an_object", b"[]", {}),
    ("body_too_large", _batch_over(512_000), {}),
    (
        "event_too_large",
        json.dumps({"writeKey": "k", "batch": [track("a"), track("b", pad="x" * 33_000)]}).encode(),
        {},
    ),
    ("unsupported_content_encoding", gzip.compress(b'{"batch": []}'), {"Content-Encoding": "gzip"}),
    ("missing_write_key", json.dumps({"batch": [track()]}).encode(), {}),
    ("missing_write_key", json.dumps({"batch": [track()], "writeKey": ""}).encode(), {}),
    (
        "missing_write_key",  # the key is the user name and the password must be empty
        json.dumps({"batch": [track()]}).encode(),
        {"Authorization": "Basic " + base64.b64encode(b"key:secret").decode()},
    ),
    ("batch_not_array", json.dumps({"batch": {"0": track()}, "writeKey": "k"}).encode(), {}),
]


@pytest.mark.parametrize(
    ("error", "content", "headers"),
    [pytest.param(*row, id=f"{row[0]}-{index}") for index, row in enumerate(BAD_REQUESTS)],
)
def test_bad_requests_get_a_plain_400_and_record_no_message(
    fake: FakeSegment, client: httpx.Client, error: str, content: bytes, headers: dict[str, str]
) -> None:
    headers = {"Content-Type": "application/json", **headers}
    response = client.post("/v1/batch", content=content, headers=headers)
    assert (response.status_code, response.text) == (400, "Bad Request")
    assert response.headers["content-type"] == "text/plain"
    assert fake.accepted() == fake.discarded() == []
    (entry,) = fake.requests()
    assert (entry["status"], entry["error"]) == (400, error)


def test_other_paths_and_methods_are_not_the_api(fake: FakeSegment, client: httpx.Client) -> None:
    assert client.post("/v1/track", json={**track(), "writeKey": "k"}).status_code == 404
    assert client.get("/v1/batch").status_code == 405
    assert client.post("/V1/Batch/", json={"batch": [track()], "writeKey": "k"}).status_code == 200
    assert len(fake.requests()) == 1


def test_an_element_of_exactly_32_kib_passes(fake: FakeSegment, client: httpx.Client) -> None:
    element = track("a", pad="")
    element["pad"] = "x" * (32_768 - len(json.dumps(element, separators=(",", ":"))))
    assert post_batch(client, [element]).status_code == 200
    element["pad"] += "x"
    assert post_batch(client, [element]).status_code == 400
    assert accepted_ids(fake) == ["a"]


# Write keys, and the 200 for what Segment drops


def test_valid_requests_answer_200_whatever_happens_to_their_messages(clock: Clock) -> None:
    write_keys = {
        "key-us": SourceConfig(),
        "key-off": SourceConfig(enabled=False),
        "key-eu": SourceConfig(region="eu"),
    }
    with (
        FakeSegment(write_keys=write_keys, max_batch_events=3, clock=clock) as fake,
        httpx.Client(base_url=fake.base_url) as http,
    ):
        batches = [
            [track("a", writeKey="unknown")],
            [track("b", writeKey="key-off")],
            [track("c", writeKey="key-eu")],
            [track("d", event=None)],
            [track("e"), track("e")],
            [track(f"f-{i}") for i in range(4)],
        ]
        for batch in batches:
            response = post_batch(http, batch, key="key-us")
            assert (response.status_code, response.json()) == (200, {"success": True})
        reasons = [item["reason"] for item in fake.discarded()]
        assert reasons == [
            "unknown_source",
            "source_disabled",
            "wrong_region",
            "event_not_defined",
            *["batch_too_many_events"] * 4,
        ]
        assert [item["messageId"] for item in fake.duplicates()] == ["e"]
        assert accepted_ids(fake) == ["e"]


def test_write_key_precedence_message_then_body_then_basic(
    fake: FakeSegment, client: httpx.Client
) -> None:
    basic = {"Authorization": "Basic " + base64.b64encode(b"basic-key").decode()}
    client.post("/v1/batch", json={"batch": [track("a")]}, headers=basic)
    client.post(
        "/v1/batch",
        json={"batch": [track("b", writeKey="own-key"), track("c")], "writeKey": "body-key"},
        headers=basic,
    )
    keys = [message["writeKey"] for message in fake.accepted()]
    assert keys == ["basic-key", "own-key", "body-key"]
    assert fake.requests()[0]["flags"] == ["basic_without_colon"]  # tolerated, flagged


def test_unknown_key_policy_401_is_a_debugging_aid() -> None:
    with (
        FakeSegment(write_keys={"known": SourceConfig()}, unknown_key_policy="401") as fake,
        httpx.Client(base_url=fake.base_url) as http,
    ):
        assert post_batch(http, [track()], key="other").status_code == 401
        assert post_batch(http, [track()], key="known").status_code == 200


def test_a_content_type_other_than_json_is_only_flagged(
    fake: FakeSegment, client: httpx.Client
) -> None:
    body = json.dumps({"batch": [track()], "writeKey": "k"}).encode()
    assert (
        client.post("/v1/batch", content=body, headers={"Content-Type": "text/plain"}).status_code
        == 200
    )
    client.post(
        "/v1/batch", content=body, headers={"Content-Type": "Application/JSON; charset=utf-8"}
    )
    assert [entry["flags"] for entry in fake.requests()] == [["bad_content_type"], []]


# Per-message processing


def test_batch_context_integrations_and_sent_at_apply_to_each_message(
    fake: FakeSegment, client: httpx.Client
) -> None:
    post_batch(
        client,
        [
            track(
                "a",
                context={"ip": "1.1.1.1"},
                integrations={"All": False},
                sentAt="2024-12-31T00:00:00Z",
            ),
            track("b"),
        ],
        context={"ip": "9.9.9.9", "library": {"name": "relay"}},
        integrations={"All": True, "Mixpanel": False},
        sentAt="2025-01-01T00:00:00Z",
    )
    first, second = fake.accepted()
    assert first["context"] == {"ip": "1.1.1.1", "library": {"name": "relay"}}
    assert first["integrations"] == {"All": False, "Mixpanel": False}
    assert first["sentAt"] == "2024-12-31T00:00:00Z"
    assert second["context"] == {"ip": "9.9.9.9", "library": {"name": "relay"}}
    assert second["sentAt"] == "2025-01-01T00:00:00Z"


@pytest.mark.parametrize("body", [{"batch": []}, {}, {"batch": None}])
def test_empty_batch_is_a_request_level_discard(
    fake: FakeSegment, client: httpx.Client, body: dict[str, Any]
) -> None:
    assert client.post("/v1/batch", json={**body, "writeKey": WRITE_KEY}).status_code == 200
    (discard,) = fake.discarded()
    assert (discard["level"], discard["reason"]) == ("request", "empty_batch")


INVALID_MESSAGES: list[tuple[str, Any]] = [
    ("invalid_type", {"event": "e", "userId": "u"}),
    ("invalid_type", {"type": "purchase", "event": "e", "userId": "u"}),
    ("invalid_type", "not an object"),
    ("no_user_anon_id", {"type": "track", "event": "e"}),
    ("no_user_anon_id", {"type": "track", "event": "e", "userId": None, "anonymousId": None}),
    ("id_not_string", {"type": "track", "event": "e", "userId": ""}),
    ("id_not_string", {"type": "track", "event": "e", "userId": 42}),
    ("id_not_string", {"type": "track", "event": "e", "userId": "u", "anonymousId": ["a"]}),
    ("event_not_defined", {"type": "track", "userId": "u"}),
    ("event_not_string", {"type": "track", "userId": "u", "event": 12}),
    ("event_not_string", {"type": "track", "userId": "u", "event": ""}),
    ("properties_not_object", {"type": "track", "userId": "u", "event": "e", "properties": []}),
    ("invalid_message_id", {**track(None), "messageId": "x" * 101}),
    ("invalid_message_id", {**track(None), "messageId": 7}),
]


@pytest.mark.parametrize(
    ("reason", "message"),
    [
        pytest.param(reason, message, id=f"{reason}-{i}")
        for i, (reason, message) in enumerate(INVALID_MESSAGES)
    ],
)
def test_validation_discards_one_message_and_accepts_the_others(
    fake: FakeSegment, client: httpx.Client, reason: str, message: Any
) -> None:
    response = post_batch(client, [message, track("valid")])
    assert (response.status_code, response.json()) == (200, {"success": True})
    (discard,) = fake.discarded()
    assert (discard["level"], discard["reason"], discard["position"]) == ("message", reason, 0)
    assert accepted_ids(fake) == ["valid"]
    assert "multi_user_error" in fake.requests()[0]["flags"]


@pytest.mark.parametrize(
    "message",
    [track(anonymousId=None), track(userId=None, anonymousId="anon"), track("x" * 100)],
)
def test_valid_edge_messages_are_accepted(
    fake: FakeSegment, client: httpx.Client, message: dict[str, Any]
) -> None:
    post_batch(client, [message])
    fake.assert_no_discards()
    assert len(fake.accepted()) == 1


def test_accepted_messages_are_enriched_as_segment_does(
    fake: FakeSegment, client: httpx.Client
) -> None:
    post_batch(client, [track(None), track("b")])
    first, second = fake.accepted()
    assert first["messageId"].startswith("fake-")
    assert first["flags"] == ["message_id_assigned"]
    assert (second["writeKey"], second["request_seq"], second["position"]) == (WRITE_KEY, 1, 1)
    assert second["receivedAt"] == "2025-01-01T00:00:00.000Z"


@pytest.mark.parametrize(
    ("timestamp", "sent_at", "expected", "flags"),
    [
        # The client's clock is 1 h 5 s behind: it stamped the event 3 s before sending.
        ("2024-12-31T22:59:52.000Z", "2024-12-31T22:59:55.000Z", "2024-12-31T23:59:57.250Z", []),
        ("2024-06-01T12:00:00+02:00", None, "2024-06-01T12:00:00+02:00", []),
        (None, "2025-01-01T00:00:00Z", "2025-01-01T00:00:00.250Z", []),
        ("yesterday", None, "2025-01-01T00:00:00.250Z", ["invalid_timestamp"]),
    ],
)
def test_timestamps(
    fake: FakeSegment,
    client: httpx.Client,
    clock: Clock,
    timestamp: str | None,
    sent_at: str | None,
    expected: str,
    flags: list[str],
) -> None:
    clock.advance(0.25)
    post_batch(client, [track(timestamp=timestamp, sentAt=sent_at)])
    (message,) = fake.accepted()
    assert message["timestamp"] == expected
    assert message["originalTimestamp"] == timestamp
    assert (message["sentAt"], message["flags"]) == (sent_at, flags)
    assert message["receivedAt"] == "2025-01-01T00:00:00.250Z"


# Dedup by messageId


def test_duplicates_within_a_batch_across_requests_and_write_keys(
    fake: FakeSegment, client: httpx.Client, clock: Clock
) -> None:
    post_batch(client, [track("a"), track("a"), track("b")], key="key-1")
    clock.advance(60)
    post_batch(client, [track("a")], key="key-2")
    assert accepted_ids(fake) == ["a", "b"]
    assert fake.duplicate_count("a") == 2
    first, second = fake.duplicates()
    assert first["dup_request_seq"] == 1
    assert {key: value for key, value in second.items() if key != "message"} == {
        "messageId": "a",
        "first_request_seq": 1,
        "dup_request_seq": 2,
        "first_received_at": "2025-01-01T00:00:00.000Z",
        "dup_received_at": "2025-01-01T00:01:00.000Z",
    }
    assert second["message"]["writeKey"] == "key-2"
    with pytest.raises(AssertionError, match="2 duplicates"):
        fake.assert_no_duplicates()


def test_the_dedup_window_expires(clock: Clock) -> None:
    with (
        FakeSegment(dedup_window=timedelta(hours=24), clock=clock) as fake,
        httpx.Client(base_url=fake.base_url) as http,
    ):
        post_batch(http, [track("a")])
        clock.advance(24 * 3600 - 1)
        post_batch(http, [track("a")])
        clock.advance(3600)  # 25 h after the first copy
        post_batch(http, [track("a")])
        assert [message["request_seq"] for message in fake.accepted()] == [1, 3]
        assert fake.duplicate_count("a") == 1


def test_discarded_messages_do_not_enter_the_dedup_store(
    fake: FakeSegment, client: httpx.Client
) -> None:
    post_batch(client, [track("a", userId=None)])
    post_batch(client, [track("a")])
    assert accepted_ids(fake) == ["a"]
    fake.assert_no_duplicates()


# The warehouse: the relay's own list of reserved columns (relay/snakecase.py)


@pytest.mark.parametrize(
    ("properties", "dropped"),
    [
        ({"call_id": 1, "direction": "inbound", "contextual": "x"}, []),
        ({"id": 1, "userId": 1}, ["id", "user_id"]),
        ({"uuid": 1, "uuid_ts": 2, "loadedAt": 3}, ["uuid", "uuid_ts", "loaded_at"]),
        ({"context": "x", "context_page": "y"}, ["context", "context_page"]),
        ({"context": {"ip": "x"}, "user": {"id": 5, "name": "N"}}, ["context_ip", "user_id"]),
    ],
)
def test_properties_on_reserved_columns_are_flagged(
    fake: FakeSegment, client: httpx.Client, properties: dict[str, Any], dropped: list[str]
) -> None:
    post_batch(client, [track(properties=properties)])
    (message,) = fake.accepted()
    assert message["dropped_columns"] == dropped
    assert ("reserved_property_dropped_in_warehouse" in message["flags"]) is bool(dropped)


# The request log and the inspection helpers


def test_request_log_entry(fake: FakeSegment, client: httpx.Client) -> None:
    response = client.post("/v1/batch", json={"batch": [track("a"), track("b")], "writeKey": "k"})
    (entry,) = fake.requests()
    assert entry["fault"] is entry["error"] is None
    assert (entry["seq"], entry["received_at"], entry["status"]) == (
        1,
        "2025-01-01T00:00:00.000Z",
        200,
    )
    assert (entry["size"], entry["message_count"]) == (
        int(response.request.headers["content-length"]),
        2,
    )
    assert entry["decoded_body"]["batch"][0]["messageId"] == "a"
    assert fake.requests(include_bodies=False)[0]["decoded_body"] is None
    client.post("/v1/batch", content=b"{oops", headers={"Content-Type": "application/json"})
    assert fake.requests()[1]["decoded_body"] == "{oops"


def test_request_bodies_can_be_left_out_of_the_log() -> None:
    with (
        FakeSegment(keep_request_bodies=False) as fake,
        httpx.Client(base_url=fake.base_url) as http,
    ):
        post_batch(http, [track()])
        assert fake.requests()[0]["decoded_body"] is None
        assert len(fake.accepted()) == 1


def test_inspection_helpers(fake: FakeSegment, client: httpx.Client) -> None:
    post_batch(
        client, [track("a"), track("b", event="call.ended"), {**track("c"), "type": "identify"}]
    )
    assert [message["messageId"] for message in fake.events()] == ["a", "b"]
    assert [message["messageId"] for message in fake.events("call.ended")] == ["b"]
    fake.assert_no_discards()
    fake.assert_max_batch_events(3)
    with pytest.raises(AssertionError, match="over 2 events"):
        fake.assert_max_batch_events(2)
    post_batch(client, [track("d", userId=None)])
    with pytest.raises(AssertionError, match="no_user_anon_id"):
        fake.assert_no_discards()
    assert fake.stats() == {
        "requests": 2,
        "accepted": 3,
        "discarded": 1,
        "duplicates": 0,
        "connections_opened": 1,
    }


def test_wait_for_wakes_when_another_thread_delivers(fake: FakeSegment) -> None:
    def deliver() -> None:
        time.sleep(0.05)
        with httpx.Client(base_url=fake.base_url) as http:
            post_batch(http, [track("a"), track("b")])

    sender = threading.Thread(target=deliver)
    sender.start()
    try:
        fake.wait_for(count=2, timeout=5)
        fake.wait_for(lambda state: state.duplicate_count("a") == 0, timeout=1)
    finally:
        sender.join()
    with pytest.raises(TimeoutError, match="'accepted': 2"):
        fake.wait_for(count=3, timeout=0.05)
    with pytest.raises(ValueError, match="predicate or a count"):
        fake.wait_for()


def test_reset_forgets_everything_but_the_connections(
    fake: FakeSegment, client: httpx.Client
) -> None:
    post_batch(client, [track("a"), track("a"), track("b", userId=None)])
    fake.inject(Fault.status(500), times=None)
    fake.reset()
    assert fake.stats() == {
        "requests": 0,
        "accepted": 0,
        "discarded": 0,
        "duplicates": 0,
        "connections_opened": 1,
    }
    assert post_batch(client, [track("a")]).status_code == 200
    assert accepted_ids(fake) == ["a"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"region": "mars"}, "region"),
        ({"unknown_key_policy": "403"}, "unknown_key_policy"),
        ({"max_event_bytes": 0}, "at least 1"),
        ({"dedup_window": timedelta(seconds=-1)}, "dedup_window"),
        ({"chaos": [ChaosEntry(Fault.status(500), 0.6)] * 2}, "more than 1"),
    ],
)
def test_bad_options_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FakeSegmentOptions(**options)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Fault.status(99), "from 200 to 599"),
        (lambda: Fault.bad_success(code=500), "from 200 to 299"),
        (lambda: Fault.latency(-1), "ms >= 0"),
        (lambda: Fault("reset", phase="on_accept"), "phase must be one of"),  # type: ignore[arg-type]
        (lambda: Fault.close("after_headers_read", accept="after_accept"), "needs the body"),
        (lambda: Fault.status(500, accept="maybe"), "accept must be"),  # type: ignore[arg-type]
    ],
)
def test_bad_faults_are_refused(build: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()
