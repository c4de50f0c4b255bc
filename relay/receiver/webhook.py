"""The webhook route, answered at the ASGI level in front of the Quart app.

Every other route (`/healthz`, `/readyz`, `/metrics`, and anything unknown) goes to Quart. The
webhook is the one route on the hot path, and Quart's request handling (a request context, a
`Request` and a `Response` object, Werkzeug's header parsing, its before/after hooks and two tasks
per request to watch for a disconnect) cost more CPU than the whole of the relay's own work per
webhook (docs/performance.md, "Where a webhook's CPU goes"). Here the request is read straight
from Hypercorn's ASGI messages: the two headers the contract looks at, the body, and the answer,
with the same checks in the same order, the same statuses, bodies and headers
(`relay/receiver/app.py`, `handle_webhook`).

The port rule that Quart's `before_request` hook applied is here too, for every request: the
metrics port (`RELAY_RECEIVER_METRICS_PORT`) serves only `GET /metrics`, the webhook port never
serves `/metrics`; anything else is a 404.

A client that disconnects while its webhook waits for the commit stops waiting (as when Quart
cancelled its request): the shared write goes on, its event included (`CommitBatcher.submit`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final

from relay import aircall
from relay.logs import get_logger

# ASGI's types, loosely: Hypercorn's and Quart's own are TypedDict unions.
Scope = Any
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]
ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]

JSON_HEADER: Final = (b"content-type", b"application/json")

log = get_logger("relay.receiver")


class BodyTooLarge(Exception):
    """The body grew past the limit while being read (a chunked body with no length)."""


class ClientGone(Exception):
    """The client disconnected before its body was read: nobody to answer."""


class Answer:
    """What the webhook route answers: status, JSON body, extra headers."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, body: dict[str, Any], **headers: str) -> None:
        self.status = status
        self.body = aircall.canonical_json_bytes(body)
        self.headers = [
            (name.replace("_", "-").lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in headers.items()
        ]

    @classmethod
    def error(cls, status: int, error: str, detail: str, **headers: str) -> Answer:
        return cls(status, {"error": error, "detail": detail}, **headers)

    async def send(self, send: Send) -> None:
        headers = [JSON_HEADER, (b"content-length", b"%d" % len(self.body)), *self.headers]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


class WebhookRequest:
    """What the contract reads of a webhook request: two headers and the body."""

    __slots__ = ("_receive", "content_length", "mimetype")

    def __init__(self, scope: Scope, receive: Receive) -> None:
        self._receive = receive
        content_type = content_length = None
        chunked = False
        for name, value in scope["headers"]:
            if name == b"content-type":
                if content_type is None:
                    content_type = value
            elif name == b"content-length":
                if content_length is None:
                    content_length = value
            elif name == b"transfer-encoding":
                chunked = chunked or b"chunked" in value.lower()
        # As Werkzeug reads them: the media type without parameters, lowercase; no length for a
        # chunked body (h11 has already refused a malformed Content-Length).
        self.mimetype = (
            ""
            if content_type is None
            else content_type.split(b";", 1)[0].strip().lower().decode("latin-1")
        )
        self.content_length: int | None = (
            None if chunked or content_length is None else int(content_length)
        )

    async def body(self, limit: int) -> bytes:
        """The whole body; `BodyTooLarge` once it grows past `limit` bytes."""
        message = await self._receive()
        if message["type"] != "http.request":
            raise ClientGone
        body: bytes = message.get("body", b"")
        if not message.get("more_body", False) and len(body) <= limit:
            return body
        parts = [body]
        size = len(body)
        while message.get("more_body", False):
            if size > limit:
                raise BodyTooLarge
            message = await self._receive()
            if message["type"] != "http.request":
                raise ClientGone
            chunk = message.get("body", b"")
            parts.append(chunk)
            size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        return b"".join(parts)

    async def until_disconnect(self, waiting: asyncio.Task[Any]) -> None:
        """Cancel `waiting` when the client disconnects (the body has been read: the next
        message can only be `http.disconnect`)."""
        message = await self._receive()
        if message["type"] == "http.disconnect":
            waiting.cancel()


class ReceiverRoutes:
    """The ASGI app Hypercorn serves: the webhook route and the port rule, then Quart."""

    def __init__(
        self,
        quart: ASGIApp,
        webhook_path: str,
        handle: Callable[[WebhookRequest], Awaitable[Answer]],
        metrics_port: Callable[[], int | None],
    ) -> None:
        self._quart = quart
        self._path = webhook_path
        self._handle = handle
        self._metrics_port = metrics_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._quart(scope, receive, send)
            return
        path = scope["path"]
        port = self._metrics_port()
        server = scope.get("server")
        on_metrics_port = port is not None and server is not None and server[1] == port
        if on_metrics_port != (path == "/metrics"):
            detail = (
                "this port serves only GET /metrics"
                if on_metrics_port
                else "/metrics is served on RELAY_RECEIVER_METRICS_PORT"
            )
            await Answer.error(404, "not_found", detail).send(send)
        elif path != self._path:
            await self._quart(scope, receive, send)
        elif scope["method"] != "POST":
            await Answer.error(
                405, "method_not_allowed", "the webhook takes POST only", Allow="POST"
            ).send(send)
        else:
            await self._webhook(scope, receive, send)

    async def _webhook(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            answer = await self._handle(WebhookRequest(scope, receive))
        except ClientGone:
            return
        except Exception as error:  # a bug: answer 500 and say so, as Quart would have
            log.error("webhook_failed", error=f"{type(error).__name__}: {error}")
            answer = Answer.error(500, "internal_error", "the relay failed; retry later")
        await answer.send(send)


async def wait_unless_disconnected(request: WebhookRequest, waiting: Awaitable[Any]) -> Any:
    """Await `waiting` (the commit); a disconnect of the client cancels this request's task,
    and so its wait, not the shared write."""
    task = asyncio.current_task()
    assert task is not None
    watcher = asyncio.get_running_loop().create_task(request.until_disconnect(task))
    try:
        return await waiting
    finally:
        watcher.cancel()
