"""The fake Aircall Public API behaves as Aircall documents (shared/reference/aircall-webhooks.md
§2, §3, §7), checked with a plain HTTP client, not with the relay's."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from relay.aircall import KNOWN_EVENTS
from relay.testing.fake_aircall import FakeAircall, sample_calls

AUTH = ("fake-id", "fake-token-0123456789")
START = 1_773_151_325


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake(clock: Clock) -> Iterator[FakeAircall]:
    with FakeAircall(api_id=AUTH[0], api_token=AUTH[1], clock=clock) as server:
        yield server


def get(fake: FakeAircall, path: str, **params: Any) -> httpx.Response:
    return httpx.get(f"{fake.base_url}{path}", params=params, auth=AUTH)


def test_no_credential_is_401_and_a_wrong_one_403(fake: FakeAircall) -> None:
    assert httpx.get(f"{fake.base_url}/v1/calls").status_code == 401
    wrong = httpx.get(f"{fake.base_url}/v1/calls", auth=(AUTH[0], "another-token-000000"))
    assert wrong.status_code == 403
    assert wrong.json()["error"] == "Forbidden"
    assert get(fake, "/v1/calls").status_code == 200


def test_calls_are_listed_within_from_and_to_with_meta(fake: FakeAircall) -> None:
    calls = sample_calls(120, start=START, spacing=10)
    fake.add_calls(calls)
    low, high = calls[10]["started_at"], calls[109]["started_at"]  # both bounds included
    first = get(fake, "/v1/calls", **{"from": low, "to": high, "order": "asc", "per_page": 50})
    body = first.json()
    assert [call["id"] for call in body["calls"]] == [call["id"] for call in calls[10:60]]
    meta = body["meta"]
    assert meta["count"] == 50 and meta["total"] == 100
    assert meta["current_page"] == 1 and meta["per_page"] == 50
    assert meta["previous_page_link"] is None
    assert "page=2" in meta["next_page_link"]
    last = get(fake, "/v1/calls", **{"from": low, "to": high, "page": 2, "per_page": 50}).json()
    assert last["meta"]["next_page_link"] is None and last["meta"]["count"] == 50
    descending = get(fake, "/v1/calls", order="desc", per_page=5).json()["calls"]
    assert [call["id"] for call in descending] == [call["id"] for call in calls[::-1][:5]]


def test_per_page_is_at_most_50_and_20_by_default(fake: FakeAircall) -> None:
    fake.add_calls(sample_calls(80))
    assert get(fake, "/v1/calls", per_page=200).json()["meta"]["per_page"] == 50
    assert len(get(fake, "/v1/calls").json()["calls"]) == 20


def test_a_listing_stops_at_10000_items_while_total_counts_them_all(fake: FakeAircall) -> None:
    fake.requests_per_minute = None
    fake.add_calls(sample_calls(10_030, spacing=1))
    page_200 = get(fake, "/v1/calls", page=200, per_page=50).json()
    assert page_200["meta"]["count"] == 50 and page_200["meta"]["next_page_link"] is None
    assert page_200["meta"]["total"] == 10_030
    assert get(fake, "/v1/calls", page=201, per_page=50).json()["calls"] == []


def test_one_call_by_id(fake: FakeAircall) -> None:
    calls = sample_calls(2)
    fake.add_calls(calls)
    assert get(fake, f"/v1/calls/{calls[1]['id']}").json() == {"call": calls[1]}
    assert get(fake, "/v1/calls/12").status_code == 404


def test_webhooks_are_paged_and_carry_their_token(fake: FakeAircall) -> None:
    made = [fake.add_webhook(f"https://h/{n}", f"token-{n:014d}") for n in range(23)]
    first = get(fake, "/v1/webhooks").json()
    assert len(first["webhooks"]) == 20 and first["meta"]["total"] == 23
    item = first["webhooks"][0]
    assert {"webhook_id", "url", "active", "token", "events", "custom_name"} <= set(item)
    assert item["token"] == made[0]["token"] and set(item["events"]) == KNOWN_EVENTS
    assert len(get(fake, "/v1/webhooks", page=2).json()["webhooks"]) == 3
    one = get(fake, f"/v1/webhooks/{made[5]['webhook_id']}").json()["webhook"]
    assert one["url"] == "https://h/5"


def test_put_without_events_resets_the_webhook_to_all_events(fake: FakeAircall) -> None:
    hook = fake.add_webhook("https://h/x", "token-0000000000001", ["call.ended"], active=False)
    url = f"{fake.base_url}/v1/webhooks/{hook['webhook_id']}"
    kept = httpx.put(url, json={"active": True, "events": ["call.ended"]}, auth=AUTH)
    assert kept.json()["webhook"]["events"] == ["call.ended"]
    assert kept.json()["webhook"]["active"] is True
    reset = httpx.put(url, json={"active": True}, auth=AUTH).json()["webhook"]
    assert set(reset["events"]) == KNOWN_EVENTS
    assert httpx.put(url, json={"active": "yes"}, auth=AUTH).status_code == 400
    assert httpx.put(f"{fake.base_url}/v1/webhooks/nope", json={}, auth=AUTH).status_code == 404
    assert fake.webhooks()[0]["active"] is True
    fake.set_webhook_active(hook["webhook_id"], False)
    assert get(fake, f"/v1/webhooks/{hook['webhook_id']}").json()["webhook"]["active"] is False


def test_past_the_limit_429_with_retry_after_and_the_limit_headers(
    fake: FakeAircall, clock: Clock
) -> None:
    answers = [get(fake, "/v1/webhooks") for _ in range(61)]
    assert [answer.status_code for answer in answers[:60]] == [200] * 60
    assert "x-aircallapi-limit" not in answers[0].headers  # sent only once the limit is reached
    limited = answers[60]
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "60"
    assert limited.headers["x-aircallapi-limit"] == "60"
    assert limited.headers["x-aircallapi-remaining"] == "0"
    assert int(limited.headers["x-aircallapi-reset"]) == int(clock.now) + 60
    clock.now += 45
    assert get(fake, "/v1/webhooks").headers["retry-after"] == "15"
    clock.now += 15
    assert get(fake, "/v1/webhooks").status_code == 200


def test_fail_next_answers_a_status_or_a_body_then_recovers(fake: FakeAircall) -> None:
    fake.fail_next(2, status=503)
    fake.fail_next(1, body=b"<html>")
    statuses = [get(fake, "/v1/webhooks") for _ in range(4)]
    assert [answer.status_code for answer in statuses] == [503, 503, 200, 200]
    assert statuses[2].content == b"<html>"
    assert fake.request_count() == 4
    fake.fail_next(1, status=502, after=2)
    assert [get(fake, "/v1/webhooks").status_code for _ in range(4)] == [200, 200, 502, 200]


def test_sample_calls_are_the_call_ended_sample_with_their_own_ids_and_times() -> None:
    calls = sample_calls(3, first_id=10, start=1000, spacing=30)
    assert [call["id"] for call in calls] == [10, 11, 12]
    assert [call["started_at"] for call in calls] == [1000, 1030, 1060]
    assert all(call["ended_at"] - call["started_at"] == 312 for call in calls)
    assert calls[0]["number"] == calls[1]["number"] and calls[0]["number"] is not calls[1]["number"]
    assert len({call["call_uuid"] for call in calls}) == 3
