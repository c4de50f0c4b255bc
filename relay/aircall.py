"""Aircall's side of the relay: the webhook envelope, the event catalogue, and an event's identity.

Pure code: parsing and validating a webhook body, the dedup key and `messageId` (PRODUCT §4), the
ordering key and the call life-cycle rank used to order events of one key (PRODUCT §6).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import orjson

from relay.aircall_events import (
    CALL_LIFECYCLE,
    KNOWN_EVENTS,
    NEWER_KNOWN_EVENTS,
    OTHER_EVENTS_RANK,
    SAMPLE_CALL_EVENTS,
    SEGMENT_CATALOGUE_EVENTS,
    lifecycle_rank,
    skip_reason,
)

# Re-exported: the catalogue lives in `relay/aircall_events.py`, and importers take it from here
# with the envelope and identity (the names defined below are public too).
__all__ = [
    "CALL_LIFECYCLE",
    "KNOWN_EVENTS",
    "NEWER_KNOWN_EVENTS",
    "OTHER_EVENTS_RANK",
    "SAMPLE_CALL_EVENTS",
    "SEGMENT_CATALOGUE_EVENTS",
    "lifecycle_rank",
    "skip_reason",
]

MESSAGE_ID_PREFIX: Final[str] = "aircall-"

# Aircall's timestamp is UNIX seconds. Anything past year 9999 cannot be a real event (a
# millisecond value would land there) and could not be stored as a date either.
_MAX_TIMESTAMP: Final[int] = 253_402_300_799

# What the outbox keeps in columns of its own must be storable the same on SQLite and PostgreSQL
# (docs/architecture.md, "What the receiver refuses"): the lengths of `outbox.resource`, `.event`
# and `.resource_id` (relay/db/tables.py; a test checks they agree). `ordering_key` (200) holds
# `resource:id`, at most 64 + 1 + 64 characters.
MAX_RESOURCE_CHARS: Final[int] = 64
MAX_EVENT_CHARS: Final[int] = 128
MAX_RESOURCE_ID_CHARS: Final[int] = 64
# A resource id as text has at most 64 characters: an integer of 64 digits, 63 with a minus sign.
_RESOURCE_ID_INTEGERS: Final[range] = range(-(10**63) + 1, 10**64)

# How deeply a body may nest (the body object is level 1; Aircall's payloads reach 5). Every later
# stage (the canonical JSON, orjson's 255 levels, the mapping, the PII paths, the fake Segment,
# `outbox show`) handles this with room to spare, whatever its caller's stack.
MAX_NESTING: Final[int] = 100

# C0 controls, DEL and C1 controls: what a name or an id may not hold (PostgreSQL's text cannot
# hold NUL at all), and what human output escapes so that a webhook cannot drive a terminal.
CONTROL_CHARACTERS: Final[re.Pattern[str]] = re.compile(r"[\x00-\x1f\x7f-\x9f]")


_SURROGATE_ESCAPE: Final[re.Pattern[bytes]] = re.compile(rb"\\u[dD][89a-fA-F]")


class EnvelopeError(ValueError):
    """The body is JSON but not a valid Aircall envelope; `field` names what is wrong."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


class BodyError(ValueError):
    """The body cannot be read as one JSON object."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class JsonFloat(float):
    """A float read from a webhook body by `parse_body`: a plain `float` in every respect, except
    that orjson refuses to encode it, which is how the canonical JSON's fast path (`_canonical`)
    knows to leave it to the standard library (whose float spelling the dedup key is defined by).
    """

    __slots__ = ()


def _parse_float(text: str) -> JsonFloat:
    value = JsonFloat(text)
    if not math.isfinite(value):  # 1e400: no double holds it, and PostgreSQL's json refuses it
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


_DECODER: Final = json.JSONDecoder(parse_float=_parse_float, parse_constant=_reject_constant)


def parse_body(raw: bytes) -> dict[str, Any]:
    """Parse a webhook body: strict UTF-8, strict JSON (no NaN or Infinity), one object.

    Integers keep every digit (Python ints are unbounded), so an id above 2**53 survives.
    Numbers with a fraction or an exponent become `JsonFloat`; one too large for a double
    (`1e400`) is refused. Raises BodyError with a message fit for the client.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BodyError(f"the body is not valid UTF-8 (byte {error.start})") from None
    try:
        value = _DECODER.decode(text)
    except RecursionError:
        raise BodyError(_TOO_DEEP) from None
    except ValueError as error:
        raise BodyError(f"the body is not valid JSON: {error}") from None
    # A container holds at least one bracket of the text: with no more of them than the limit,
    # the body cannot nest deeper (most bodies stop here).
    if raw.count(b"{") + raw.count(b"[") > MAX_NESTING and _nested_deeper(value, MAX_NESTING):
        raise BodyError(_TOO_DEEP)
    if not isinstance(value, dict):
        raise BodyError(f"the body must be a JSON object, not {_json_type(value)}")
    if _SURROGATE_ESCAPE.search(raw) is not None:
        # JSON may spell a lone UTF-16 surrogate (\ud800) that no UTF-8 text can hold: it could
        # be neither hashed nor stored, so the body is refused like invalid UTF-8.
        try:
            canonical_json(value).encode("utf-8")
        except UnicodeEncodeError:
            raise BodyError("the body contains a lone Unicode surrogate escape") from None
    return value


_TOO_DEEP: Final[str] = (
    f"the JSON is nested too deeply: the relay accepts at most {MAX_NESTING} levels "
    "(the body object is level 1)"
)


def _nested_deeper(value: object, limit: int) -> bool:
    """Whether `value` nests objects and arrays more than `limit` levels deep (a walk with a
    stack of its own: no recursion, whatever the depth)."""
    stack: list[tuple[dict[str, Any] | list[Any], int]] = []
    if isinstance(value, dict | list):
        stack.append((value, 1))
    while stack:
        node, level = stack.pop()
        if level > limit:
            return True
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, dict | list):
                stack.append((child, level + 1))
    return False


def _json_type(value: object) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"


@dataclass(frozen=True, slots=True)
class Envelope:
    """A validated Aircall webhook, token removed."""

    resource: str
    event: str
    timestamp: int
    data: dict[str, Any]
    payload: dict[str, Any]  # the body as received, minus `token`, key order kept
    # The body came from `parse_body`, so any float in it is a `JsonFloat`: the dedup key may
    # take the fast path (`canonical_json_bytes`).
    parsed: bool = False

    @property
    def occurred_at(self) -> datetime:
        return datetime.fromtimestamp(self.timestamp, tz=UTC)

    @property
    def resource_id(self) -> str | None:
        return resource_id_of(self.data)

    @property
    def dedup_key(self) -> str:
        return dedup_key(self.resource, self.event, self.timestamp, self.data, parsed=self.parsed)

    @property
    def message_id(self) -> str:
        return message_id_for(self.dedup_key)

    @property
    def ordering_key(self) -> str:
        return ordering_key(self.resource, self.resource_id, self.dedup_key)


def take_token(body: dict[str, Any]) -> str | None:
    """The body's `token` if it is a non-empty string, else None."""
    token = body.get("token")
    return token if isinstance(token, str) and token else None


def validate_envelope(body: dict[str, Any], *, parsed: bool = False) -> Envelope:
    """Check the envelope fields and return them with the token stripped from the payload.

    Only the envelope is checked (`resource`, `event`, `timestamp`, `data`); what is inside
    `data` is Aircall's business and is stored as it came. `parsed` says that `body` is what
    `parse_body` returned (see `Envelope.parsed`).
    """
    resource = _name(body, "resource", MAX_RESOURCE_CHARS)
    event = _name(body, "event", MAX_EVENT_CHARS)
    timestamp = body.get("timestamp")
    if not isinstance(timestamp, int) or isinstance(timestamp, bool):
        what = "an integer (UNIX seconds)"
        if isinstance(timestamp, float):
            raise EnvelopeError("timestamp", f"expected {what}, got a number with a fraction")
        raise EnvelopeError("timestamp", _expected(what, body, "timestamp"))
    if not 0 <= timestamp <= _MAX_TIMESTAMP:
        raise EnvelopeError("timestamp", f"{timestamp} is not a UNIX time in seconds")
    data = body.get("data")
    if not isinstance(data, dict):
        raise EnvelopeError("data", _expected("an object", body, "data"))
    _check_resource_id(data.get("id"))
    payload = {key: value for key, value in body.items() if key != "token"}
    return Envelope(
        resource=resource,
        event=event,
        timestamp=timestamp,
        data=data,
        payload=payload,
        parsed=parsed,
    )


def _name(body: dict[str, Any], field: str, max_chars: int) -> str:
    """`resource` or `event`: a non-empty string of printable characters that fits its column."""
    value = body.get(field)
    if not isinstance(value, str):
        raise EnvelopeError(field, _expected("a non-empty string", body, field))
    if not value.strip():
        raise EnvelopeError(field, f"expected a non-empty string, got {_blank(value)}")
    _check_text(field, value, max_chars)
    return value


def _check_resource_id(value: object) -> None:
    """`data.id`, which becomes `resource_id` and the ordering key, must fit them when it is a
    usable id (an integer or a non-blank string); anything else is no id at all (its event is a
    key of its own) and is stored as it came."""
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        if value not in _RESOURCE_ID_INTEGERS:
            raise EnvelopeError(
                "data.id",
                f"an integer too long to be a resource id: at most {MAX_RESOURCE_ID_CHARS} "
                f"digits ({MAX_RESOURCE_ID_CHARS - 1} with a minus sign)",
            )
    elif isinstance(value, str) and value.strip():
        _check_text("data.id", value, MAX_RESOURCE_ID_CHARS)


def _check_text(field: str, value: str, max_chars: int) -> None:
    if len(value) > max_chars:
        raise EnvelopeError(
            field, f"{len(value)} characters, longer than the {max_chars} the outbox keeps"
        )
    control = CONTROL_CHARACTERS.search(value)
    if control is not None:
        raise EnvelopeError(
            field,
            f"contains the control character U+{ord(control.group()):04X} at position "
            f"{control.start()}; it must be printable text",
        )


def _blank(value: str) -> str:
    return "an empty string" if not value else "a string of only whitespace"


def _expected(what: str, body: dict[str, Any], field: str) -> str:
    if field not in body:
        return f"missing; expected {what}"
    return f"expected {what}, got {_json_type(body[field])}"


_CANONICAL: Final = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_json(value: object) -> str:
    """Sorted keys, no whitespace, UTF-8 as is: two spellings of one JSON value give one text.

    This is the definition (the standard library's encoder, floats as `repr` spells them);
    `canonical_json_bytes` is a faster way to the same bytes for what `parse_body` returns.
    """
    return _CANONICAL.encode(value)


def canonical_json_bytes(value: object) -> bytes:
    """`canonical_json(value)` as UTF-8, for a value from `parse_body` (its floats `JsonFloat`).

    orjson writes the same bytes as the standard library's canonical encoder for everything
    `parse_body` can return except floats (orjson spells exponents differently) and integers
    beyond 64 bits (orjson refuses them); `parse_body` makes every float a `JsonFloat`, which
    orjson refuses too. So orjson either writes the canonical bytes, faster (docs/performance.md),
    or raises TypeError, and the standard library writes them. A plain `float` in `value` would be
    spelt orjson's way: other callers use `canonical_json`. (`tests/unit/test_canonical_json.py`
    checks the two agree on generated JSON.)
    """
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return _CANONICAL.encode(value).encode("utf-8")


_COMPACT: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def payload_json(payload: dict[str, Any]) -> str:
    """The text stored in `outbox.payload`: the payload as JSON, keys in their order, compact.

    orjson writes it; what orjson refuses (a `JsonFloat`, an integer beyond 64 bits) the
    standard library writes. Either way the text reads back as the same value, every digit of
    every integer kept.
    """
    try:
        return orjson.dumps(payload).decode("utf-8")
    except TypeError:
        return _COMPACT.encode(payload)


def dedup_key(
    resource: str, event: str, timestamp: int, data: dict[str, Any], *, parsed: bool = False
) -> str:
    """SHA-256 (hex) of the canonical JSON of resource, event, timestamp and data (PRODUCT §4).

    `parsed`: `data` comes from `parse_body` (its floats are `JsonFloat`), so the canonical JSON
    may be written by `canonical_json_bytes`; the key is the same either way.
    """
    identity = {"resource": resource, "event": event, "timestamp": timestamp, "data": data}
    text = canonical_json_bytes(identity) if parsed else canonical_json(identity).encode("utf-8")
    return hashlib.sha256(text).hexdigest()


def message_id_for(dedup_key_hex: str) -> str:
    """Segment's messageId: stable across re-sends, 72 characters (Segment allows 100)."""
    return MESSAGE_ID_PREFIX + dedup_key_hex


def resource_id_of(data: dict[str, Any]) -> str | None:
    """`data.id` as text (exact digits), or None when the resource carries no usable id."""
    value = data.get("id")
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip() and len(value) <= 64:
        return value
    return None


def ordering_key(resource: str, resource_id: str | None, dedup_key_hex: str) -> str:
    """`call:1903456789`; an event without an id is a key of its own, so it never waits."""
    if resource_id is None:
        return f"{resource}:~{dedup_key_hex[:16]}"
    return f"{resource}:{resource_id}"
