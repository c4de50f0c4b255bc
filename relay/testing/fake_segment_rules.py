"""The fake Segment's rules, pure: its options, what makes a `POST /v1/batch` a 400, and what
happens to each message after the 200. "Spec §" refers to the behavioural spec of the fake in
the project's shared reference (fake-segment.md).

Segment's documented behaviours kept here, those the relay's tests and benchmarks rely on:

- Auth: the write key of a message is its own `writeKey`, else the body's, else the user name of
  HTTP Basic auth (empty password). None at all: 400. A key not in `write_keys` (when any are
  configured), a disabled source or a wrong region: 200 and the message is discarded
  (`unknown_key_policy="401"` answers 401 instead, a debugging aid that Segment does not have).
- Limits: a body over `max_batch_bytes` (500 KB), an element over `max_event_bytes` (32 KB,
  compact UTF-8 JSON), bad JSON, a body that is not an object or a `batch` that is not an array:
  400 `Bad Request`, nothing accepted. Over `max_batch_events` (2,500): 200, every message
  discarded. A `Content-Encoding` is refused with 400 (the relay sends none; Segment would accept
  gzip).
- 200 for dropped messages: each message is validated after the 200 with Segment's discard codes;
  discards, duplicates and acceptances are recorded, never signalled on the wire.
- Dedup by `messageId` within `dedup_window` (24 h), across write keys; discarded messages do not
  enter the dedup store.
- Enrichment: `messageId` when absent, `receivedAt`, `originalTimestamp`, and `timestamp`
  corrected by the client's clock skew (`receivedAt - (sentAt - timestamp)`); the batch's
  `context`, `integrations` and `sentAt` apply to each message (the message's own keys win).
- The warehouse: each accepted message lists the reserved columns its properties would fill,
  which a warehouse discards (`dropped_columns`, with relay/snakecase.py, the list the relay's
  mapping avoids), and is flagged `reserved_property_dropped_in_warehouse` when there are any.

The state that applies them and keeps the records is `fake_segment.FakeSegmentState`.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

from relay.snakecase import reserved_columns_in
from relay.testing.fake_segment_faults import ChaosEntry, check_chaos

Region = Literal["us", "eu"]

MESSAGE_TYPES: Final = frozenset({"identify", "track", "page", "screen", "group", "alias"})
MAX_MESSAGE_ID_CHARS: Final = 100
BATCH_PATH: Final = "/v1/batch"


# Configuration


@dataclass(frozen=True)
class SourceConfig:
    """What the fake knows of one write key: the region of its workspace, and whether its source
    is enabled."""

    region: Region = "us"
    enabled: bool = True


@dataclass(frozen=True)
class FakeSegmentOptions:
    """Every setting of the fake, with Segment's documented limits as defaults.

    `write_keys` maps each known write key to its source; when empty, any non-empty key is known.
    `chaos` and `seed` set the chaos table that `reset()` restores; `seed` also drives latency
    jitter. `keep_request_bodies=False` keeps the parsed bodies out of the request log (saves
    memory and time in benchmarks). `clock` gives the time of receipt (default: the wall clock).
    """

    write_keys: Mapping[str, SourceConfig] = field(default_factory=dict)
    region: Region = "us"
    max_batch_bytes: int = 500 << 10
    max_event_bytes: int = 32 << 10
    max_batch_events: int = 2500
    dedup_window: timedelta = timedelta(hours=24)
    unknown_key_policy: Literal["200_discard", "401"] = "200_discard"
    keep_request_bodies: bool = True
    chaos: Sequence[ChaosEntry] = ()
    seed: int = 0
    clock: Callable[[], datetime] | None = None

    def __post_init__(self) -> None:
        if self.region not in ("us", "eu"):
            raise ValueError(f"region must be 'us' or 'eu', not {self.region!r}")
        if self.unknown_key_policy not in ("200_discard", "401"):
            raise ValueError("unknown_key_policy must be '200_discard' or '401'")
        if min(self.max_batch_bytes, self.max_event_bytes, self.max_batch_events) < 1:
            raise ValueError("the size and count limits must be at least 1")
        if self.dedup_window < timedelta(0):
            raise ValueError("dedup_window must not be negative")
        check_chaos(self.chaos)


# Request analysis: outside the lock


@dataclass
class Analysis:
    """A request decoded and checked: `error` names why it gets a 400 (None: it gets a 200), and
    `messages` are (position, element, write key) of the batch."""

    error: str | None = None
    body: dict[str, Any] | None = None
    logged_body: object = None
    messages: list[tuple[int, object, object]] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    size: int = 0


def _basic_auth_key(header: str | None, flags: list[str]) -> str | None:
    scheme, _, credentials = (header or "").strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        flags.append("bad_basic_auth")
        return None
    user, colon, password = decoded.partition(":")
    if not colon:
        flags.append("basic_without_colon")  # tolerated, as Segment does today
    # The key is the user name and the password is empty: anything else is not a write key.
    return None if password else user


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def analyze(headers: Mapping[str, str], raw: bytes, options: FakeSegmentOptions) -> Analysis:
    """Check a `/v1/batch` request in Segment's order; `headers` have lower-case names."""
    result = Analysis(size=len(raw))
    media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        result.flags.append("bad_content_type")  # Segment asks for it, and accepts without
    basic_key = _basic_auth_key(headers.get("authorization"), result.flags)
    if headers.get("content-encoding", "identity").strip().lower() != "identity":
        result.error = "unsupported_content_encoding"
        return result
    if len(raw) > options.max_batch_bytes:
        result.error = "body_too_large"
        return result
    try:
        parsed = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError):
        result.error = "invalid_json"
        result.logged_body = raw.decode("utf-8", "replace")
        return result
    result.logged_body = parsed
    if not isinstance(parsed, dict):
        result.error = "not_an_object"
        return result
    result.body = parsed
    batch = parsed.get("batch")
    if batch is None:
        batch = []
    if not isinstance(batch, list):
        result.error = "batch_not_array"
        return result
    if any(_compact_size(element) > options.max_event_bytes for element in batch):
        result.error = "event_too_large"
    body_key = parsed.get("writeKey")
    for position, element in enumerate(batch):
        own_key = element.get("writeKey") if isinstance(element, dict) else None
        keys = (own_key, body_key, basic_key)
        result.messages.append((position, element, next((k for k in keys if k is not None), None)))
    keys_in_force = [key for _, _, key in result.messages] or [body_key or basic_key]
    if result.error is None and any(not isinstance(key, str) or not key for key in keys_in_force):
        result.error = "missing_write_key"
    return result


def _compact_size(element: object) -> int:
    return len(json.dumps(element, separators=(",", ":"), ensure_ascii=False).encode())


# Per-message rules (spec §3)


def discard_reason(message: Mapping[str, Any]) -> str | None:
    """The first of Segment's validation failures for this message, or None."""
    kind = message.get("type")
    if kind not in MESSAGE_TYPES:
        return "invalid_type"
    ids = (message.get("userId"), message.get("anonymousId"))
    if ids == (None, None):
        return "no_user_anon_id"
    if any(value is not None and (not isinstance(value, str) or not value) for value in ids):
        return "id_not_string"
    event = message.get("event")
    if kind == "track" and event is None:
        return "event_not_defined"
    if kind == "track" and (not isinstance(event, str) or not event):
        return "event_not_string"
    if kind in ("track", "page", "screen") and not isinstance(message.get("properties", {}), dict):
        return "properties_not_object"
    message_id = message.get("messageId")
    if message_id is not None and (
        not isinstance(message_id, str) or not 0 < len(message_id) <= MAX_MESSAGE_ID_CHARS
    ):
        return "invalid_message_id"
    return None


def format_timestamp(moment: datetime) -> str:
    """ISO-8601 UTC with `Z`, in milliseconds unless the value is finer."""
    moment = moment.astimezone(UTC).replace(tzinfo=None)
    precision = "milliseconds" if moment.microsecond % 1000 == 0 else "microseconds"
    return moment.isoformat(timespec=precision) + "Z"


def _parse_timestamp(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def enrich(message: dict[str, Any], received: datetime, flags: list[str]) -> None:
    """Segment's ingest enrichment: `messageId` when absent and the four timestamps."""
    if message.get("messageId") is None:
        message["messageId"] = f"fake-{uuid.uuid4()}"
        flags.append("message_id_assigned")
    message["receivedAt"] = format_timestamp(received)
    message.setdefault("sentAt", None)
    original = message.get("timestamp")
    message["originalTimestamp"] = original
    if original is None:
        message["timestamp"] = message["receivedAt"]
        return
    original_at, sent_at = _parse_timestamp(original), _parse_timestamp(message["sentAt"])
    if original_at is None:
        flags.append("invalid_timestamp")
        message["timestamp"] = message["receivedAt"]
    elif sent_at is not None:
        try:
            message["timestamp"] = format_timestamp(received - (sent_at - original_at))
        except OverflowError:  # a skew beyond the years a datetime holds
            flags.append("invalid_timestamp")


def inherit_batch_fields(element: dict[str, Any], body: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a batch element with the batch's `context` and `integrations` merged in (the
    element's keys win) and the batch's `sentAt` when it has none."""
    message = dict(element)
    for name in ("context", "integrations"):
        shared, own = body.get(name), message.get(name)
        if isinstance(shared, dict) and (own is None or isinstance(own, dict)):
            message[name] = {**shared, **(own or {})}
    if message.get("sentAt") is None and body.get("sentAt") is not None:
        message["sentAt"] = body["sentAt"]
    return message


def dropped_columns(message: Mapping[str, Any], flags: list[str]) -> list[str]:
    """The reserved warehouse columns the message's properties would fill (a warehouse discards
    such properties), flagging the message when there are any."""
    properties = message.get("properties")
    dropped = reserved_columns_in(properties) if isinstance(properties, dict) else []
    if dropped:
        flags.append("reserved_property_dropped_in_warehouse")
    return dropped
