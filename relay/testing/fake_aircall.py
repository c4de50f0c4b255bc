"""A fake of Aircall's Public API, for tests and trials, built to what Aircall documents
(shared/reference/aircall-webhooks.md §2, §3, §7), not to what the relay does:

- HTTP Basic auth with the API id and token: none answers 401, a wrong one 403 (as Aircall does).
- `GET /v1/calls?from=&to=&order=asc|desc&page=&per_page=`: the calls whose `started_at` is
  within `from`..`to` (UNIX seconds, both bounds included), `per_page` at most 50 (more is taken
  as 50; the default is 20), with `meta` {count, total, current_page, per_page, next_page_link,
  previous_page_link}. A listing stops at 10,000 items even with paging: a page past them is
  empty and has no next page, while `meta.total` still counts every call of the window.
- `GET /v1/calls/{id}` → `{"call": {...}}`, 404 when unknown.
- `GET /v1/webhooks` (paged the same way) → `{"webhooks": [...], "meta": {...}}`, each with
  `webhook_id`, `custom_name`, `url`, `active`, `token` (in plain text, as Aircall returns it),
  `events`, `created_at`; `GET /v1/webhooks/{id}`; `PUT /v1/webhooks/{id}` with `url`,
  `custom_name`, `active`, `events`: **a body without `events` resets the webhook to all
  events**, as Aircall documents. → `{"webhook": {...}}`.
- A limit of `requests_per_minute` per fixed minute (None: none), past which it answers 429
  with `Retry-After` and `X-AircallApi-Limit`, `-Remaining`, `-Reset` (a UNIX time). Those
  headers come only once the limit is reached, as observed (S10), unless `limit_headers=
  "always"`.
- Faults: `fail_next(n, status=500)` answers the next `n` API requests with that status, or
  `fail_next(n, body=b"...")` with 200 and that body; `after=k` lets `k` requests through first.

The state lives in memory; `FakeAircall` serves it on loopback from background threads (port 0:
a free one), and `aircall-relay fake-aircall` from the command line. `sample_calls` builds
realistic call objects from the shipped `call.ended` sample.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import hmac
import json
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final, Self
from urllib.parse import parse_qsl, urlencode, urlsplit

import orjson

from relay.aircall import KNOWN_EVENTS
from relay.testing.sample_payloads import sample_payload
from relay.testing.serve_fake import serve_until_signalled

MAX_PER_PAGE: Final[int] = 50
DEFAULT_PER_PAGE: Final[int] = 20
LISTING_CAP: Final[int] = 10_000
ALL_EVENTS: Final[tuple[str, ...]] = tuple(sorted(KNOWN_EVENTS))


def sample_calls(
    count: int, *, first_id: int = 1_000_000_001, start: int = 1_773_151_325, spacing: int = 60
) -> list[dict[str, Any]]:
    """`count` call objects like the shipped `call.ended` sample's `data`, each with its own id,
    times (`started_at` = start + i * spacing, the sample's durations) and links."""
    template = orjson.dumps(sample_payload("call.ended")["data"])
    first = orjson.loads(template)
    answered = first["answered_at"] - first["started_at"]
    ended = first["ended_at"] - first["started_at"]
    calls = []
    for index in range(count):
        call = orjson.loads(template)
        call_id, started = first_id + index, start + index * spacing
        call.update(
            id=call_id,
            direct_link=f"https://api.aircall.io/v1/calls/{call_id}",
            call_uuid=f"CA{uuid.UUID(int=call_id).hex}",
            started_at=started,
            answered_at=started + answered,
            ended_at=started + ended,
            asset=f"https://assets.aircall.io/calls/{call_id}/recording",
            recording=f"https://aircall-recordings.s3.fixture.invalid/call-{call_id}.mp3",
        )
        calls.append(call)
    return calls


class FakeAircallState:
    """The fake's data and rules; every method is thread-safe."""

    def __init__(
        self,
        *,
        api_id: str,
        api_token: str,
        requests_per_minute: int | None = 60,
        limit_headers: str = "on_limit",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.api_id, self.api_token = api_id, api_token
        self.requests_per_minute = requests_per_minute
        self.limit_headers = limit_headers
        self.clock = clock
        self._lock = threading.Lock()
        self._calls: dict[int, dict[str, Any]] = {}
        self._by_start: list[tuple[int, int]] | None = None  # (started_at, id), sorted
        self._webhooks: dict[str, dict[str, Any]] = {}
        self._faults: list[tuple[int, bytes | None] | None] = []  # None: answer normally
        self._requests: list[tuple[str, str, int]] = []  # (method, path with query, status)
        self._window: tuple[float, int] | None = None  # (start, requests in it)

    # -- loading and reading ----------------------------------------------------------------

    def add_calls(self, calls: Iterable[dict[str, Any]]) -> None:
        with self._lock:
            for call in calls:
                self._calls[int(call["id"])] = _copy(call)
            self._by_start = None

    def add_webhook(
        self,
        url: str,
        token: str,
        events: Iterable[str] | None = None,
        active: bool = True,
        custom_name: str = "Webhook",
    ) -> dict[str, Any]:
        webhook_id = str(uuid.uuid4())
        webhook: dict[str, Any] = {
            "webhook_id": webhook_id,
            "direct_link": f"https://api.aircall.io/v1/webhooks/{webhook_id}",
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(self.clock())),
            "url": url,
            "active": active,
            "token": token,
            "events": list(ALL_EVENTS if events is None else events),
            "custom_name": custom_name,
        }
        with self._lock:
            self._webhooks[webhook_id] = webhook
            return _copy(webhook)

    def webhooks(self) -> list[dict[str, Any]]:
        with self._lock:
            return [_copy(webhook) for webhook in self._webhooks.values()]

    def set_webhook_active(self, webhook_id: str, active: bool) -> None:
        """As Aircall does after repeated failed deliveries (or an admin in the Dashboard)."""
        with self._lock:
            self._webhooks[webhook_id]["active"] = active

    def fail_next(
        self, n: int, status: int = 500, body: bytes | None = None, *, after: int = 0
    ) -> None:
        """The next `n` API requests (after `after` answered normally, and after the faults
        already queued) answer `status`, or with `body`, 200 and that body."""
        with self._lock:
            fault = (200 if body is not None else status, body)
            self._faults.extend([None] * after + [fault] * n)

    def request_count(self) -> int:
        with self._lock:
            return len(self._requests)

    def requests(self) -> list[tuple[str, str, int]]:
        with self._lock:
            return list(self._requests)

    # -- answering ----------------------------------------------------------------------------

    def answer(
        self, method: str, target: str, authorization: str | None, body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            status, headers, payload = self._answer(method, target, authorization, body)
            self._requests.append((method, target, status))
            return status, headers, payload

    def _answer(
        self, method: str, target: str, authorization: str | None, body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        if not self._authorized(authorization):
            if authorization is None:
                return _error(401, "Unauthorized", "Authentication is required")
            return _error(403, "Forbidden", "Invalid API credentials")
        limited, limit_headers = self._count_request()
        if limited is not None:
            return limited
        status, headers, payload = self._route(method, target, body)
        if self.limit_headers == "always":
            headers = {**headers, **limit_headers}
        return status, headers, payload

    def _route(self, method: str, target: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        fault = self._faults.pop(0) if self._faults else None
        if fault is not None:
            status, fault_body = fault
            return status, {"Content-Type": "application/json"}, fault_body or b'{"error":"Boom"}'
        parts = urlsplit(target)
        query = dict(parse_qsl(parts.query))
        segments = [part for part in parts.path.split("/") if part]
        if segments[:1] != ["v1"] or len(segments) not in (2, 3):
            return _error(404, "Not found", parts.path)
        resource, item = segments[1], (segments[2] if len(segments) == 3 else None)
        if resource == "calls" and method == "GET":
            if item is None:
                return self._list("calls", self._listed_calls(query), query, parts.path)
            call = self._calls.get(int(item)) if item.isdigit() else None
            return (200, *_json({"call": call})) if call else _error(404, "Not found", "Call")
        if resource == "webhooks" and item is None and method == "GET":
            return self._list("webhooks", list(self._webhooks.values()), query, parts.path)
        if resource == "webhooks" and item is not None and method in ("GET", "PUT"):
            webhook = self._webhooks.get(item)
            if webhook is None:
                return _error(404, "Not found", "Webhook")
            if method == "PUT":
                problem = _update_webhook(webhook, body)
                if problem:
                    return _error(400, "Bad request", problem)
            return (200, *_json({"webhook": webhook}))
        return _error(404 if method == "GET" else 405, "Not found", parts.path)

    def _authorized(self, authorization: str | None) -> bool:
        expected = base64.b64encode(f"{self.api_id}:{self.api_token}".encode()).decode()
        return authorization is not None and hmac.compare_digest(
            authorization.encode(), f"Basic {expected}".encode()
        )

    def _count_request(self) -> tuple[tuple[int, dict[str, str], bytes] | None, dict[str, str]]:
        """(the 429 to answer, or None; the X-AircallApi-* headers)."""
        limit = self.requests_per_minute
        if limit is None:
            return None, {}
        now = self.clock()
        if self._window is None or now >= self._window[0] + 60:
            self._window = (now, 0)
        start, used = self._window
        self._window = (start, used + 1)
        reset = start + 60
        headers = {
            "X-AircallApi-Limit": str(limit),
            "X-AircallApi-Remaining": str(max(0, limit - used - 1)),
            "X-AircallApi-Reset": str(math.ceil(reset)),
        }
        if used >= limit:
            status, error_headers, body = _error(429, "Too Many Requests", "Rate limit reached")
            retry_after = {"Retry-After": str(max(1, math.ceil(reset - now)))}
            return (status, {**error_headers, **headers, **retry_after}, body), headers
        return None, headers

    def _listed_calls(self, query: dict[str, str]) -> list[dict[str, Any]]:
        if self._by_start is None:
            self._by_start = sorted((call["started_at"], key) for key, call in self._calls.items())
        low = int(query.get("from") or 0)
        high = int(query["to"]) if query.get("to") else None
        first = bisect.bisect_left(self._by_start, (low, -(2**63)))
        last = (
            len(self._by_start)
            if high is None
            else bisect.bisect_right(self._by_start, (high, 2**63))
        )
        keys = self._by_start[first:last]
        if query.get("order") == "desc":
            keys = keys[::-1]
        return [self._calls[key] for _, key in keys]

    def _list(
        self, key: str, items: list[dict[str, Any]], query: dict[str, str], path: str
    ) -> tuple[int, dict[str, str], bytes]:
        try:
            page = max(1, int(query.get("page") or 1))
            per_page = min(MAX_PER_PAGE, max(1, int(query.get("per_page") or DEFAULT_PER_PAGE)))
        except ValueError:
            return _error(400, "Bad request", "page and per_page must be integers")
        reachable = items[:LISTING_CAP]
        chunk = reachable[(page - 1) * per_page : page * per_page]

        def link(number: int) -> str:
            return f"https://api.aircall.io{path}?{urlencode({**query, 'page': number})}"

        meta = {
            "count": len(chunk),
            "total": len(items),
            "current_page": page,
            "per_page": per_page,
            "next_page_link": link(page + 1) if page * per_page < len(reachable) else None,
            "previous_page_link": link(page - 1) if page > 1 else None,
        }
        return (200, *_json({key: chunk, "meta": meta}))


def _copy(value: dict[str, Any]) -> dict[str, Any]:
    copied: dict[str, Any] = orjson.loads(orjson.dumps(value))
    return copied


def _json(payload: Any) -> tuple[dict[str, str], bytes]:
    return {"Content-Type": "application/json; charset=utf-8"}, orjson.dumps(payload)


def _error(status: int, error: str, troubleshoot: str) -> tuple[int, dict[str, str], bytes]:
    return status, *_json({"error": error, "troubleshoot": troubleshoot})


def _update_webhook(webhook: dict[str, Any], raw: bytes) -> str | None:
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        return "the body is not JSON"
    if not isinstance(body, dict):
        return "the body is not an object"
    for key, kind in (("url", str), ("custom_name", str), ("active", bool), ("events", list)):
        if key in body and not isinstance(body[key], kind):
            return f"{key} has the wrong type"
    webhook.update({key: body[key] for key in ("url", "custom_name", "active") if key in body})
    # Aircall: a PUT without `events` resets the webhook to all events.
    webhook["events"] = list(body["events"]) if "events" in body else list(ALL_EVENTS)
    return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the request log is the fake's output."""

    def _serve(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, headers, payload = self.server.state.answer(
            self.command, self.path, self.headers.get("Authorization"), body
        )
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_PUT = do_POST = do_DELETE = _serve


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], state: FakeAircallState) -> None:
        self.state = state
        super().__init__(address, _Handler)


class FakeAircall(FakeAircallState):
    """The fake on loopback, from background threads:

    with FakeAircall(api_id="id", api_token="secret-token") as fake:
        fake.add_calls(sample_calls(120))
        webhook = fake.add_webhook("https://relay.example/aircall/webhook", token)
        ... AircallApi(fake.base_url, "id", "secret-token") ...
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, **options: Any) -> None:
        super().__init__(**options)
        self._address = (host, port)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("the fake Aircall server is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> Self:
        self._server = _Server(self._address, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="fake-aircall", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def run_from_cli(args: argparse.Namespace) -> int:
    """`aircall-relay fake-aircall`: serve until SIGTERM or SIGINT. Prints `fake-aircall listening
    on http://HOST:PORT`, then one line per webhook loaded (`webhook <id> <url>`)."""
    fake = FakeAircall(
        host=args.host,
        port=args.port,
        api_id=args.api_id,
        api_token=args.api_token,
        requests_per_minute=args.requests_per_minute or None,
    )
    fake.add_calls(sample_calls(args.calls, start=int(time.time()) - args.calls * 60))

    def add_webhooks() -> None:
        for spec in args.webhooks:
            url, _, token = spec.rpartition("=")
            webhook = fake.add_webhook(url, token, active=not args.inactive)
            print(f"webhook {webhook['webhook_id']} {url}", flush=True)

    return serve_until_signalled(fake, "fake-aircall", args.host, args.port, add_webhooks)
