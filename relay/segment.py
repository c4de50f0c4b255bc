"""Segment's side of the relay: one outbox event as a Segment `track` message, validated, trimmed to
Segment's size limit and encoded once, and the `POST /v1/batch` body built from encoded messages.

Pure code: no I/O, no clock (the batch's `sentAt` is an argument). The decisions, explained for
operators with a worked example in docs/mapping.md:

- `event` is Aircall's event name as is; `type` is `track`; `messageId` is the row's message id.
- Identity: `userId` is the Aircall user concerned, as a string: `data.id` for resource `user`,
  `data.user.id` for resource `call` when the call has an agent. Otherwise
  `anonymousId = "aircall-<resource>-<resource id>"`, or `"aircall-<resource>-<first 16 hex of the
  message id>"` for an event without a usable id. Exactly one of the two keys is sent, never null.
  Identity is read from Aircall's data before PII paths apply.
- `properties` is `data` without `token`, after the PII paths, with top-level keys renamed so that
  no warehouse column they flatten to is reserved (relay/snakecase.py): an unsafe key `K` becomes
  `<resource>_K` (`id` -> `call_id`, a call's `user` -> `call_user`), or `aircall_<resource>_K` when
  that is unsafe or taken, then `aircall_<resource>_K_2`, ... The one allowed reserved column is
  `user_id` for resource `user`: it holds `data.id`, the same value as `userId`, which the warehouse
  stores in its `user_id` column anyway. Nothing below the top level is renamed.
- `timestamp` is Aircall's timestamp, ISO-8601 UTC with milliseconds and `Z`; no `sentAt` in the
  message (encode_batch sets it per request).
- `context` is `{"library": {...}}`, plus `{"aircall_relay": {"trimmed": [...]}}` after a trim.
- Size: over `max_message_bytes`, the known heavy arrays are trimmed in two passes, re-measuring
  after each step: first each array's elements are reduced to `{"id": ...}`, then whole arrays are
  removed. The arrays, in order: a `user` event's `numbers`, a `number` event's `users`, then every
  other `numbers` or `users` array in document order (a call's `number.users`, `call_user.numbers`).
  Still too large: UnsendableEvent `too_large`.
- Encoding: compact UTF-8 JSON, keys in their order, byte for byte what the standard library's
  `json` writes (`separators=(",", ":")`, `ensure_ascii=False`). The drainer hands over the stored
  payload as text; `decode_payload` parses it with orjson when that gives exactly what
  `json.loads` gives, and such a message is then encoded with orjson, which writes the same bytes
  (tests/unit/test_segment_json.py). The one difference: a number with a fraction or an exponent
  (Aircall sends none) is spelt orjson's way (`1e-7` for `1e-07`), the same number; and a message
  near the size limit is measured and trimmed on the standard library's bytes, so what is trimmed
  never depends on the encoder.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Final

import orjson

from relay import __version__
from relay.aircall import MESSAGE_ID_PREFIX, resource_id_of
from relay.pii import (
    REMOVE,
    Location,
    Redactor,
    edit_locations,
    location_text,
    parse_path,
    value_at,
)
from relay.snakecase import is_safe_property_name, snakecase

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MAX_BATCH_BYTES",
    "MAX_BATCH_EVENTS",
    "MAX_MESSAGE_ID_CHARS",
    "SEGMENT_MAX_MESSAGE_BYTES",
    "MappingOptions",
    "OutboxEvent",
    "TrackMessage",
    "UnsendableEvent",
    "batch_body_bytes",
    "batch_overhead_bytes",
    "decode_payload",
    "encode_batch",
    "format_timestamp",
    "parse_path",
    "to_track_message",
    "validate_message",
]

# Segment's own limits (shared/reference/segment-http-api.md §2.1): 32 KB per message, as its fake
# and analytics-python count it; 500 KB per batch request, of which the sender uses 475,000 bytes
# as analytics-python does; 2,500 events per batch, beyond which Segment answers 200 and drops.
SEGMENT_MAX_MESSAGE_BYTES: Final[int] = 32_768
DEFAULT_MAX_MESSAGE_BYTES: Final[int] = 32_000
MAX_BATCH_BYTES: Final[int] = 475_000
MAX_BATCH_EVENTS: Final[int] = 2_500
MAX_MESSAGE_ID_CHARS: Final[int] = 100
# A smaller limit would make every call event unsendable; it can only be a configuration mistake.
MIN_MESSAGE_BYTES: Final[int] = 1_024

# Codes of UnsendableEvent beyond Segment's discard codes (those come from validate_message).
TOO_LARGE: Final[str] = "too_large"
INVALID_PAYLOAD: Final[str] = "invalid_payload"
NOT_JSON: Final[str] = "not_json"

# Segment's discard codes (reference §3, fake-segment.md §3.5), plus the relay's timestamp check.
INVALID_TYPE: Final[str] = "invalid_type"
NO_USER_ANON_ID: Final[str] = "no_user_anon_id"
ID_NOT_STRING: Final[str] = "id_not_string"
EVENT_NOT_DEFINED: Final[str] = "event_not_defined"
EVENT_NOT_STRING: Final[str] = "event_not_string"
PROPERTIES_NOT_OBJECT: Final[str] = "properties_not_object"
INVALID_MESSAGE_ID: Final[str] = "invalid_message_id"
INVALID_TIMESTAMP: Final[str] = "invalid_timestamp"

_MESSAGE_TYPES: Final[frozenset[str]] = frozenset(
    {"identify", "track", "page", "screen", "group", "alias"}
)
_TYPES_WITH_PROPERTIES: Final[frozenset[str]] = frozenset({"track", "page", "screen"})
# Arrays Aircall repeats whole inside other objects, about 1 KB per element (reference §8).
_HEAVY_ARRAY_KEYS: Final[frozenset[str]] = frozenset({"numbers", "users"})
_PRIMARY_HEAVY_ARRAY: Final[Mapping[str, str]] = {"user": "numbers", "number": "users"}
# The renaming of `id` for resource `user` that is allowed to land on a reserved column.
_USER_RESOURCE: Final[str] = "user"
_USER_ID_PROPERTY: Final[str] = "user_id"
_ANONYMOUS_HEX_CHARS: Final[int] = 16


class UnsendableEvent(Exception):
    """The event can never be sent as it is: its row goes `dead` with `reason`.

    `code` is short and stable (for metrics and SQL): a Segment discard code, `too_large`,
    `invalid_payload` or `not_json`. `reason` is for a person reading the row.
    """

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """What mapping needs from one outbox row."""

    message_id: str  # "aircall-" + 64 hex, computed at receipt
    resource: str  # "call", "user", "number", "contact", or anything newer
    event: str  # "call.created"
    resource_id: str | None  # data.id as text (exact digits), or None
    occurred_at: datetime  # Aircall's timestamp, aware
    # {"resource", "event", "timestamp", "data"}, token removed: parsed, or the stored JSON text
    # (what the drainer passes: mapping parses it, faster, see decode_payload).
    payload: Mapping[str, Any] | str | bytes

    def __post_init__(self) -> None:
        # A naive datetime is a bug in the caller, not a property of the event: fail loudly here
        # rather than send a timestamp shifted by the host's time zone.
        if self.occurred_at.tzinfo is None or self.occurred_at.utcoffset() is None:
            raise ValueError(f"occurred_at must be timezone-aware, got {self.occurred_at!r}")


@dataclass(frozen=True, slots=True)
class MappingOptions:
    """How events are mapped; built once at start-up (ValueError on a bad setting)."""

    drop_paths: tuple[str, ...] = ()
    hash_paths: tuple[str, ...] = ()
    hash_key: bytes | None = field(default=None, repr=False)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    library_name: str = "aircall-segment-relay"
    library_version: str = __version__
    _redactor: Redactor | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        for name in ("drop_paths", "hash_paths"):
            paths = getattr(self, name)
            if isinstance(paths, str | bytes):
                raise ValueError(f"{name} must be a sequence of paths, not one string")
            object.__setattr__(self, name, tuple(paths))
        drop = tuple(parse_path(path) for path in self.drop_paths)
        hashed = tuple(parse_path(path) for path in self.hash_paths)
        if hashed and not self.hash_key:
            raise ValueError("hash_key is required when hash_paths is set")
        if isinstance(self.max_message_bytes, bool) or not isinstance(self.max_message_bytes, int):
            raise ValueError("max_message_bytes must be an integer")
        if not MIN_MESSAGE_BYTES <= self.max_message_bytes <= SEGMENT_MAX_MESSAGE_BYTES:
            raise ValueError(
                f"max_message_bytes must be between {MIN_MESSAGE_BYTES:,} and "
                f"{SEGMENT_MAX_MESSAGE_BYTES:,} (Segment's limit), got {self.max_message_bytes:,}"
            )
        for name in ("library_name", "library_version"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string")
        redactor = Redactor(drop, hashed, self.hash_key) if drop or hashed else None
        object.__setattr__(self, "_redactor", redactor)


@dataclass(frozen=True, slots=True)
class TrackMessage:
    """A validated message and its bytes. `message` shares unchanged values with the outbox
    payload: read it, never modify it."""

    message: dict[str, Any]  # the Segment track message, without sentAt
    encoded: bytes  # compact UTF-8 JSON of `message`, what goes into the batch
    trimmed: tuple[str, ...]  # what was trimmed ("numbers: reduced_to_ids (60 items)"), or ()


def format_timestamp(moment: datetime) -> str:
    """ISO-8601 UTC with milliseconds and `Z`: `2026-03-10T14:07:48.000Z`."""
    if moment.tzinfo is UTC:  # what the outbox gives: no conversion, "+00:00" becomes "Z"
        return moment.isoformat(timespec="milliseconds")[:-6] + "Z"
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"a timezone-aware datetime is required, got {moment!r}")
    utc = moment.astimezone(UTC).replace(tzinfo=None)
    return utc.isoformat(timespec="milliseconds") + "Z"


def to_track_message(event: OutboxEvent, options: MappingOptions) -> TrackMessage:
    """Map one outbox event to a Segment track message; raises UnsendableEvent."""
    payload = event.payload
    fast = False
    if isinstance(payload, str | bytes):
        try:
            payload, fast = decode_payload(payload)
        except RecursionError:
            raise UnsendableEvent(NOT_JSON, "the stored payload is nested too deeply") from None
        except ValueError as error:  # JSONDecodeError, or bytes that are not UTF-8
            raise UnsendableEvent(NOT_JSON, f"the stored payload is not JSON: {error}") from None
        if not isinstance(payload, dict):
            raise UnsendableEvent(INVALID_PAYLOAD, "the stored payload is not a JSON object")
    data = payload.get("data")
    if type(data) is not dict:
        if not isinstance(data, Mapping):
            raise UnsendableEvent(INVALID_PAYLOAD, "the stored payload has no `data` object")
        data = dict(data)
    try:
        return _to_track_message(event, data, options, fast)
    except RecursionError:
        # The receiver parsed this JSON, so it is within Python's nesting limit, but walking it
        # takes a few frames per level more than parsing did.
        raise UnsendableEvent(NOT_JSON, "the event's data is nested too deeply") from None


def _to_track_message(
    event: OutboxEvent, data: dict[str, Any], options: MappingOptions, fast: bool
) -> TrackMessage:
    identity_key, identity_value = _identity(event, data)
    sent_data = data if options._redactor is None else options._redactor.apply(data)
    properties = _rename_properties(
        event.resource,
        sent_data,
        allow_user_id=identity_key == "userId" and event.resource == _USER_RESOURCE,
    )
    head: dict[str, Any] = {
        "type": "track",
        "event": event.event,
        "messageId": event.message_id,
        identity_key: identity_value,
        "timestamp": format_timestamp(event.occurred_at),
    }
    library = {"name": options.library_name, "version": options.library_version}
    message = {**head, "properties": properties, "context": {"library": library}}
    if not _valid_as_built(event.event, event.message_id, identity_value):
        codes = validate_message(message)
        if codes:
            raise UnsendableEvent(
                codes[0], "Segment would discard this message: " + ", ".join(codes)
            )
    encoded = _encode(message, fast)
    if fast and len(encoded) * 5 > options.max_message_bytes * 4:
        # Near the limit: measured (and trimmed) on the standard library's bytes, whose floats
        # can be up to a quarter longer than orjson's (`1e-07`, `1e-7`); below four fifths of
        # the limit neither encoding can reach it, so nothing is trimmed either way.
        encoded = _encode(message, False)
    if len(encoded) <= options.max_message_bytes:
        return TrackMessage(message=message, encoded=encoded, trimmed=())
    return _trimmed_to_fit(event.resource, head, properties, library, len(encoded), options)


def _valid_as_built(event_name: object, message_id: object, identity_value: object) -> bool:
    """True when validate_message would find nothing wrong with the message _to_track_message
    built from these values. The rest holds by construction: `type` is `track`, exactly one of
    `userId` and `anonymousId` is there, `properties` is a dict, `timestamp` comes from
    format_timestamp, there is no `sentAt`. So only the values from the row can fail, and when
    one might, validate_message itself gives the codes (tests check the two agree)."""
    return (
        type(event_name) is str
        and event_name != ""
        and type(message_id) is str
        and 0 < len(message_id) <= MAX_MESSAGE_ID_CHARS
        and type(identity_value) is str
        and identity_value != ""
    )


def _identity(event: OutboxEvent, data: dict[str, Any]) -> tuple[str, str]:
    if event.resource == _USER_RESOURCE:
        user_id = resource_id_of(data)
        if user_id is not None:
            return "userId", user_id
    elif event.resource == "call":
        agent = data.get("user")
        if isinstance(agent, dict):
            agent_id = resource_id_of(agent)
            if agent_id is not None:
                return "userId", agent_id
    if event.resource_id is not None:
        return "anonymousId", f"aircall-{event.resource}-{event.resource_id}"
    hex_part = event.message_id.removeprefix(MESSAGE_ID_PREFIX)[:_ANONYMOUS_HEX_CHARS]
    return "anonymousId", f"aircall-{event.resource}-{hex_part}"


def _rename_properties(
    resource: str, data: Mapping[str, Any], *, allow_user_id: bool
) -> dict[str, Any]:
    plan = _rename_plan(resource, tuple(data), allow_user_id)
    return {target: data[source] for source, target in plan}


@lru_cache(maxsize=1024)
def _rename_plan(
    resource: str, keys: tuple[str, ...], allow_user_id: bool
) -> tuple[tuple[str, str], ...]:
    """(Aircall key, property name) for each key but `token`, in Aircall's order.

    Cached: the keys of one kind of event are the same tuple every time.
    """
    kept = {key for key in keys if key != "token" and is_safe_property_name(key)}
    taken_columns = {snakecase(key) for key in kept}
    plan: list[tuple[str, str]] = []
    for key in keys:
        if key == "token":
            continue
        if key in kept:
            plan.append((key, key))
            continue
        target = _renamed(resource, key, taken_columns, allow_user_id)
        taken_columns.add(snakecase(target))
        plan.append((key, target))
    return tuple(plan)


def _renamed(resource: str, key: str, taken_columns: set[str], allow_user_id: bool) -> str:
    first_choice = f"{resource}_{key}"
    allowed_reserved = allow_user_id and key == "id" and first_choice == _USER_ID_PROPERTY
    if (allowed_reserved or is_safe_property_name(first_choice)) and snakecase(
        first_choice
    ) not in taken_columns:
        return first_choice
    # Every column of an `aircall_...` name starts with `aircall`, which no reserved column does.
    fallback = f"aircall_{resource}_{key}"
    candidate = fallback
    suffix = 1
    while snakecase(candidate) in taken_columns:
        suffix += 1
        candidate = f"{fallback}_{suffix}"
    return candidate


# One encoder for every message: `json.dumps` with options builds a new one per call. No check
# for circular references: a message is built from parsed JSON and a few fresh dicts, so it has
# none (and a too deep one raises RecursionError, which to_track_message reports).
_ENCODER: Final[json.JSONEncoder] = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, allow_nan=False, check_circular=False
)

# For decode_payload: every ASCII digit to "0", every other byte to a space, so that a run of 19
# digits anywhere in the text is one substring search.
_DIGITS_AS_ZEROS: Final[bytes] = bytes(
    0x30 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256)
)
_NINETEEN_DIGITS: Final[bytes] = b"0" * 19


def decode_payload(text: str | bytes) -> tuple[Any, bool]:
    """The stored JSON text parsed exactly as `json.loads` parses it, and whether orjson parsed
    it (then what it holds may be encoded by orjson: see `_encode`).

    orjson parses about twice as fast and gives the same value for every JSON text it accepts,
    but for integers beyond 64 bits, which it silently reads as floats (an Aircall id above
    2**64 would lose digits). Those have at least 19 digits (every 18-digit integer fits), so a
    text with a run of 19 digits anywhere (in a string too: that only costs speed) is left to
    the standard library, as is every text orjson refuses (`NaN`, `1e400`, a lone surrogate
    escape, nesting past 1,024 levels), which `json.loads` then parses or refuses as before.
    What orjson returns holds no integer beyond 64 bits and no NaN or infinity.

    Raises ValueError (json.JSONDecodeError) or RecursionError like `json.loads`.
    """
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    if _NINETEEN_DIGITS not in raw.translate(_DIGITS_AS_ZEROS):
        try:
            return orjson.loads(raw), True
        except orjson.JSONDecodeError:
            pass
    return json.loads(text), False


def _encode(message: Mapping[str, Any], fast: bool = False) -> bytes:
    """The message's compact UTF-8 JSON. `fast`: it was built from a payload orjson parsed (no
    integer beyond 64 bits, no NaN or infinity, which orjson would write as `null`), so orjson
    may write it: the same bytes as the standard library but for how floats are spelt. orjson
    refuses what it cannot write exactly (a lone surrogate in a string, nesting past 255 levels,
    an integer beyond 64 bits) with TypeError: the standard library writes those."""
    if fast:
        try:
            return orjson.dumps(message)
        except TypeError:
            pass
    try:
        try:
            return _ENCODER.encode(message).encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate (from a `\ud800` escape Aircall's JSON may carry) has no UTF-8
            # form; JSON's own escapes keep it, and the bytes still parse back to the same text.
            return json.dumps(
                message, separators=(",", ":"), ensure_ascii=True, allow_nan=False
            ).encode("ascii")
    except (TypeError, ValueError) as error:
        raise UnsendableEvent(NOT_JSON, f"the message cannot be encoded as JSON: {error}") from None


def _trimmed_to_fit(
    resource: str,
    head: dict[str, Any],
    properties: dict[str, Any],
    library: dict[str, str],
    original_bytes: int,
    options: MappingOptions,
) -> TrackMessage:
    candidates = _heavy_arrays(resource, properties)
    records: list[dict[str, Any]] = []
    size = original_bytes
    for action in ("reduced_to_ids", "removed"):
        for location in candidates:
            current = value_at(properties, location)
            if not isinstance(current, list):
                continue
            if action == "reduced_to_ids":
                reduced = [_id_only(item) for item in current]
                if reduced == current:
                    continue
                properties = edit_locations(properties, [location], _replace_with(reduced))
            else:
                properties = edit_locations(properties, [location], _replace_with(REMOVE))
            records.append(
                {"path": location_text(location), "action": action, "length": len(current)}
            )
            context = {"library": library, "aircall_relay": {"trimmed": list(records)}}
            message = {**head, "properties": properties, "context": context}
            encoded = _encode(message)
            size = len(encoded)
            if size <= options.max_message_bytes:
                trimmed = tuple(
                    f"{record['path']}: {record['action']} ({record['length']} items)"
                    for record in records
                )
                return TrackMessage(message=message, encoded=encoded, trimmed=trimmed)
    what = ", ".join(dict.fromkeys(str(record["path"]) for record in records))
    if what:
        detail = f"after trimming {what} (it was {original_bytes:,} bytes before)"
    else:
        detail = "with no known heavy array (numbers, users) to trim"
    raise UnsendableEvent(
        TOO_LARGE,
        f"message is {size:,} bytes {detail}; the relay's limit is "
        f"{options.max_message_bytes:,} bytes and Segment accepts {SEGMENT_MAX_MESSAGE_BYTES:,}",
    )


def _replace_with(replacement: Any) -> Callable[[Any], Any]:
    return lambda _current: replacement


def _heavy_arrays(resource: str, properties: dict[str, Any]) -> list[Location]:
    """The arrays trimming may touch, in the order it touches them (none inside another)."""
    found: list[Location] = []
    primary = _PRIMARY_HEAVY_ARRAY.get(resource)
    if primary is not None and isinstance(properties.get(primary), list):
        found.append((primary,))
    _collect_heavy_arrays(properties, (), found)
    return found


def _collect_heavy_arrays(node: Any, location: Location, found: list[Location]) -> None:
    if isinstance(node, dict):
        for key, child in node.items():
            child_location = (*location, key)
            if key in _HEAVY_ARRAY_KEYS and isinstance(child, list):
                if child_location not in found:
                    found.append(child_location)
                # Not inside: reducing or removing this array reaches whatever it holds.
                continue
            _collect_heavy_arrays(child, child_location, found)
    elif isinstance(node, list):
        for position, child in enumerate(node):
            _collect_heavy_arrays(child, (*location, position), found)


def _id_only(item: Any) -> Any:
    if isinstance(item, dict):
        return {"id": item["id"]} if "id" in item else {}
    return item


def validate_message(message: Mapping[str, Any]) -> list[str]:
    """The Segment discard codes that would apply to this message, in Segment's order (empty
    when valid), plus `invalid_timestamp` for a `timestamp` or `sentAt` that is not ISO-8601 with a
    zone, and `invalid_message_id` for an empty one (Segment would dedup every empty id as one)."""
    codes: list[str] = []
    message_type = message.get("type")
    if not isinstance(message_type, str) or message_type not in _MESSAGE_TYPES:
        codes.append(INVALID_TYPE)
    user_id = message.get("userId")
    anonymous_id = message.get("anonymousId")
    if user_id is None and anonymous_id is None:
        codes.append(NO_USER_ANON_ID)
    elif any(
        value is not None and not (isinstance(value, str) and value)
        for value in (user_id, anonymous_id)
    ):
        codes.append(ID_NOT_STRING)
    if message_type == "track":
        event = message.get("event")
        if event is None:
            codes.append(EVENT_NOT_DEFINED)
        elif not isinstance(event, str) or not event:
            codes.append(EVENT_NOT_STRING)
    if (
        message_type in _TYPES_WITH_PROPERTIES
        and "properties" in message
        and not isinstance(message["properties"], Mapping)
    ):
        codes.append(PROPERTIES_NOT_OBJECT)
    if "messageId" in message:
        message_id = message["messageId"]
        if (
            not isinstance(message_id, str)
            or not message_id
            or len(message_id) > MAX_MESSAGE_ID_CHARS
        ):
            codes.append(INVALID_MESSAGE_ID)
    if any(
        name in message and not _is_zoned_iso_timestamp(message[name])
        for name in ("timestamp", "sentAt")
    ):
        codes.append(INVALID_TIMESTAMP)
    return codes


def _is_zoned_iso_timestamp(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return False
    return parsed.tzinfo is not None


_BATCH_START: Final[bytes] = b'{"batch":['
_BATCH_SENT_AT: Final[bytes] = b'],"sentAt":"'
_BATCH_END: Final[bytes] = b'"}'
_TIMESTAMP_CHARS: Final[int] = len("2026-03-10T14:07:48.000Z")


def encode_batch(encoded_messages: Sequence[bytes], sent_at: datetime) -> bytes:
    """`{"batch":[...],"sentAt":"..."}` with the encoded messages spliced in byte for byte.

    ValueError for an empty batch or one over MAX_BATCH_EVENTS: Segment answers 200 to both and
    drops the events, so sending either would be a silent loss.
    """
    if not encoded_messages:
        raise ValueError("an empty batch is discarded by Segment (empty_batch)")
    if len(encoded_messages) > MAX_BATCH_EVENTS:
        raise ValueError(
            f"{len(encoded_messages):,} messages in one batch; Segment drops batches over "
            f"{MAX_BATCH_EVENTS:,}"
        )
    sent_at_text = format_timestamp(sent_at).encode("ascii")
    return b"".join(
        (_BATCH_START, b",".join(encoded_messages), _BATCH_SENT_AT, sent_at_text, _BATCH_END)
    )


def batch_overhead_bytes() -> int:
    """Bytes of the batch envelope around the messages, `sentAt` included.

    A batch of n messages is exactly `batch_overhead_bytes() + sum(sizes) + (n - 1)` bytes: one
    comma between messages (batch_body_bytes computes it).
    """
    return len(_BATCH_START) + len(_BATCH_SENT_AT) + _TIMESTAMP_CHARS + len(_BATCH_END)


def batch_body_bytes(message_sizes: Sequence[int]) -> int:
    """The exact size of encode_batch's body for messages of these encoded sizes."""
    if not message_sizes:
        return batch_overhead_bytes()
    return batch_overhead_bytes() + sum(message_sizes) + len(message_sizes) - 1
