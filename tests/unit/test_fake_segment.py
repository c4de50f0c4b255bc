"""The fake Segment server's pipeline and records: routing, the response catalogue, write keys,
validation and discards, enrichment, dedup, the rate limiter and the inspection helpers.

Requests go over real loopback HTTP with httpx; faults on the wire are tested in
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

import anyio
import httpx
import pytest

from relay.testing import (
    DISCARD_REASONS,
    ChaosEntry,
    FakeSegment,
    FakeSegmentOptions,
    Fault,
    FaultMatch,
    ManualClock,
    RateLimitConfig,
    SourceConfig,
    snakecase,
    table_name,
)
from relay.testing.fake_segment import TokenBucketLimiter
from relay.testing.fake_segment_config import RateLimitScope
from relay.testing.fake_segment_faults import ChaosTable, FaultQueue
from relay.testing.fake_segment_messages import format_timestamp
from relay.testing.fake_segment_requests import classify_route

WRITE_KEY = "write-key-0123456789abcdef012345"
START = datetime(2025, 1, 1, tzinfo=UTC)


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


VALID_BY_KIND: dict[str, dict[str, Any]] = {
    "identify": {"userId": "user-1", "traits": {"plan": "pro"}},
    "track": {"userId": "user-1", "event": "call.created"},
    "page": {"anonymousId": "anon-1", "name": "Home"},
    "screen": {"anonymousId": "anon-1", "name": "Dialer"},
    "group": {"userId": "user-1", "groupId": "team-1"},
    "alias": {"userId": "user-1", "previousId": "anon-1"},
}


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def fake(clock: ManualClock) -> Iterator[FakeSegment]:
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


def basic(credential: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(credential.encode()).decode()}


# Routing (spec §1)


@pytest.mark.parametrize("method", ["POST", "PUT"])
@pytest.mark.parametrize("kind", sorted(VALID_BY_KIND))
def test_single_event_routes_accept_post_and_put(
    fake: FakeSegment, client: httpx.Client, kind: str, method: str
) -> None:
    response = client.request(
        method, f"/v1/{kind}", json={**VALID_BY_KIND[kind], "writeKey": WRITE_KEY}
    )
    assert response.status_code == 200
    assert response.json() == {"success": True}
    (message,) = fake.accepted()
    assert message["type"] == kind
    assert message["writeKey"] == WRITE_KEY


def test_single_event_route_sets_the_type_and_drops_the_body_write_key(
    fake: FakeSegment, client: httpx.Client
) -> None:
    client.post("/v1/track", json={**track(), "type": "identify", "writeKey": WRITE_KEY})
    (message,) = fake.accepted()
    assert message["type"] == "track"
    assert fake.requests()[0]["auth_mode"] == "body"


@pytest.mark.parametrize("path", ["/V1/Batch/", "/v1/BATCH", "/v1/import", "/v1/import/"])
def test_paths_are_lowercased_and_lose_one_trailing_slash(
    fake: FakeSegment, client: httpx.Client, path: str
) -> None:
    response = client.post(path, json={"batch": [track()]}, auth=(WRITE_KEY, ""))
    assert response.status_code == 200
    assert len(fake.accepted()) == 1
    assert fake.requests()[0]["kind"] == "batch"


def test_unknown_path_is_404_and_records_no_message(
    fake: FakeSegment, client: httpx.Client
) -> None:
    response = client.post("/v2/batch", json={"batch": [track()]}, auth=(WRITE_KEY, ""))
    assert (response.status_code, response.text) == (404, "Not Found")
    assert fake.accepted() == []
    assert fake.requests()[0]["error"] == "not_found"


def test_other_methods_are_405(fake: FakeSegment, client: httpx.Client) -> None:
    response = client.get("/v1/batch")
    assert (response.status_code, response.text) == (405, "Method Not Allowed")
    assert client.delete("/v1/track").status_code == 405
    assert fake.accepted() == []


def test_options_answers_a_permissive_cors_preflight(
    fake: FakeSegment, client: httpx.Client
) -> None:
    response = client.options("/v1/batch")
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == "*"
    assert fake.requests() == []


def test_health_answers_200_with_an_empty_body_and_is_not_recorded(
    fake: FakeSegment, client: httpx.Client
) -> None:
    response = client.get("/internal/health")
    assert (response.status_code, response.content) == (200, b"")
    assert fake.requests() == []
    assert fake.connections_opened() == 0


@pytest.mark.parametrize(
    ("body", "accepted"),
    [
        (b'{"batch": [{"type": "track", "event": "e", "userId": "u"}], "writeKey": "k"}', 1),
        (b"{not json", 0),
        (b"[1, 2]", 0),
        (b'{"event": "e", "userId": "u"}', 0),  # no write key anywhere
    ],
)
def test_short_client_routes_always_answer_success(
    fake: FakeSegment, client: httpx.Client, body: bytes, accepted: int
) -> None:
    response = client.post(
        "/v1/b" if b"batch" in body else "/v1/t",
        content=body,
        headers={"Content-Type": "text/plain"},
    )
    assert (response.status_code, response.json()) == (200, {"success": True})
    assert len(fake.accepted()) == accepted
    if not accepted:
        (discard,) = fake.discarded()
        assert (discard["level"], discard["reason"]) == ("request", "bad_request")
        assert discard["detail"] is not None


def test_short_route_get_reads_base64_data(fake: FakeSegment, client: httpx.Client) -> None:
    data = base64.urlsafe_b64encode(
        json.dumps({"event": "e", "userId": "u", "writeKey": "k"}).encode()
    ).rstrip(b"=")
    response = client.get("/v1/t", params={"data": data.decode()})
    assert response.status_code == 200
    assert fake.accepted()[0]["event"] == "e"


def test_pixel_route_answers_a_gif_and_records_the_message(
    fake: FakeSegment, client: httpx.Client
) -> None:
    data = base64.b64encode(json.dumps({"event": "e", "userId": "u", "writeKey": "k"}).encode())
    response = client.get("/v1/pixel/track", params={"data": data.decode()})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/gif"
    assert response.content.startswith(b"GIF89a")
    assert fake.accepted()[0]["type"] == "track"


def test_classify_route_reads_absolute_targets_and_queries() -> None:
    route = classify_route("GET", "http://api.segment.io/V1/T/?data=abc")
    assert (route.family, route.path, route.kind, route.query) == (
        "short",
        "/v1/t",
        "track",
        {"data": "abc"},
    )


# The response catalogue (spec §7)


def _catalogue_requests() -> list[tuple[str, dict[str, Any], int, str]]:
    big_batch = json.dumps(
        {"writeKey": "k", "batch": [track(f"m-{i}", pad="a" * 26_000) for i in range(20)]}
    ).encode()
    return [
        ("invalid json", {"content": b"{not json"}, 400, "invalid_json"),
        ("trailing garbage", {"content": b'{"batch": []} extra'}, 400, "invalid_json"),
        ("top-level array", {"content": b"[]"}, 400, "not_an_object"),
        ("top-level scalar", {"content": b"42"}, 400, "not_an_object"),
        (
            "single over 32768 bytes",
            {
                "path": "/v1/track",
                "content": json.dumps({**track(), "writeKey": "k", "pad": "x" * 33_000}).encode(),
            },
            400,
            "body_too_large",
        ),
        (
            "batch over 512000 decoded bytes, small on the wire",
            {"content": gzip.compress(big_batch), "headers": {"Content-Encoding": "gzip"}},
            400,
            "body_too_large",
        ),
        (
            "batch element over 32768 bytes",
            {
                "content": json.dumps(
                    {"writeKey": "k", "batch": [track("m-1"), track("m-2", pad="x" * 33_000)]}
                ).encode()
            },
            400,
            "event_too_large",
        ),
        (
            "malformed gzip",
            {"content": b"not gzip at all", "headers": {"Content-Encoding": "gzip"}},
            400,
            "malformed_gzip",
        ),
        (
            "unsupported encoding",
            {"content": b'{"batch": []}', "headers": {"Content-Encoding": "br"}},
            400,
            "unsupported_content_encoding",
        ),
        (
            "no write key",
            {"content": json.dumps({"batch": [track()]}).encode()},
            400,
            "missing_write_key",
        ),
        (
            "empty write key",
            {"content": json.dumps({"batch": [track()], "writeKey": ""}).encode()},
            400,
            "missing_write_key",
        ),
        (
            "batch not an array",
            {"content": json.dumps({"batch": {"0": track()}, "writeKey": "k"}).encode()},
            400,
            "batch_not_array",
        ),
        ("unknown path", {"path": "/v1/nope", "content": b"{}"}, 404, "not_found"),
    ]


CATALOGUE = _catalogue_requests()


@pytest.mark.parametrize("style", ["text", "json"])
@pytest.mark.parametrize(
    ("request_fields", "status", "code"),
    [pytest.param(fields, status, code, id=name) for name, fields, status, code in CATALOGUE],
)
def test_response_catalogue_error_rows(
    style: str, request_fields: dict[str, Any], status: int, code: str
) -> None:
    with FakeSegment(error_body_style=style) as fake, httpx.Client(base_url=fake.base_url) as http:
        headers = {"Content-Type": "application/json", **request_fields.get("headers", {})}
        response = http.post(
            request_fields.get("path", "/v1/batch"),
            content=request_fields["content"],
            headers=headers,
        )
        assert response.status_code == status
        if style == "text":
            assert response.headers["content-type"] == "text/plain"
            assert response.text == ("Not Found" if status == 404 else "Bad Request")
        else:
            assert response.headers["content-type"] == "application/json"
            body = response.json()
            assert body["success"] is False
            assert body["code"] == code
            assert body["message"]
        assert fake.accepted() == []
        assert fake.discarded() == []
        (entry,) = fake.requests()
        assert (entry["status"], entry["error"]) == (status, code)


def test_size_limits_are_inclusive(fake: FakeSegment, client: httpx.Client) -> None:
    body = {**track(), "writeKey": "k", "pad": ""}
    body["pad"] = "x" * (32_768 - len(json.dumps(body).encode()))
    content = json.dumps(body).encode()
    assert len(content) == 32_768
    headers = {"Content-Type": "application/json"}
    assert client.post("/v1/track", content=content, headers=headers).status_code == 200
    over = content.replace(b'"pad": "', b'"pad": "x')
    assert client.post("/v1/track", content=over, headers=headers).status_code == 400


def test_valid_requests_answer_200_whatever_happens_to_their_messages(clock: ManualClock) -> None:
    write_keys = {
        "key-us": SourceConfig(workspace="w1"),
        "key-off": SourceConfig(workspace="w1", enabled=False),
        "key-eu": SourceConfig(workspace="w2", region="eu"),
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
            assert response.headers["content-type"] == "application/json"
        reasons = [item["reason"] for item in fake.discarded()]
        assert reasons == [
            "unknown_source",
            "source_disabled",
            "wrong_region",
            "event_not_defined",
            *["batch_too_many_events"] * 4,
        ]
        assert [item["messageId"] for item in fake.duplicates()] == ["e"]
        assert [message["messageId"] for message in fake.accepted()] == ["e"]


def test_rate_limited_row_in_both_styles() -> None:
    for style in ("text", "json"):
        limit = RateLimitConfig(rps=1, burst=1)
        with (
            FakeSegment(rate_limit=limit, error_body_style=style, clock=ManualClock()) as fake,
            httpx.Client(base_url=fake.base_url) as http,
        ):
            assert post_batch(http, [track("a")]).status_code == 200
            response = post_batch(http, [track("b")])
            assert response.status_code == 429
            assert response.headers["retry-after"] == "1"
            assert response.headers["x-ratelimit-reset"] == "1"
            if style == "text":
                assert response.headers["content-type"] == "text/plain"
                assert response.text == "Too Many Requests"
            else:
                assert response.json()["code"] == "rate_limited"
            assert [message["messageId"] for message in fake.accepted()] == ["a"]


# Write keys and authentication (spec §2 step 8)


def test_write_key_precedence_message_then_body_then_basic(
    fake: FakeSegment, client: httpx.Client
) -> None:
    response = client.post(
        "/v1/batch",
        json={"batch": [track("a", writeKey="own-key"), track("b")], "writeKey": "body-key"},
        headers=basic("basic-key:"),
    )
    assert response.status_code == 200
    assert [message["writeKey"] for message in fake.accepted()] == ["own-key", "body-key"]
    entry = fake.requests()[0]
    assert entry["auth_mode"] == "basic"
    assert sorted(entry["write_keys_seen"]) == ["basic-key", "body-key", "own-key"]


def test_basic_auth_key_applies_when_the_body_has_none(
    fake: FakeSegment, client: httpx.Client
) -> None:
    client.post("/v1/batch", json={"batch": [track()]}, headers=basic(f"{WRITE_KEY}:"))
    assert fake.accepted()[0]["writeKey"] == WRITE_KEY
    assert fake.requests()[0]["flags"] == []


def test_basic_auth_without_colon_is_tolerated_and_flagged(
    fake: FakeSegment, client: httpx.Client
) -> None:
    response = client.post("/v1/batch", json={"batch": [track()]}, headers=basic(WRITE_KEY))
    assert response.status_code == 200
    assert fake.accepted()[0]["writeKey"] == WRITE_KEY
    assert "basic_without_colon" in fake.requests()[0]["flags"]


def test_basic_auth_with_a_password_is_not_a_write_key(
    fake: FakeSegment, client: httpx.Client
) -> None:
    response = client.post("/v1/batch", json={"batch": [track()]}, headers=basic("key:secret"))
    assert response.status_code == 400
    entry = fake.requests()[0]
    assert entry["error"] == "missing_write_key"
    assert "basic_with_password" in entry["flags"]


def test_bearer_token_is_recorded_but_not_validated(
    fake: FakeSegment, client: httpx.Client
) -> None:
    response = client.post(
        "/v1/batch",
        json={"batch": [track()], "writeKey": WRITE_KEY},
        headers={"Authorization": "Bearer any-token"},
    )
    assert response.status_code == 200
    entry = fake.requests()[0]
    assert entry["auth_mode"] == "bearer"
    assert entry["headers"]["authorization"] == "Bearer any-token"


def test_auth_mode_none_without_any_key(fake: FakeSegment, client: httpx.Client) -> None:
    client.post("/v1/batch", json={"batch": [track()]})
    assert fake.requests()[0]["auth_mode"] == "none"


def test_unknown_key_policy_401_is_a_debugging_aid() -> None:
    with (
        FakeSegment(write_keys={"known": SourceConfig()}, unknown_key_policy="401") as fake,
        httpx.Client(base_url=fake.base_url) as http,
    ):
        assert post_batch(http, [track()], key="other").status_code == 401
        assert post_batch(http, [track()], key="known").status_code == 200


def test_empty_key_status_is_configurable() -> None:
    with FakeSegment(empty_key_status=401) as fake, httpx.Client(base_url=fake.base_url) as http:
        assert post_batch(http, [track()], key="").status_code == 401


def test_any_non_empty_key_is_known_when_no_keys_are_configured(
    fake: FakeSegment, client: httpx.Client
) -> None:
    post_batch(client, [track()], key="whatever")
    assert fake.accepted()[0]["workspace"] == "default"


# Content type (spec §2 step 4)


def test_non_json_content_type_is_only_flagged_by_default(
    fake: FakeSegment, client: httpx.Client
) -> None:
    body = json.dumps({"batch": [track()], "writeKey": "k"}).encode()
    response = client.post("/v1/batch", content=body, headers={"Content-Type": "text/plain"})
    assert response.status_code == 200
    assert fake.requests()[0]["flags"] == ["bad_content_type"]
    response = client.post(
        "/v1/batch",
        content=json.dumps({"batch": [track("m-2")], "writeKey": "k"}).encode(),
        headers={"Content-Type": "Application/JSON; charset=utf-8"},
    )
    assert fake.requests()[1]["flags"] == []


def test_strict_content_type_refuses_other_types() -> None:
    with (
        FakeSegment(strict_content_type=True) as fake,
        httpx.Client(base_url=fake.base_url) as http,
    ):
        body = json.dumps({"batch": [track()], "writeKey": "k"}).encode()
        response = http.post("/v1/batch", content=body, headers={"Content-Type": "text/plain"})
        assert (response.status_code, response.text) == (400, "Bad Request")
        assert fake.requests()[0]["error"] == "bad_content_type"


# Per-message processing (spec §3)


def test_batch_context_and_integrations_merge_and_the_message_wins(
    fake: FakeSegment, client: httpx.Client
) -> None:
    post_batch(
        client,
        [
            track("a", context={"ip": "1.1.1.1"}, integrations={"All": False}),
            track("b"),
        ],
        context={"ip": "9.9.9.9", "library": {"name": "relay"}},
        integrations={"All": True, "Mixpanel": False},
        sentAt="2025-01-01T00:00:00Z",
    )
    first, second = fake.accepted()
    assert first["context"] == {"ip": "1.1.1.1", "library": {"name": "relay"}}
    assert first["integrations"] == {"All": False, "Mixpanel": False}
    assert second["context"] == {"ip": "9.9.9.9", "library": {"name": "relay"}}
    assert second["sentAt"] == "2025-01-01T00:00:00Z"


def test_message_sent_at_wins_over_the_batch_one(fake: FakeSegment, client: httpx.Client) -> None:
    post_batch(client, [track(sentAt="2024-12-31T00:00:00Z")], sentAt="2025-01-01T00:00:00Z")
    assert fake.accepted()[0]["sentAt"] == "2024-12-31T00:00:00Z"


@pytest.mark.parametrize(
    ("policy", "accepted_ids"),
    [("discard_all", []), ("discard_overflow", ["m-0", "m-1", "m-2"])],
)
def test_over_count_policy(policy: str, accepted_ids: list[str]) -> None:
    with (
        FakeSegment(max_batch_events=3, over_count_policy=policy) as fake,
        httpx.Client(base_url=fake.base_url) as http,
    ):
        response = post_batch(http, [track(f"m-{i}") for i in range(5)])
        assert response.status_code == 200
        assert [message["messageId"] for message in fake.accepted()] == accepted_ids
        discards = fake.discarded()
        assert {item["reason"] for item in discards} == {"batch_too_many_events"}
        assert len(discards) == 5 - len(accepted_ids)


@pytest.mark.parametrize("body", [{"batch": []}, {}, {"batch": None}])
def test_empty_batch_is_a_request_level_discard(
    fake: FakeSegment, client: httpx.Client, body: dict[str, Any]
) -> None:
    response = client.post("/v1/batch", json={**body, "writeKey": WRITE_KEY})
    assert response.status_code == 200
    (discard,) = fake.discarded()
    assert (discard["level"], discard["reason"], discard["message"]) == (
        "request",
        "empty_batch",
        None,
    )
    assert "empty_batch" in fake.requests()[0]["flags"]


@pytest.mark.parametrize(
    ("key", "reason"),
    [("unknown", "unknown_source"), ("disabled", "source_disabled"), ("us-key", "wrong_region")],
)
def test_source_checks(key: str, reason: str) -> None:
    write_keys = {
        "eu-key": SourceConfig(workspace="eu", region="eu"),
        "us-key": SourceConfig(workspace="us", region="us"),
        "disabled": SourceConfig(workspace="eu", region="eu", enabled=False),
    }
    with (
        FakeSegment(write_keys=write_keys, region="eu") as fake,
        httpx.Client(base_url=fake.base_url) as http,
    ):
        assert post_batch(http, [track("a")], key=key).status_code == 200
        assert post_batch(http, [track("b")], key="eu-key").status_code == 200
        (discard,) = fake.discarded()
        assert (discard["reason"], discard["writeKey"], discard["request_seq"]) == (reason, key, 1)
        (message,) = fake.accepted()
        assert (message["messageId"], message["workspace"]) == ("b", "eu")


INVALID_MESSAGES: list[tuple[str, dict[str, Any]]] = [
    ("invalid_type", {"event": "e", "userId": "u"}),
    ("invalid_type", {"type": "purchase", "event": "e", "userId": "u"}),
    ("no_user_anon_id", {"type": "track", "event": "e"}),
    ("no_user_anon_id", {"type": "track", "event": "e", "userId": None, "anonymousId": None}),
    ("id_not_string", {"type": "track", "event": "e", "userId": ""}),
    ("id_not_string", {"type": "track", "event": "e", "userId": 42}),
    ("id_not_string", {"type": "track", "event": "e", "userId": "u", "anonymousId": ["a"]}),
    ("id_not_string", {"type": "track", "event": "e", "anonymousId": True}),
    ("event_not_defined", {"type": "track", "userId": "u"}),
    ("event_not_string", {"type": "track", "userId": "u", "event": 12}),
    ("event_not_string", {"type": "track", "userId": "u", "event": ""}),
    ("properties_not_object", {"type": "track", "userId": "u", "event": "e", "properties": []}),
    ("properties_not_object", {"type": "page", "userId": "u", "properties": "x"}),
    ("properties_not_object", {"type": "screen", "userId": "u", "properties": 1}),
    ("traits_not_object", {"type": "identify", "userId": "u", "traits": "x"}),
    ("traits_not_object", {"type": "group", "userId": "u", "groupId": "g", "traits": []}),
    ("name_not_string", {"type": "page", "userId": "u", "name": ""}),
    ("name_not_string", {"type": "screen", "userId": "u", "name": 3}),
    ("category_not_string", {"type": "page", "userId": "u", "category": ""}),
    ("category_not_string", {"type": "screen", "userId": "u", "category": {}}),
    ("group_id_required", {"type": "group", "userId": "u"}),
    ("group_id_required", {"type": "group", "userId": "u", "groupId": ""}),
    ("alias_ids_required", {"type": "alias", "userId": "u"}),
    ("alias_ids_required", {"type": "alias", "anonymousId": "a", "previousId": "p"}),
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
def test_validation_discards_and_partial_acceptance(
    fake: FakeSegment, client: httpx.Client, reason: str, message: dict[str, Any]
) -> None:
    response = post_batch(client, [message, track("valid")])
    assert (response.status_code, response.json()) == (200, {"success": True})
    (discard,) = fake.discarded()
    assert (discard["level"], discard["reason"], discard["position"]) == ("message", reason, 0)
    assert [accepted["messageId"] for accepted in fake.accepted()] == ["valid"]
    assert "multi_user_error" in fake.requests()[0]["flags"]


def test_every_discard_reason_is_in_the_catalogue() -> None:
    reasons = {reason for reason, _ in INVALID_MESSAGES} | {
        "unknown_source",
        "source_disabled",
        "wrong_region",
        "batch_too_many_events",
        "empty_batch",
        "bad_request",
    }
    assert reasons == DISCARD_REASONS


@pytest.mark.parametrize(
    "message",
    [
        track(anonymousId=None),
        track(userId=None, anonymousId="anon"),
        track("x" * 100),
        {"type": "page", "userId": "u"},
        {"type": "group", "userId": "u", "groupId": 5},
    ],
)
def test_valid_edge_messages_are_accepted(
    fake: FakeSegment, client: httpx.Client, message: dict[str, Any]
) -> None:
    post_batch(client, [message])
    fake.assert_no_discards()
    assert len(fake.accepted()) == 1


def test_numeric_ids_are_coerced_when_configured() -> None:
    with (
        FakeSegment(numeric_id_policy="coerce") as fake,
        httpx.Client(base_url=fake.base_url) as http,
    ):
        post_batch(http, [track(userId=42, anonymousId=1.5)])
        (message,) = fake.accepted()
        assert (message["userId"], message["anonymousId"]) == ("42", "1.5")


def test_message_id_is_assigned_when_absent(fake: FakeSegment, client: httpx.Client) -> None:
    post_batch(client, [track(None), track(None)])
    first, second = fake.accepted()
    assert first["messageId"].startswith("fake-")
    assert first["messageId"] != second["messageId"]
    assert first["flags"] == ["message_id_assigned"]


def test_accepted_messages_carry_their_origin(fake: FakeSegment, client: httpx.Client) -> None:
    post_batch(client, [track("a"), track("b")])
    second = fake.accepted()[1]
    assert second["writeKey"] == WRITE_KEY
    assert second["workspace"] == "default"
    assert (second["request_seq"], second["position"]) == (1, 1)
    assert second["receivedAt"] == "2025-01-01T00:00:00.000Z"


# Timestamps (spec §3 step 7)


def test_timestamp_is_corrected_for_the_client_clock_skew(
    fake: FakeSegment, client: httpx.Client
) -> None:
    # The client's clock is 1 h 5 s behind: it stamped the event 3 s before sending.
    post_batch(
        client,
        [track(timestamp="2024-12-31T22:59:52.000Z")],
        sentAt="2024-12-31T22:59:55.000Z",
    )
    (message,) = fake.accepted()
    assert message["originalTimestamp"] == "2024-12-31T22:59:52.000Z"
    assert message["timestamp"] == "2024-12-31T23:59:57.000Z"
    assert message["receivedAt"] == "2025-01-01T00:00:00.000Z"
    assert message["sentAt"] == "2024-12-31T22:59:55.000Z"
    assert message["flags"] == []


def test_timestamp_without_sent_at_is_kept(fake: FakeSegment, client: httpx.Client) -> None:
    post_batch(client, [track(timestamp="2024-06-01T12:00:00+02:00")])
    (message,) = fake.accepted()
    assert message["timestamp"] == "2024-06-01T12:00:00+02:00"
    assert message["originalTimestamp"] == "2024-06-01T12:00:00+02:00"
    assert message["sentAt"] is None


def test_missing_timestamp_becomes_the_receive_time(
    fake: FakeSegment, client: httpx.Client, clock: ManualClock
) -> None:
    clock.advance(0.25)
    post_batch(client, [track()], sentAt="2025-01-01T00:00:00Z")
    (message,) = fake.accepted()
    assert message["timestamp"] == message["receivedAt"] == "2025-01-01T00:00:00.250Z"
    assert message["originalTimestamp"] is None


@pytest.mark.parametrize(
    ("timestamp", "flag", "expected"),
    [
        ("yesterday", "invalid_timestamp", "2025-01-01T00:00:00.000Z"),
        (1_700_000_000, "invalid_timestamp", "2025-01-01T00:00:00.000Z"),
        ("1969-12-31T23:59:59Z", "pre_epoch_timestamp", "1969-12-31T23:59:59Z"),
        ("2024-12-31T10:00:00", "naive_timestamp", "2024-12-31T10:00:00"),
    ],
)
def test_timestamp_flags(
    fake: FakeSegment, client: httpx.Client, timestamp: object, flag: str, expected: str
) -> None:
    post_batch(client, [track(timestamp=timestamp)])
    (message,) = fake.accepted()
    assert flag in message["flags"]
    assert message["timestamp"] == expected


def test_format_timestamp_keeps_sub_millisecond_precision() -> None:
    moment = datetime(2025, 1, 1, 0, 0, 0, 123456, tzinfo=UTC)
    assert format_timestamp(moment) == "2025-01-01T00:00:00.123456Z"
    assert format_timestamp(moment.replace(microsecond=123000)) == "2025-01-01T00:00:00.123Z"


# Dedup (spec §3 step 8)


def test_duplicates_inside_one_batch_are_recorded_in_order(
    fake: FakeSegment, client: httpx.Client
) -> None:
    post_batch(client, [track("a"), track("a"), track("b"), track("a")])
    assert [message["messageId"] for message in fake.accepted()] == ["a", "b"]
    assert fake.duplicate_count("a") == 2
    assert [item["position"] for item in fake.duplicates()] == [1, 3]


def test_duplicates_across_requests_and_write_keys(
    fake: FakeSegment, client: httpx.Client, clock: ManualClock
) -> None:
    post_batch(client, [track("a")], key="key-1")
    clock.advance(60)
    post_batch(client, [track("a")], key="key-2")
    assert len(fake.accepted()) == 1
    (duplicate,) = fake.duplicates()
    assert duplicate == {
        "messageId": "a",
        "first_request_seq": 1,
        "dup_request_seq": 2,
        "first_received_at": "2025-01-01T00:00:00.000Z",
        "dup_received_at": "2025-01-01T00:01:00.000Z",
        "writeKey": "key-2",
        "position": 0,
        "message": duplicate["message"],
    }
    assert duplicate["message"]["writeKey"] == "key-2"
    with pytest.raises(AssertionError, match="1 duplicates"):
        fake.assert_no_duplicates()


def test_dedup_window_expires(fake: FakeSegment, client: httpx.Client) -> None:
    post_batch(client, [track("a")])
    fake.advance(24 * 3600 - 1)
    post_batch(client, [track("a")])
    assert fake.duplicate_count("a") == 1
    fake.advance(3600)  # 25 h after the first copy
    post_batch(client, [track("a")])
    assert [message["request_seq"] for message in fake.accepted()] == [1, 3]
    assert fake.duplicate_count("a") == 1


def test_dedup_window_is_configurable() -> None:
    clock = ManualClock()
    with (
        FakeSegment(dedup_window=timedelta(seconds=10), clock=clock) as fake,
        httpx.Client(base_url=fake.base_url) as http,
    ):
        post_batch(http, [track("a")])
        clock.advance(10)
        post_batch(http, [track("a")])
        assert len(fake.accepted()) == 2


def test_clear_dedup_forgets_only_the_dedup_store(fake: FakeSegment, client: httpx.Client) -> None:
    post_batch(client, [track("a")])
    post_batch(client, [track("a")])
    fake.clear_dedup()
    post_batch(client, [track("a")])
    assert len(fake.accepted()) == 2
    assert fake.duplicate_count("a") == 1


def test_discarded_messages_do_not_enter_the_dedup_store(
    fake: FakeSegment, client: httpx.Client
) -> None:
    post_batch(client, [track("a", userId=None)])
    post_batch(client, [track("a")])
    assert len(fake.accepted()) == 1
    fake.assert_no_duplicates()


# Warehouse preview (spec §3 step 9)

GO_SNAKECASE_CASES = [
    ("@49L0S145_¬fwHƒ0TSLNVp", "49l0s145_fw_h_0tslnvp"),
    ("lk0B@bFmjrLQ_Z6YL", "lk0_b_b_fmjr_lq_z6yl"),
    ("samPLE text", "sam_ple_text"),
    ("sample text", "sample_text"),
    ("sample-text", "sample_text"),
    ("sample_text", "sample_text"),
    ("sample___text", "sample_text"),
    ("sampleText", "sample_text"),
    ("inviteYourCustomersAddInvites", "invite_your_customers_add_invites"),
    ("sample 2 Text", "sample_2_text"),
    ("   sample   2    Text   ", "sample_2_text"),
    ("   $#$sample   2    Text   ", "sample_2_text"),
    ("SAMPLE 2 TEXT", "sample_2_text"),
    ("___$$Base64Encode", "base64_encode"),
    ("FOO:BAR$BAZ", "foo_bar_baz"),
    ("FOO#BAR#BAZ", "foo_bar_baz"),
    ("something.com", "something_com"),
    ("$something%", "something"),
    ("•¶§ƒ˚foo˙∆˚¬", "foo"),
    ("CStringRef", "cstring_ref"),
    ("5test", "5test"),
    ("test5", "test5"),
    ("THE5r", "the5r"),
    ("5TEst", "5test"),
    ("_5TEst", "5test"),
    ("@%#&5TEst", "5test"),
    ("edf_6N", "edf_6n"),
    ("f_pX9", "f_p_x9"),
    ("p_z9Rg", "p_z9_rg"),
    ("2FA Enabled", "2fa_enabled"),
    ("Enabled 2FA", "enabled_2fa"),
]


@pytest.mark.parametrize(("name", "expected"), GO_SNAKECASE_CASES)
def test_snakecase_matches_go_snakecase(name: str, expected: str) -> None:
    assert snakecase(name) == expected


@pytest.mark.parametrize(
    ("event", "table"),
    [
        ("call.created", "call_created"),
        ("call.ringing_on_agent", "call_ringing_on_agent"),
        ("Call Created", "call_created"),
        ("callCreated", "call_created"),
        ("user.opened", "user_opened"),
    ],
)
def test_table_name(event: str, table: str) -> None:
    assert table_name(event) == table


@pytest.mark.parametrize(
    ("properties", "flagged"),
    [
        ({"call_id": 1, "direction": "inbound"}, False),
        ({"user_id": 1}, True),
        ({"userId": 1}, True),
        ({"id": 1}, True),
        ({"receivedAt": "x"}, True),
        ({"context_page": "x"}, True),
        ({"context": {"ip": "x"}}, True),
    ],
)
def test_reserved_warehouse_properties_are_flagged(
    fake: FakeSegment, client: httpx.Client, properties: dict[str, Any], flagged: bool
) -> None:
    post_batch(client, [track(properties=properties)])
    flags = fake.accepted()[0]["flags"]
    assert ("reserved_property_dropped_in_warehouse" in flags) is flagged


# The rate limiter (spec §5)


def test_rate_limit_refills_on_the_fake_clock() -> None:
    clock = ManualClock()
    limit = RateLimitConfig(rps=2, burst=2)
    with (
        FakeSegment(rate_limit=limit, clock=clock) as fake,
        httpx.Client(base_url=fake.base_url) as http,
    ):
        statuses = [post_batch(http, [track(f"m-{i}")]).status_code for i in range(3)]
        assert statuses == [200, 200, 429]
        clock.advance(0.5)
        assert post_batch(http, [track("m-3")]).status_code == 200
        assert post_batch(http, [track("m-4")]).status_code == 429
        assert fake.requests()[-1]["error"] == "rate_limited"
        assert len(fake.accepted()) == 3


@pytest.mark.parametrize(
    ("per", "expected"), [("workspace", [200, 429, 200]), ("write_key", [200, 200, 200])]
)
def test_rate_limit_buckets_per_workspace_or_write_key(
    per: RateLimitScope, expected: list[int]
) -> None:
    write_keys = {
        "a1": SourceConfig(workspace="a"),
        "a2": SourceConfig(workspace="a"),
        "b1": SourceConfig(workspace="b"),
    }
    limit = RateLimitConfig(rps=1, burst=1, per=per)
    with (
        FakeSegment(write_keys=write_keys, rate_limit=limit, clock=ManualClock()) as fake,
        httpx.Client(base_url=fake.base_url) as http,
    ):
        statuses = [
            post_batch(http, [track(f"m-{key}")], key=key).status_code for key in ("a1", "a2", "b1")
        ]
        assert statuses == expected


def test_rate_limit_counting_events_and_fixed_retry_after() -> None:
    limit = RateLimitConfig(rps=10, burst=10, unit="events", retry_after_seconds=7)
    with (
        FakeSegment(rate_limit=limit, clock=ManualClock()) as fake,
        httpx.Client(base_url=fake.base_url) as http,
    ):
        assert post_batch(http, [track(f"a-{i}") for i in range(8)]).status_code == 200
        response = post_batch(http, [track(f"b-{i}") for i in range(3)])
        assert response.status_code == 429
        assert response.headers["retry-after"] == "7"
        assert post_batch(http, [track("c-0"), track("c-1")]).status_code == 200


def test_rate_limit_retry_after_rounds_the_wait_up() -> None:
    limit = RateLimitConfig(rps=0.25, burst=1)
    with (
        FakeSegment(rate_limit=limit, clock=ManualClock()) as fake,
        httpx.Client(base_url=fake.base_url) as http,
    ):
        post_batch(http, [track("a")])
        fake.advance(1)
        response = post_batch(http, [track("b")])
        assert response.headers["retry-after"] == "3"


def test_rate_limit_queue_mode_accepts_and_flags() -> None:
    limit = RateLimitConfig(rps=1, burst=1, mode="queue")
    with (
        FakeSegment(rate_limit=limit, clock=ManualClock()) as fake,
        httpx.Client(base_url=fake.base_url) as http,
    ):
        assert post_batch(http, [track("a")]).status_code == 200
        assert post_batch(http, [track("b")]).status_code == 200
        first, second = fake.accepted()
        assert first["flags"] == []
        assert second["flags"] == ["throttled_queued"]
        assert "throttled_queued" in fake.requests()[1]["flags"]


def test_token_bucket_lets_an_oversized_request_through_a_full_bucket() -> None:
    limiter = TokenBucketLimiter(RateLimitConfig(rps=1, burst=2))
    assert limiter.take("k", 5, now_seconds=0.0) is None
    assert limiter.take("k", 1, now_seconds=1.0) == pytest.approx(3.0)
    assert limiter.take("k", 1, now_seconds=4.0) is None


# Encoding and the request log (spec §2, §6)


def test_gzip_on_and_off_give_identical_accepted_messages(
    fake: FakeSegment, client: httpx.Client
) -> None:
    body = json.dumps(
        {
            "batch": [track(f"m-{i}", properties={"n": i, "pad": "z" * 300}) for i in range(50)],
            "writeKey": "k",
        }
    ).encode()
    headers = {"Content-Type": "application/json"}
    client.post("/v1/batch", content=body, headers=headers)
    plain = fake.accepted()
    fake.reset()
    client.post(
        "/v1/batch",
        content=gzip.compress(body),
        headers={**headers, "Content-Encoding": "gzip"},
    )
    assert fake.accepted() == plain
    (entry,) = fake.requests()
    assert entry["content_encoding"] == "gzip"
    assert entry["raw_size"] < entry["decoded_size"] == len(body)


def test_request_log_entry(fake: FakeSegment, client: httpx.Client) -> None:
    client.post(
        "/v1/batch?x=1",
        json={"batch": [track("a"), track("b")], "writeKey": "k"},
        headers={"Connection": "keep-alive", "X-Trace": "t-1", "User-Agent": "relay-test"},
    )
    (entry,) = fake.requests()
    assert entry["seq"] == 1
    assert entry["connection_id"] >= 1
    assert (entry["method"], entry["path"], entry["target"]) == (
        "POST",
        "/v1/batch",
        "/v1/batch?x=1",
    )
    assert entry["received_at"] == "2025-01-01T00:00:00.000Z"
    assert entry["headers"]["x-trace"] == "t-1"
    assert "connection" not in entry["headers"]
    assert entry["raw_size"] == entry["decoded_size"] == int(entry["headers"]["content-length"])
    assert (entry["status"], entry["response_body"]) == (200, '{"success": true}')
    assert entry["message_count"] == 2
    assert entry["decoded_body"]["batch"][0]["messageId"] == "a"
    assert entry["fault"] is None
    assert "decoded_body" not in fake.requests(include_bodies=False)[0]


def test_request_bodies_can_be_dropped_from_the_log() -> None:
    with (
        FakeSegment(keep_request_bodies=False) as fake,
        httpx.Client(base_url=fake.base_url) as http,
    ):
        post_batch(http, [track()])
        assert fake.requests()[0]["decoded_body"] is None
        assert len(fake.accepted()) == 1


def test_unparsable_body_is_logged_as_text(fake: FakeSegment, client: httpx.Client) -> None:
    client.post("/v1/batch", content=b"{oops", headers={"Content-Type": "application/json"})
    assert fake.requests()[0]["decoded_body"] == "{oops"


# Inspection helpers (spec §6)


def test_events_filters_track_messages(fake: FakeSegment, client: httpx.Client) -> None:
    post_batch(
        client,
        [
            track("a", event="call.created", userId="u1"),
            track("b", event="call.ended", userId="u1"),
            track("c", event="call.created", userId="u2"),
            {"type": "identify", "userId": "u1", "messageId": "d"},
        ],
    )
    assert [m["messageId"] for m in fake.events()] == ["a", "b", "c"]
    assert [m["messageId"] for m in fake.events("call.created")] == ["a", "c"]
    assert [m["messageId"] for m in fake.events("call.created", user_id="u2")] == ["c"]


def test_assertion_helpers(fake: FakeSegment, client: httpx.Client) -> None:
    post_batch(client, [track("a"), track("b"), track("c")])
    fake.assert_no_discards()
    fake.assert_no_duplicates()
    fake.assert_max_batch_events(3)
    size = fake.requests()[0]["decoded_size"]
    fake.assert_max_request_bytes(size)
    with pytest.raises(AssertionError, match="over 2 events"):
        fake.assert_max_batch_events(2)
    with pytest.raises(AssertionError, match=f"over {size - 1} bytes"):
        fake.assert_max_request_bytes(size - 1)
    post_batch(client, [track("d", userId=None)])
    with pytest.raises(AssertionError, match="no_user_anon_id"):
        fake.assert_no_discards()


def test_wait_for_wakes_when_another_thread_delivers(fake: FakeSegment) -> None:
    def deliver() -> None:
        time.sleep(0.05)
        with httpx.Client(base_url=fake.base_url) as http:
            post_batch(http, [track("a"), track("b")])

    sender = threading.Thread(target=deliver)
    sender.start()
    try:
        fake.wait_for(count=2, timeout=5)
        fake.wait_for(lambda inspector: inspector.duplicate_count("a") == 0, timeout=1)
    finally:
        sender.join()
    assert len(fake.accepted()) == 2


def test_wait_for_times_out_with_the_stats(fake: FakeSegment) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="'accepted': 0"):
        fake.wait_for(count=1, timeout=0.05)
    assert time.monotonic() - started < 1
    with pytest.raises(ValueError, match="predicate or a count"):
        fake.wait_for()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_async_sender_and_wait_for_async(clock: ManualClock) -> None:
    async with FakeSegment(clock=clock) as fake:
        async with httpx.AsyncClient(base_url=fake.base_url) as http:
            response = await http.post(
                "/v1/batch", json={"batch": [track("a")]}, auth=(WRITE_KEY, "")
            )
            assert response.status_code == 200
        with anyio.fail_after(5):
            await fake.wait_for_async(count=1)
        assert fake.accepted()[0]["messageId"] == "a"


def test_reset_forgets_everything(fake: FakeSegment, client: httpx.Client) -> None:
    post_batch(client, [track("a"), track("a"), track("b", userId=None)])
    fake.inject(Fault.status(500), times=None)
    fake.reset()
    assert fake.stats() == {
        "requests": 0,
        "accepted": 0,
        "discarded": 0,
        "duplicates": 0,
        "connections_opened": 0,
        "connections_accepted": 0,
        "pending_faults": 0,
    }
    assert post_batch(client, [track("a")]).status_code == 200
    assert len(fake.accepted()) == 1
    assert fake.duplicate_count("a") == 0


def test_now_follows_the_clock(fake: FakeSegment) -> None:
    fake.advance(90)
    assert fake.now() == START + timedelta(seconds=90)


# Configuration and fault bookkeeping, without the network


@pytest.mark.parametrize(
    "options",
    [
        {"region": "ap"},
        {"over_count_policy": "drop"},
        {"error_body_style": "html"},
        {"max_batch_events": 0},
        {"empty_key_status": 200},
        {"chaos": [ChaosEntry(Fault.status(500), 0.6), ChaosEntry(Fault.status(503), 0.6)]},
    ],
)
def test_bad_options_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        FakeSegmentOptions(**options)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Fault("status"), "code"),
        (lambda: Fault.status(99), "code"),
        (lambda: Fault.bad_success(code=500), "2xx"),
        (lambda: Fault.latency(-1), "ms"),
        (lambda: Fault.latency(10, phase="before_read", accept="after_accept"), "before_response"),
        (lambda: Fault.reset(phase="sometime"), "phase"),
        (lambda: Fault.close(phase="on_accept", accept="after_accept"), "whole request"),
        (lambda: Fault.slow_body(0), "bytes_per_s"),
        (lambda: Fault.from_json({"kind": "status", "code": 500, "colour": "red"}), "unknown"),
        (lambda: Fault.from_json({"kind": "explode"}), "unknown fault kind"),
        (lambda: FaultMatch(nth=0), "nth"),
        (lambda: ChaosEntry(Fault.reset(phase="on_accept"), 0.1), "on_accept"),
    ],
)
def test_bad_faults_are_refused(build: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_on_accept_faults_cannot_filter_on_the_request(fake: FakeSegment) -> None:
    with pytest.raises(ValueError, match="before the request is read"):
        fake.inject(Fault.reset(phase="on_accept"), path="/v1/batch")


@pytest.mark.parametrize(
    "fault",
    [
        Fault.status(503, headers={"Retry-After": "2"}, body="down", accept="after_accept"),
        Fault.rate_limited(3),
        Fault.latency(50, jitter_ms=10, phase="before_read"),
        Fault.hang(),
        Fault.hang(25),
        Fault.reset(phase="mid_response", partial_bytes=10),
        Fault.close(phase="on_accept"),
        Fault.bad_success("{", code=202),
        Fault.slow_body(100, accept="after_accept"),
    ],
)
def test_faults_round_trip_through_json(fault: Fault) -> None:
    assert Fault.from_json(json.loads(json.dumps(fault.to_json()))) == fault


def test_fault_queue_counts_nth_and_times_per_entry() -> None:
    queue = FaultQueue()
    first, second = Fault.status(500), Fault.status(503)
    queue.push(first, FaultMatch(path="/v1/b*", nth=2, times=2))
    queue.push(second, FaultMatch())
    picks = [queue.take_for_request(path, ()) for path in ["/v1/track"] * 1 + ["/v1/batch"] * 4]
    # The track request takes the catch-all; the glob entry skips its first match, then applies
    # to the next two.
    assert picks == [second, None, first, first, None]
    assert len(queue) == 0


def test_fault_queue_is_fifo_among_eligible_entries() -> None:
    queue = FaultQueue()
    faults = [Fault.status(code) for code in (500, 502, 503)]
    for fault in faults:
        queue.push(fault, FaultMatch())
    assert [queue.take_for_request("/v1/batch", ()) for _ in range(4)] == [*faults, None]


def test_fault_queue_write_key_filter() -> None:
    queue = FaultQueue()
    queue.push(Fault.status(500), FaultMatch(write_key="eu-key", times=None))
    assert queue.needs_write_keys()
    assert queue.take_for_request("/v1/batch", ["us-key"]) is None
    assert queue.take_for_request("/v1/batch", ["us-key", "eu-key"]) == Fault.status(500)
    assert queue.take_for_request("/v1/batch", ["eu-key"]) == Fault.status(500)
    assert queue.pending()[0]["applied"] == 2


def test_chaos_table_is_reproducible_from_its_seed() -> None:
    entries = [ChaosEntry(Fault.status(500), 0.3), ChaosEntry(Fault.reset(), 0.2)]

    def draws(seed: int) -> list[Fault | None]:
        table = ChaosTable(entries, seed)
        return [table.draw("/v1/batch", ()) for _ in range(200)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    hits = sum(fault is not None for fault in draws(7))
    assert 60 < hits < 140
