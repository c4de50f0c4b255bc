"""A client of Aircall's Public API: the calls (for reconciliation and back-fill) and the webhooks
(their health), as shared/reference/aircall-webhooks.md §7 has them.

- Basic auth with the API id and token (httpx's `auth`, so the token is in no URL, and no error or
  log line carries the `Authorization` header). Aircall answers 403 to a wrong credential, 401 to
  none: both raise `AircallAuthError`.
- `GET /v1/calls?from=&to=&order=asc&page=&per_page=50` pages through a window; a listing stops
  at 10,000 items even with paging, so a window whose `meta.total` says more is split in halves
  until each half holds at most 10,000. `from` and `to` are UNIX seconds whose bounds Aircall
  does not document as inclusive or exclusive: the client asks one second wider on each side and
  keeps the calls whose `started_at` is in `[since, until)` itself, each call once.
- The pace: `RateLimiter` (limiter.py); a 429 waits for its `Retry-After` (or the
  `X-AircallApi-Reset`) and is tried again, up to `max_rate_limited` times in a row; a 5xx or a
  transport error (refused, reset, timed out) is tried again with a doubling delay, up to
  `max_retries` times. Then `AircallApiError`.
- An answer that is not what Aircall documents (not JSON, no `calls` or `meta`, a call without an
  integer `id` or `started_at`) raises `AircallApiError` saying what was wrong and where; never
  a silent skip.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self
from urllib.parse import quote

import anyio
import httpx

from relay import __version__
from relay.aircall_api.limiter import RateLimiter, retry_after_seconds, seconds_until_reset

if TYPE_CHECKING:
    from relay.settings import Settings

DEFAULT_BASE_URL: Final[str] = "https://api.aircall.io"
PER_PAGE: Final[int] = 50  # Aircall's maximum
LISTING_CAP: Final[int] = 10_000  # a listing stops here, even with paging
EXCERPT_CHARS: Final[int] = 200

# on_page(calls yielded so far, the window's total as Aircall counts it, or None before known)
PageCallback = Callable[[int, int | None], None]


class AircallApiError(Exception):
    """Aircall's Public API failed or answered something unexpected. The message is safe to
    print: it never holds the token or the `Authorization` header."""


class AircallAuthError(AircallApiError):
    """Aircall refused the credentials (401 without them, 403 for a wrong one)."""


class AircallNotFound(AircallApiError):
    """404: no such call or webhook."""


@dataclass(frozen=True, slots=True)
class _Page:
    items: list[dict[str, Any]]
    total: int | None
    next_page: bool


def _timestamp(moment: datetime, name: str) -> float:
    if moment.tzinfo is None:
        raise ValueError(f"{name} must be timezone-aware (UTC), got {moment.isoformat()}")
    return moment.timestamp()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_call(call: Any, where: str) -> dict[str, Any]:
    """The call object if it has what the relay needs (an integer `id`, an integer `started_at`,
    `ended_at` an integer or null), else `AircallApiError` naming the call and the field."""
    if not isinstance(call, dict):
        raise AircallApiError(f"{where}: a call is a JSON {type(call).__name__}, not an object")
    call_id = call.get("id")
    if not _is_int(call_id):
        raise AircallApiError(f"{where}: a call has no integer id (id: {call_id!r:.40})")
    for field, optional in (("started_at", False), ("ended_at", True)):
        value = call.get(field)
        if value is None and optional:
            continue
        if not _is_int(value):
            state = "is missing" if field not in call else f"is {value!r:.40}, not an integer"
            raise AircallApiError(
                f"{where}: call {call_id}: {field} {state} (UNIX seconds expected)"
            )
    return call


def check_webhook(webhook: Any, where: str) -> dict[str, Any]:
    """A webhook object with what the relay reads: `webhook_id`, `url`, `active`, `token`,
    `events` (the token is never quoted)."""
    if not isinstance(webhook, dict):
        raise AircallApiError(f"{where}: a webhook is a JSON {type(webhook).__name__}")
    webhook_id = webhook.get("webhook_id")
    if not isinstance(webhook_id, str) or not webhook_id:
        raise AircallApiError(f"{where}: a webhook has no webhook_id")
    checks = {
        "url": isinstance(webhook.get("url"), str),
        "active": isinstance(webhook.get("active"), bool),
        "token": isinstance(webhook.get("token"), str),
        "events": isinstance(webhook.get("events"), list)
        and all(isinstance(event, str) for event in webhook["events"]),
    }
    wrong = [field for field, ok in checks.items() if not ok]
    if wrong:
        raise AircallApiError(
            f"{where}: webhook {webhook_id}: {', '.join(wrong)} missing or of the wrong type"
        )
    return webhook


class AircallApi:
    """An async context manager over one `httpx.AsyncClient`:

    async with AircallApi.from_settings(settings) as api:
        async for call in api.calls(since, until):
            ...
    """

    def __init__(
        self,
        base_url: str,
        api_id: str,
        api_token: str,
        *,
        requests_per_minute: float | None = None,
        timeout_seconds: float = 30.0,
        max_retries: int = 4,
        max_rate_limited: int = 10,
        retry_base_seconds: float = 1.0,
        max_wait_seconds: float = 120.0,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        limiter: RateLimiter | None = None,
    ) -> None:
        if not api_id or not api_token:
            raise ValueError("an Aircall API id and token are both needed")
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self.max_rate_limited = max_rate_limited
        self.retry_base_seconds = retry_base_seconds
        self._sleep = sleep
        self.limiter = limiter or RateLimiter(
            requests_per_minute, max_wait_seconds=max_wait_seconds, sleep=sleep
        )
        self.requests = 0  # sent, retries included
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            auth=httpx.BasicAuth(api_id, api_token),
            timeout=httpx.Timeout(timeout_seconds),
            headers={"User-Agent": f"aircall-segment-relay/{__version__}"},
            transport=transport,
            follow_redirects=False,
        )

    @classmethod
    def from_settings(cls, settings: Settings, **options: Any) -> AircallApi:
        """The client for `RELAY_AIRCALL_API_*`; `SettingsError` naming them when not set."""
        api_id, api_token = settings.require_aircall_api()
        return cls(settings.aircall_api_url, api_id, api_token, **options)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    # -- the endpoints ---------------------------------------------------------------------

    async def calls(
        self,
        since: datetime,
        until: datetime,
        on_page: PageCallback | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Every call whose `started_at` is in `[since, until)`, oldest first, each once.
        `on_page(calls so far, total)` after each page (the total as Aircall counts the window,
        which is one second wider on each side, so a little more than what is listed), and once
        at the end with the total equal to the calls listed."""
        start, end = _timestamp(since, "since"), _timestamp(until, "until")
        if end <= start:
            return
        seen: set[int] = set()
        progress: dict[str, int | None] = {"total": None}
        windows = [(math.floor(start), math.ceil(end))]
        while windows:
            low, high = windows.pop(0)
            page_number = 1
            while True:
                page = await self._calls_page(low, high, page_number)
                # On any page: calls that started in the window while it was listed can take it
                # past the cap. Its calls listed so far are listed again by the halves, and
                # skipped as already seen.
                if page.total is not None and page.total > LISTING_CAP:
                    if high - low <= 1:
                        raise AircallApiError(
                            f"GET /v1/calls: {page.total} calls started within one second "
                            f"({datetime.fromtimestamp(low, UTC).isoformat()}), more than the "
                            f"{LISTING_CAP} a listing returns"
                        )
                    middle = (low + high) // 2
                    windows[:0] = [(low, middle), (middle, high)]
                    if progress["total"] is None:
                        progress["total"] = page.total
                    break
                if page_number == 1 and progress["total"] is None:
                    progress["total"] = page.total
                for call in page.items:
                    started = call["started_at"]
                    if start <= started < end and call["id"] not in seen:
                        seen.add(call["id"])
                        yield call
                if on_page is not None:
                    total = progress["total"]
                    on_page(len(seen), None if total is None else max(total, len(seen)))
                if not page.next_page or not page.items:
                    break
                page_number += 1
        if on_page is not None:
            on_page(len(seen), len(seen))  # done: the total is what was listed

    async def _calls_page(self, low: int, high: int, page_number: int) -> _Page:
        # One second wider on each side: Aircall does not say whether `from`/`to` include their
        # bound; `calls` keeps [since, until) itself.
        params = {
            "from": str(low - 1),
            "to": str(high),
            "order": "asc",
            "page": str(page_number),
            "per_page": str(PER_PAGE),
        }
        where = f"GET /v1/calls (page {page_number}, from {low - 1} to {high})"
        body = await self._request("GET", "/v1/calls", params=params, where=where)
        page = self._page(body, "calls", where, check_call)
        if page.total is None:
            # Without it a listing cut at 10,000 items could not be told from a complete one.
            raise AircallApiError(f"{where}: the answer's meta has no total")
        return page

    async def call(self, call_id: int) -> dict[str, Any]:
        """`GET /v1/calls/{id}`: the call object (with fresh recording URLs)."""
        where = f"GET /v1/calls/{call_id}"
        body = await self._request("GET", f"/v1/calls/{int(call_id)}", where=where)
        call = body.get("call")
        if call is None:
            raise AircallApiError(f"{where}: the answer has no `call` object")
        return check_call(call, where)

    async def webhooks(self) -> list[dict[str, Any]]:
        """Every webhook of the company (all pages of `GET /v1/webhooks`)."""
        result: list[dict[str, Any]] = []
        page_number = 1
        while True:
            where = f"GET /v1/webhooks (page {page_number})"
            params = {"page": str(page_number), "per_page": str(PER_PAGE)}
            body = await self._request("GET", "/v1/webhooks", params=params, where=where)
            page = self._page(body, "webhooks", where, check_webhook)
            result.extend(page.items)
            if not page.next_page or not page.items:
                return result
            page_number += 1

    async def update_webhook(self, webhook_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """`PUT /v1/webhooks/{id}`; returns the webhook as Aircall now has it. Aircall resets a
        webhook to *all* events when the body has no `events`: send the list to keep it."""
        where = f"PUT /v1/webhooks/{webhook_id}"
        path = f"/v1/webhooks/{quote(webhook_id, safe='')}"
        answer = await self._request("PUT", path, json=body, where=where)
        return check_webhook(answer.get("webhook"), where)

    # -- the wire --------------------------------------------------------------------------

    @staticmethod
    def _page(
        body: dict[str, Any],
        key: str,
        where: str,
        check: Callable[[Any, str], dict[str, Any]],
    ) -> _Page:
        items, meta = body.get(key), body.get("meta")
        if not isinstance(items, list):
            raise AircallApiError(f"{where}: the answer has no `{key}` list")
        if not isinstance(meta, dict):
            raise AircallApiError(f"{where}: the answer has no `meta` object")
        total = meta.get("total")
        if total is not None and not _is_int(total):
            raise AircallApiError(f"{where}: meta.total is {total!r:.40}, not an integer")
        next_link = meta.get("next_page_link")
        if next_link is not None and not isinstance(next_link, str):
            raise AircallApiError(f"{where}: meta.next_page_link is not a string or null")
        return _Page([check(item, where) for item in items], total, bool(next_link))

    async def _request(
        self,
        method: str,
        path: str,
        *,
        where: str,
        params: dict[str, str] | None = None,
        json: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """One API request, paced and retried; the answer's JSON object."""
        failures = 0
        rate_limited = 0
        while True:
            await self.limiter.wait_turn()
            self.requests += 1
            try:
                response = await self._client.request(method, path, params=params, json=json)
            except httpx.TransportError as error:
                failures += 1
                problem = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
                if failures > self.max_retries:
                    raise AircallApiError(
                        f"{where}: no answer from {self.base_url} after {failures} attempts "
                        f"({problem[:EXCERPT_CHARS]})"
                    ) from None
                await self._backoff(failures)
                continue
            self.limiter.observe(response.headers)
            status = response.status_code
            if status == 429:
                rate_limited += 1
                if rate_limited > self.max_rate_limited:
                    raise AircallApiError(
                        f"{where}: still rate limited (429) after {rate_limited} attempts; "
                        "another integration may be using the company's requests"
                    )
                wait = retry_after_seconds(response.headers.get("retry-after"), _now())
                if wait is None:
                    wait = seconds_until_reset(response.headers.get("x-aircallapi-reset"), _now())
                self.limiter.hold_for(60.0 if wait is None else wait)
                continue
            if status >= 500:
                failures += 1
                if failures > self.max_retries:
                    raise AircallApiError(
                        f"{where}: Aircall answered {status} {_excerpt(response)} "
                        f"{failures} times in a row"
                    )
                await self._backoff(failures)
                continue
            if status in (401, 403):
                raise AircallAuthError(
                    f"{where}: Aircall refused the credentials ({status}): check "
                    "RELAY_AIRCALL_API_ID and RELAY_AIRCALL_API_TOKEN (an API key of the "
                    "company, from the Aircall Dashboard)"
                )
            if status == 404:
                raise AircallNotFound(f"{where}: not found (404) {_excerpt(response)}")
            if status != 200:
                raise AircallApiError(f"{where}: Aircall answered {status} {_excerpt(response)}")
            return _json_object(response, where)

    async def _backoff(self, failures: int) -> None:
        await self._sleep(min(self.retry_base_seconds * 2 ** (failures - 1), 30.0))


def _now() -> float:
    return datetime.now(UTC).timestamp()


def _excerpt(response: httpx.Response) -> str:
    text = response.content[:EXCERPT_CHARS].decode("utf-8", "replace")
    text = " ".join(text.split())
    return f"({text!r})" if text else "(empty body)"


def _json_object(response: httpx.Response, where: str) -> dict[str, Any]:
    content_type = response.headers.get("content-type", "no content type")
    try:
        body = response.json()
    except ValueError:
        raise AircallApiError(
            f"{where}: the answer is not JSON ({content_type}, {len(response.content)} bytes: "
            f"{_excerpt(response)})"
        ) from None
    if not isinstance(body, dict):
        raise AircallApiError(f"{where}: the answer is a JSON {type(body).__name__}, not an object")
    return body
