"""One outbox event as a Segment `track` message: built, validated, trimmed to the size limit
and encoded once (docs/mapping.md explains every decision, with a worked example).

Pure code: no I/O, no clock. The message:

- `type` is `track`; `event` is Aircall's event name as is; `messageId` is the row's message id.
- `userId` or `anonymousId`: relay/segment/rules.py (`identity`), read from Aircall's data
  before the personal-data paths apply.
- `properties` is `data` after the personal-data paths (relay/pii.py), its top-level keys
  renamed by the rules of relay/segment/rules.py (`rename_properties`).
- `timestamp` is Aircall's timestamp, ISO-8601 UTC with milliseconds and `Z`; no `sentAt` in the
  message (encode_batch sets it per request).
- `context` is `{"library": {...}}`, plus `{"aircall_relay": {"trimmed": [...]}}` after a trim,
  and `{"aircall_relay": {"origin": "reconciled"}}` for a `call.ended` back-filled by reconcile.
- Size: over `max_message_bytes`, the heavy arrays that relay/segment/rules.py lists are trimmed
  in its passes, re-measuring after each step. Still too large: UnsendableEvent `too_large`.
- Checked as Segment checks it (relay/segment/validation.py), and encoded
  (relay/segment/encoding.py): a message near the size limit is measured and trimmed on the
  standard library's bytes, so what is trimmed never depends on the encoder.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from relay import __version__
from relay.pii import REMOVE, Redactor, edit_locations, location_text, parse_path, value_at
from relay.segment.encoding import decode_payload, encode_message, format_timestamp
from relay.segment.rules import (
    HEAVY_ARRAY_KEYS,
    REDUCED_TO_IDS,
    TRIM_PASSES,
    heavy_arrays,
    identity,
    rename_properties,
)
from relay.segment.validation import (
    DEFAULT_MAX_MESSAGE_BYTES,
    INVALID_PAYLOAD,
    MIN_MESSAGE_BYTES,
    NOT_JSON,
    SEGMENT_MAX_MESSAGE_BYTES,
    TOO_LARGE,
    UnsendableEvent,
    valid_as_built,
    validate_message,
)


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
    # "webhook", or "reconciled" (a call.ended back-filled by `reconcile`): sent as
    # context.aircall_relay.origin, for the latter only (docs/mapping.md).
    origin: str = "webhook"

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
    identity_key, identity_value = identity(
        event.resource, event.resource_id, event.message_id, data
    )
    sent_data = data if options._redactor is None else options._redactor.apply(data)
    properties = rename_properties(event.resource, sent_data, has_user_id=identity_key == "userId")
    head: dict[str, Any] = {
        "type": "track",
        "event": event.event,
        "messageId": event.message_id,
        identity_key: identity_value,
        "timestamp": format_timestamp(event.occurred_at),
    }
    library = {"name": options.library_name, "version": options.library_version}
    relay_context = {} if event.origin == "webhook" else {"origin": event.origin}
    context: dict[str, Any] = {"library": library}
    if relay_context:
        context["aircall_relay"] = relay_context
    message = {**head, "properties": properties, "context": context}
    if not valid_as_built(event.event, event.message_id, identity_value):
        codes = validate_message(message)
        if codes:
            raise UnsendableEvent(
                codes[0], "Segment would discard this message: " + ", ".join(codes)
            )
    encoded = encode_message(message, fast)
    if fast and len(encoded) * 5 > options.max_message_bytes * 4:
        # Near the limit: measured (and trimmed) on the standard library's bytes, whose floats
        # can be up to a quarter longer than orjson's (`1e-07`, `1e-7`); below four fifths of
        # the limit neither encoding can reach it, so nothing is trimmed either way.
        encoded = encode_message(message, False)
    if len(encoded) <= options.max_message_bytes:
        return TrackMessage(message=message, encoded=encoded, trimmed=())
    return _trimmed_to_fit(
        event.resource, head, properties, library, relay_context, len(encoded), options
    )


def _trimmed_to_fit(
    resource: str,
    head: dict[str, Any],
    properties: dict[str, Any],
    library: dict[str, str],
    relay_context: dict[str, str],
    original_bytes: int,
    options: MappingOptions,
) -> TrackMessage:
    candidates = heavy_arrays(resource, properties)
    records: list[dict[str, Any]] = []
    size = original_bytes
    for action in TRIM_PASSES:
        for location in candidates:
            current = value_at(properties, location)
            if not isinstance(current, list):
                continue
            if action == REDUCED_TO_IDS:
                reduced = [_id_only(item) for item in current]
                if reduced == current:
                    continue
                properties = edit_locations(properties, [location], _replace_with(reduced))
            else:
                properties = edit_locations(properties, [location], _replace_with(REMOVE))
            records.append(
                {"path": location_text(location), "action": action, "length": len(current)}
            )
            trims = {**relay_context, "trimmed": list(records)}
            context = {"library": library, "aircall_relay": trims}
            message = {**head, "properties": properties, "context": context}
            encoded = encode_message(message)
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
        detail = f"with no known heavy array ({', '.join(sorted(HEAVY_ARRAY_KEYS))}) to trim"
    raise UnsendableEvent(
        TOO_LARGE,
        f"message is {size:,} bytes {detail}; the relay's limit is "
        f"{options.max_message_bytes:,} bytes and Segment accepts {SEGMENT_MAX_MESSAGE_BYTES:,}",
    )


def _replace_with(replacement: Any) -> Callable[[Any], Any]:
    return lambda _current: replacement


def _id_only(item: Any) -> Any:
    if isinstance(item, dict):
        return {"id": item["id"]} if "id" in item else {}
    return item
