"""What a request to the fake Segment server is: its route (spec §1), its decoding, measuring,
parsing and write keys (spec §2, steps 2 to 8), and the response catalogue (spec §7).

Pure and lock-free: `analyze_request` runs before the state takes its lock.
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final, Literal
from urllib.parse import parse_qsl, urlsplit

from relay.testing.fake_segment_config import ErrorBodyStyle, FakeSegmentOptions
from relay.testing.fake_segment_messages import MESSAGE_KINDS

RouteFamily = Literal["server", "short", "pixel", "control", "health", "not_found"]

SERVER_ROUTES: Final[Mapping[str, str]] = {
    "/v1/identify": "identify",
    "/v1/track": "track",
    "/v1/page": "page",
    "/v1/screen": "screen",
    "/v1/group": "group",
    "/v1/alias": "alias",
    "/v1/batch": "batch",
    "/v1/import": "batch",
}
SHORT_ROUTES: Final[Mapping[str, str]] = {
    "/v1/i": "identify",
    "/v1/t": "track",
    "/v1/p": "page",
    "/v1/s": "screen",
    "/v1/g": "group",
    "/v1/a": "alias",
    "/v1/b": "batch",
}
PIXEL_PREFIX: Final = "/v1/pixel/"
CONTROL_PREFIX: Final = "/__fake/"
HEALTH_PATH: Final = "/internal/health"


# Why a request was refused (the `error` of its log entry, the `code` of a JSON error body).
REQUEST_ERRORS: Final[Mapping[str, str]] = {
    "malformed_gzip": "Malformed gzip content",
    "unsupported_content_encoding": "Unsupported Content-Encoding",
    "body_too_large": "Request body is over the size limit",
    "bad_content_type": "Content-Type must be application/json",
    "invalid_json": "Body is not valid JSON",
    "not_an_object": "Body must be a JSON object",
    "batch_not_array": "batch must be an array",
    "event_too_large": "An event in the batch is over the size limit",
    "missing_write_key": "Missing or empty write key",
    "unknown_write_key": "Unknown write key",
    "rate_limited": "Too Many Requests",
    "not_found": "Not Found",
    "method_not_allowed": "Method Not Allowed",
}


SUCCESS_BODY: Final = b'{"success": true}'
_TRANSPARENT_GIF: Final = base64.b64decode(
    b"R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7"
)
_HOP_BY_HOP_HEADERS: Final[frozenset[str]] = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Gunzipping stops here whatever the limits, so a small gzip bomb cannot eat the test's memory.
_MAX_DECODED_BYTES: Final = 64 * 1024 * 1024


# HTTP values exchanged with the server


@dataclass(frozen=True)
class HttpResponse:
    """A response the server sends (or would have sent, for inspection)."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def body_text(self) -> str:
        return self.body.decode("utf-8", "replace")


@dataclass(frozen=True)
class IncomingRequest:
    """One HTTP request as read off the wire. Header names are lower case."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    connection_id: int = 0
    # The server stopped reading a body larger than it will ever hold.
    body_over_wire_limit: bool = False
    raw_size: int | None = None

    def header(self, name: str) -> str | None:
        for header_name, value in self.headers:
            if header_name == name:
                return value
        return None


@dataclass(frozen=True)
class Route:
    family: RouteFamily
    path: str
    kind: str | None
    query: Mapping[str, str]
    method_allowed: bool


def classify_route(method: str, target: str) -> Route:
    """Route a request (spec §1): lower-case the path and strip one trailing slash first."""
    if target.startswith(("http://", "https://")):
        parts = urlsplit(target)
        raw_path, raw_query = parts.path or "/", parts.query
    else:
        raw_path, _, raw_query = target.partition("?")
    path = raw_path.lower()
    if len(path) > 1 and path.endswith("/"):
        path = path[:-1]
    query = dict(parse_qsl(raw_query, keep_blank_values=True))
    if path in SERVER_ROUTES:
        return Route("server", path, SERVER_ROUTES[path], query, method in ("POST", "PUT"))
    if path in SHORT_ROUTES:
        return Route("short", path, SHORT_ROUTES[path], query, method in ("GET", "POST", "PUT"))
    if path.startswith(PIXEL_PREFIX) and path[len(PIXEL_PREFIX) :] in MESSAGE_KINDS:
        return Route("pixel", path, path[len(PIXEL_PREFIX) :], query, method == "GET")
    if path.startswith(CONTROL_PREFIX):
        return Route("control", path, None, query, method in ("GET", "POST"))
    if path == HEALTH_PATH:
        return Route("health", path, None, query, method in ("GET", "HEAD"))
    return Route("not_found", path, None, query, True)


# The response catalogue (spec §7)


def success_response() -> HttpResponse:
    return HttpResponse(200, (("Content-Type", "application/json"),), SUCCESS_BODY)


def pixel_response() -> HttpResponse:
    return HttpResponse(200, (("Content-Type", "image/gif"),), _TRANSPARENT_GIF)


def cors_preflight_response() -> HttpResponse:
    return HttpResponse(
        204,
        (
            ("Access-Control-Allow-Origin", "*"),
            ("Access-Control-Allow-Methods", "GET, POST, PUT, OPTIONS"),
            ("Access-Control-Allow-Headers", "*"),
            ("Access-Control-Max-Age", "86400"),
        ),
        b"",
    )


def error_response(
    status: int,
    code: str,
    style: ErrorBodyStyle,
    *,
    message: str | None = None,
    headers: tuple[tuple[str, str], ...] = (),
) -> HttpResponse:
    """A 4xx/5xx in the configured style: the bare reason phrase, or Segment-like JSON."""
    phrase = _reason_phrase(status)
    if style == "json":
        payload = {"success": False, "code": code, "message": message or phrase}
        return HttpResponse(
            status,
            (("Content-Type", "application/json"), *headers),
            json.dumps(payload).encode(),
        )
    return HttpResponse(status, (("Content-Type", "text/plain"), *headers), phrase.encode())


def _reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


# Request analysis: the pure, lock-free part of the pipeline (spec §2 steps 2-8)


@dataclass
class PendingMessage:
    position: int
    element: object
    write_key: object


@dataclass
class RequestAnalysis:
    route: Route
    flags: list[str]
    raw_size: int
    decoded_size: int | None
    content_encoding: str | None
    content_type: str | None
    auth_mode: str
    write_keys_seen: list[str]
    error: str | None
    body: dict[str, Any] | None
    logged_body: object
    messages: list[PendingMessage]

    @property
    def is_batch(self) -> bool:
        return self.route.kind == "batch"


def _parse_authorization(header: str | None, flags: list[str]) -> tuple[str | None, str | None]:
    """(write key from Basic auth, auth mode of the header)."""
    if header is None:
        return None, None
    scheme, _, credentials = header.strip().partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer":
        return None, "bearer"
    if scheme != "basic":
        flags.append("unknown_authorization_scheme")
        return None, None
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        flags.append("bad_basic_auth")
        return None, None
    if ":" not in decoded:
        flags.append("basic_without_colon")
        return decoded, "basic"
    username, _, password = decoded.partition(":")
    if password:
        # Segment's key is the username and the password must be empty; this credential is not
        # a write key, so it is ignored (and flagged) rather than guessed at.
        flags.append("basic_with_password")
        return None, None
    return username, "basic"


def _decode_data_parameter(value: str | None, flags: list[str]) -> bytes:
    if value is None:
        return b""
    padded = value + "=" * (-len(value) % 4)
    try:
        return base64.b64decode(padded, altchars=b"-_" if ("-" in value or "_" in value) else None)
    except (binascii.Error, ValueError):
        flags.append("bad_data_parameter")
        return b""


def _gunzip(raw: bytes) -> bytes | None:
    decompressor = zlib.decompressobj(wbits=31)
    try:
        decoded = decompressor.decompress(raw, _MAX_DECODED_BYTES)
        if not decompressor.eof:
            return None
    except zlib.error:
        return None
    return decoded


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _compact_size(element: object) -> int:
    return len(json.dumps(element, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def analyze_request(
    request: IncomingRequest, route: Route, options: FakeSegmentOptions
) -> RequestAnalysis:
    """Decode, measure and parse a request, and resolve its write keys, without touching state.

    `error` is the first failing step in the spec's order; the later steps still run where they
    can, so the request log shows as much as possible of a refused request.
    """
    flags: list[str] = []
    errors: list[str] = []
    content_encoding = request.header("content-encoding")
    content_type = request.header("content-type")
    basic_key, header_auth_mode = _parse_authorization(request.header("authorization"), flags)
    raw = request.body
    if route.family in ("short", "pixel") and request.method == "GET":
        raw = _decode_data_parameter(route.query.get("data"), flags)
    raw_size = request.raw_size if request.raw_size is not None else len(raw)

    # Step 2: transfer decoding.
    decoded: bytes | None = raw
    encoding = (content_encoding or "").strip().lower()
    if request.body_over_wire_limit:
        errors.append("body_too_large")
    if encoding == "gzip":
        decoded = _gunzip(raw)
        if decoded is None:
            errors.append("malformed_gzip")
    elif encoding not in ("", "identity"):
        decoded = None
        errors.append("unsupported_content_encoding")

    # Step 3: decoded size.
    limit = options.max_batch_bytes if route.kind == "batch" else options.max_single_bytes
    if decoded is not None and len(decoded) > limit:
        errors.append("body_too_large")

    # Step 4: content type, only meaningful for a body sent as such.
    if request.method != "GET":
        media_type = (content_type or "").split(";", 1)[0].strip().lower()
        if media_type != "application/json":
            flags.append("bad_content_type")
            if options.strict_content_type:
                errors.append("bad_content_type")

    # Step 5: a single JSON object.
    body: dict[str, Any] | None = None
    logged_body: object = None
    if decoded is not None:
        try:
            parsed = json.loads(decoded.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError):
            errors.append("invalid_json")
            logged_body = decoded.decode("utf-8", "replace")
        else:
            logged_body = parsed
            if isinstance(parsed, dict):
                body = parsed
            else:
                errors.append("not_an_object")

    messages: list[PendingMessage] = []
    write_keys_seen: list[str] = []

    def see(key: object) -> None:
        if isinstance(key, str) and key and key not in write_keys_seen:
            write_keys_seen.append(key)

    see(basic_key)
    body_key: object = None
    if body is not None:
        body_key = body.get("writeKey")
        see(body_key)
        # Steps 6 and 7: shape and per-event size, batch kinds only.
        elements: list[object]
        if route.kind == "batch":
            batch = body.get("batch", [])
            if batch is None:
                batch = []
            if isinstance(batch, list):
                elements = batch
                if any(_compact_size(element) > options.max_event_bytes for element in elements):
                    errors.append("event_too_large")
            else:
                elements = []
                errors.append("batch_not_array")
        elif route.kind is not None:
            single = {name: value for name, value in body.items() if name != "writeKey"}
            single["type"] = route.kind
            elements = [single]
        else:
            elements = []
        # Step 8: the write key of each message: its own, then the body's, then Basic auth.
        for position, element in enumerate(elements):
            own_key = element.get("writeKey") if isinstance(element, dict) else None
            see(own_key)
            key = next(
                (
                    candidate
                    for candidate in (own_key, body_key, basic_key)
                    if candidate is not None
                ),
                None,
            )
            messages.append(PendingMessage(position, element, key))
        if route.kind is not None:
            keys_to_check = [message.write_key for message in messages]
            if not messages:
                keys_to_check = [body_key if body_key is not None else basic_key]
            if any(not isinstance(key, str) or not key for key in keys_to_check):
                errors.append("missing_write_key")

    if header_auth_mode is not None:
        auth_mode = header_auth_mode
    elif body_key is not None or any(
        isinstance(message.element, dict) and message.element.get("writeKey") is not None
        for message in messages
    ):
        auth_mode = "body"
    else:
        auth_mode = "none"

    return RequestAnalysis(
        route=route,
        flags=flags,
        raw_size=raw_size,
        decoded_size=None if decoded is None else len(decoded),
        content_encoding=content_encoding,
        content_type=content_type,
        auth_mode=auth_mode,
        write_keys_seen=write_keys_seen,
        error=errors[0] if errors else None,
        body=body,
        logged_body=logged_body,
        messages=messages,
    )


def with_content_type(
    content_type: str, headers: tuple[tuple[str, str], ...]
) -> tuple[tuple[str, str], ...]:
    # A Content-Type among the given headers (a fault's own) wins over the default one.
    if any(name.lower() == "content-type" for name, _ in headers):
        return headers
    return (("Content-Type", content_type), *headers)


def loggable_headers(headers: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Headers for the request log: without hop-by-hop ones (and those `Connection` names),
    repeated names joined with commas."""
    connection_tokens = {
        token.strip().lower()
        for name, value in headers
        if name == "connection"
        for token in value.split(",")
    }
    logged: dict[str, str] = {}
    for name, value in headers:
        if name in _HOP_BY_HOP_HEADERS or name in connection_tokens:
            continue
        logged[name] = f"{logged[name]}, {value}" if name in logged else value
    return logged
