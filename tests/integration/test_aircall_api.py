"""The client of Aircall's Public API (relay/aircall_api) over real HTTP against the fake Aircall:
paging, the split of a window past 10,000 calls, the pace (limiter, X-AircallApi-* headers, 429
with Retry-After), and a clear error for bad credentials, 5xx, transport errors, garbage and call
objects missing what the relay needs.

Waits go through a clock of the test's (`ManualClock`), shared by the fake's limit and the client's
limiter, so a minute of rate limiting takes no time and every wait is recorded.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from relay.aircall_api import AircallApi, AircallApiError, AircallAuthError, RateLimiter
from relay.testing.fake_aircall import FakeAircall, sample_calls

pytestmark = pytest.mark.anyio

API_ID = "fake-api-id"
API_TOKEN = "fake-api-token-0123456789abcdef"
START = 1_773_151_325


class ManualClock:
    """Time that moves only when the client sleeps."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 3))
        self.now += seconds


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def fake_aircall(
    clock: ManualClock, requests_per_minute: int | None = None, **options: Any
) -> FakeAircall:
    """The fake Aircall with the test's credentials and clock."""
    return FakeAircall(
        api_id=API_ID,
        api_token=API_TOKEN,
        requests_per_minute=requests_per_minute,
        clock=clock,
        **options,
    )


@pytest.fixture
def fake(clock: ManualClock) -> Iterator[FakeAircall]:
    with fake_aircall(clock) as server:
        yield server


def api_for(
    server: FakeAircall | str,
    clock: ManualClock,
    requests_per_minute: float | None = 0,
    **options: Any,
) -> AircallApi:
    """A client of `server` (the fake, or a base URL) whose waits all go through `clock`."""
    limiter = RateLimiter(requests_per_minute, clock=clock, wall_clock=clock, sleep=clock.sleep)
    return AircallApi(
        server if isinstance(server, str) else server.base_url,
        options.pop("api_id", API_ID),
        options.pop("api_token", API_TOKEN),
        limiter=limiter,
        sleep=clock.sleep,
        **options,
    )


def at(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


async def all_calls(api: AircallApi, since: int, until: int, **options: Any) -> list[int]:
    return [call["id"] async for call in api.calls(at(since), at(until), **options)]


async def test_calls_pages_through_the_window_each_call_once_in_order(
    fake: FakeAircall, clock: ManualClock
) -> None:
    calls = sample_calls(130, start=START, spacing=10)
    fake.add_calls(calls)
    progress: list[tuple[int, int | None]] = []
    async with api_for(fake, clock) as api:
        # [since, until): the call starting at `since` is in, the one at `until` is not.
        got = await all_calls(
            api,
            calls[3]["started_at"],
            calls[128]["started_at"],
            on_page=lambda *p: progress.append(p),
        )
    assert got == [call["id"] for call in calls[3:128]]
    listings = [target for _, target, _ in fake.requests() if target.startswith("/v1/calls?")]
    assert len(listings) == 3  # 50 + 50 + 26 (the window asked one second wider each side)
    assert all("per_page=50" in target and "order=asc" in target for target in listings)
    # Aircall's count is of the wider window; at the end, the count is what was listed.
    assert progress[-2:] == [(125, 126), (125, 125)]
    assert [done for done, _ in progress] == sorted(done for done, _ in progress)


async def test_an_empty_or_reversed_window_asks_nothing(
    fake: FakeAircall, clock: ManualClock
) -> None:
    async with api_for(fake, clock) as api:
        assert await all_calls(api, START, START) == []
        assert await all_calls(api, START + 10, START) == []
    assert fake.request_count() == 0


async def test_naive_datetimes_are_refused(fake: FakeAircall, clock: ManualClock) -> None:
    async with api_for(fake, clock) as api:
        with pytest.raises(ValueError, match="timezone-aware"):
            [call async for call in api.calls(datetime(2026, 1, 1), datetime(2026, 1, 2))]


async def test_a_window_over_10000_calls_is_split_until_every_call_is_listed(
    fake: FakeAircall, clock: ManualClock
) -> None:
    """Aircall's listing stops at 10,000 items even with paging (the fake's pages past them are
    empty): a client that trusted the pages alone would miss the rest."""
    calls = sample_calls(10_060, start=START, spacing=1)
    fake.add_calls(calls)
    progress: list[tuple[int, int | None]] = []
    async with api_for(fake, clock) as api:
        got = await all_calls(api, START, START + len(calls), on_page=lambda *p: progress.append(p))
    assert got == [call["id"] for call in calls]
    windows = {
        target.split("&page=")[0]
        for _, target, _ in fake.requests()
        if target.startswith("/v1/calls?")
    }
    assert len(windows) >= 3  # the whole window, then its halves
    assert progress[-1][0] == len(calls) and progress[-1][1] is not None


async def test_more_than_10000_calls_within_one_second_is_a_clear_error(
    fake: FakeAircall, clock: ManualClock
) -> None:
    fake.fail_next(
        1,
        body=json.dumps(
            {"calls": [], "meta": {"total": 10_001, "count": 0, "next_page_link": None}}
        ).encode(),
    )
    async with api_for(fake, clock) as api:
        with pytest.raises(AircallApiError, match="within one second"):
            await all_calls(api, START, START + 1)


async def test_call_returns_the_call_object(fake: FakeAircall, clock: ManualClock) -> None:
    calls = sample_calls(3, start=START)
    fake.add_calls(calls)
    async with api_for(fake, clock) as api:
        assert await api.call(calls[1]["id"]) == calls[1]
        with pytest.raises(AircallApiError, match="404"):
            await api.call(5)


async def test_the_limiter_spaces_requests_at_the_rate(
    fake: FakeAircall, clock: ManualClock
) -> None:
    async with api_for(fake, clock, requests_per_minute=60) as api:
        for _ in range(4):
            await api.webhooks()
    assert clock.sleeps == [1.0, 1.0, 1.0]


async def test_the_default_rate_is_60_a_minute_then_what_the_api_states(clock: ManualClock) -> None:
    with fake_aircall(clock, 120, limit_headers="always") as fake:
        async with api_for(fake, clock, requests_per_minute=None) as api:
            assert api.limiter.requests_per_minute == 60
            for _ in range(3):
                await api.webhooks()
            assert api.limiter.requests_per_minute == 120
    assert clock.sleeps == [1.0, 0.5]


async def test_an_explicit_rate_is_a_cap_the_api_does_not_raise(clock: ManualClock) -> None:
    with fake_aircall(clock, 120, limit_headers="always") as fake:
        async with api_for(fake, clock, requests_per_minute=30) as api:
            await api.webhooks()
            assert api.limiter.requests_per_minute == 30


async def test_a_429_waits_for_retry_after_then_goes_on(clock: ManualClock) -> None:
    calls = sample_calls(400, start=START, spacing=1)
    with fake_aircall(clock, 3) as fake:
        fake.add_calls(calls)
        async with api_for(fake, clock) as api:  # no pacing of its own
            got = await all_calls(api, START, START + 400)
    assert got == [call["id"] for call in calls]
    statuses = [status for _, _, status in fake.requests()]
    assert statuses.count(429) == 2  # 8 pages at 3 a minute: two waits for the next minute
    assert statuses.count(200) == 8
    assert clock.sleeps == [60.0, 60.0]


async def test_remaining_and_reset_headers_hold_requests_before_a_429(clock: ManualClock) -> None:
    with fake_aircall(clock, 2, limit_headers="always") as fake:
        async with api_for(fake, clock) as api:
            for _ in range(3):
                await api.webhooks()
    assert [status for _, _, status in fake.requests()] == [200, 200, 200]
    assert clock.sleeps == [60.0]


async def test_429s_without_end_give_up_with_a_clear_error(
    fake: FakeAircall, clock: ManualClock
) -> None:
    fake.fail_next(50, status=429)
    async with api_for(fake, clock, max_rate_limited=3) as api:
        with pytest.raises(AircallApiError, match=r"still rate limited \(429\) after 4 attempts"):
            await api.webhooks()
    assert fake.request_count() == 4


async def test_wrong_credentials_are_an_auth_error_that_shows_no_secret(
    fake: FakeAircall, clock: ManualClock
) -> None:
    wrong = "a-wrong-token-4242424242"
    async with api_for(fake, clock, api_token=wrong) as api:
        with pytest.raises(AircallAuthError) as raised:
            await api.webhooks()
    message = str(raised.value)
    assert "403" in message and "RELAY_AIRCALL_API_TOKEN" in message
    assert wrong not in message and API_TOKEN not in message and "Basic" not in message
    assert fake.request_count() == 1  # not retried


async def test_5xx_is_retried_a_bounded_number_of_times(
    fake: FakeAircall, clock: ManualClock
) -> None:
    fake.add_webhook("https://relay.example/hook", "webhook-token-0123456789")
    fake.fail_next(2, status=503)
    async with api_for(fake, clock) as api:
        assert len(await api.webhooks()) == 1
    assert clock.sleeps == [1.0, 2.0]
    fake.fail_next(10, status=502)
    async with api_for(fake, clock, max_retries=2) as api:
        with pytest.raises(AircallApiError, match=r"answered 502 .* 3 times in a row"):
            await api.webhooks()


async def test_no_answer_at_all_is_a_clear_error(clock: ManualClock) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    async with api_for(f"http://127.0.0.1:{port}", clock, max_retries=1) as api:
        with pytest.raises(AircallApiError, match=r"no answer from .* after 2 attempts"):
            await api.webhooks()


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"<html>Bad gateway</html>", r"not JSON \(application/json, 24 bytes"),
        (b"[]", "a JSON list, not an object"),
        (b'{"meta": {"total": 1}}', "no `calls` list"),
        (b'{"calls": []}', "no `meta` object"),
        (b'{"calls": [], "meta": {"total": "many"}}', "meta.total is 'many'"),
        (b'{"calls": [], "meta": {"count": 0}}', "meta has no total"),
        (b'{"calls": [{"started_at": 1}], "meta": {}}', "a call has no integer id"),
        (b'{"calls": [{"id": 77}], "meta": {}}', "call 77: started_at is missing"),
        (
            b'{"calls": [{"id": 78, "started_at": "2026-03-10T14:02:05Z"}], "meta": {}}',
            "call 78: started_at is '2026-03-10T14:02:05Z', not an integer",
        ),
        (
            b'{"calls": [{"id": 79, "started_at": 1, "ended_at": "soon"}], "meta": {}}',
            "call 79: ended_at is 'soon', not an integer",
        ),
    ],
)
async def test_garbage_is_a_clear_error_naming_what_and_where(
    fake: FakeAircall, clock: ManualClock, body: bytes, expected: str
) -> None:
    fake.fail_next(1, body=body)
    async with api_for(fake, clock) as api:
        with pytest.raises(AircallApiError, match=expected) as raised:
            await all_calls(api, START, START + 60)
    assert "GET /v1/calls (page 1" in str(raised.value)
    assert fake.request_count() == 1  # a 200 with garbage is not retried


async def test_a_call_object_missing_fields_names_the_call(
    fake: FakeAircall, clock: ManualClock
) -> None:
    [call] = sample_calls(1, first_id=4242)
    del call["started_at"]
    fake.add_calls([call])
    async with api_for(fake, clock) as api:
        with pytest.raises(AircallApiError, match=r"GET /v1/calls/4242: call 4242: started_at is"):
            await api.call(4242)


async def test_webhooks_lists_every_page_and_update_keeps_what_is_sent(
    fake: FakeAircall, clock: ManualClock
) -> None:
    made = [
        fake.add_webhook(f"https://relay.example/{n}", f"webhook-token-{n:012d}", ["call.ended"])
        for n in range(120)
    ]
    async with api_for(fake, clock) as api:
        listed = await api.webhooks()
        assert [hook["webhook_id"] for hook in listed] == [hook["webhook_id"] for hook in made]
        updated = await api.update_webhook(
            made[7]["webhook_id"], {"active": False, "events": ["call.ended"]}
        )
    assert updated["active"] is False and updated["events"] == ["call.ended"]
    assert [target for _, target, _ in fake.requests()][:3] == [
        f"/v1/webhooks?page={page}&per_page=50" for page in (1, 2, 3)
    ]


async def test_from_settings_needs_the_api_settings() -> None:
    from relay.settings import Secret, Settings, SettingsError

    with pytest.raises(
        SettingsError, match="RELAY_AIRCALL_API_ID and RELAY_AIRCALL_API_TOKEN: not"
    ):
        AircallApi.from_settings(Settings())
    with pytest.raises(SettingsError, match=r"^RELAY_AIRCALL_API_TOKEN: not set"):
        AircallApi.from_settings(Settings(aircall_api_id="id"))
    settings = Settings(
        aircall_api_id="id", aircall_api_token=Secret(API_TOKEN), aircall_api_url="http://x:1/"
    )
    async with AircallApi.from_settings(settings) as api:
        assert api.base_url == "http://x:1"
        assert api.limiter.requests_per_minute == 60


async def test_a_window_that_grows_past_10000_while_listed_is_split_then(
    fake: FakeAircall, clock: ManualClock
) -> None:
    """Calls that start in the window while it is being listed (a window that ends now) can take
    it past the cap after its first page: the rest would be cut at 10,000 without a word."""
    calls = sample_calls(10_050, start=START, spacing=1)
    fake.add_calls(calls[:9_990])
    got: list[int] = []
    async with api_for(fake, clock) as api:
        async for call in api.calls(at(START), at(START + len(calls))):
            got.append(call["id"])
            if len(got) == 1:
                fake.add_calls(calls[9_990:])
    assert got == [call["id"] for call in calls]
