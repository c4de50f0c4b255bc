"""What Segment accepts: its limits, the codes of what it discards, and the check of a message
against them (docs/mapping.md §6, §7).

A 200 from Segment does not prove acceptance: it answers 200 and drops a message with no user
id, a non-string id, a track without an event... So every message is checked here before it is
sent, and one that fails goes `dead` at once with its code (UnsendableEvent), instead of
disappearing inside a successful request.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final

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


class UnsendableEvent(Exception):
    """The event can never be sent as it is: its row goes `dead` with `reason`.

    `code` is short and stable (for metrics and SQL): a Segment discard code, `too_large`,
    `invalid_payload` or `not_json`. `reason` is for a person reading the row.
    """

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


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


def valid_as_built(event_name: object, message_id: object, identity_value: object) -> bool:
    """True when validate_message would find nothing wrong with the message the mapping built
    from these values. The rest holds by construction: `type` is `track`, exactly one of
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


def _is_zoned_iso_timestamp(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return False
    return parsed.tzinfo is not None
