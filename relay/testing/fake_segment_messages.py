"""Segment's rules for one message, as the fake applies them after a 200 (fake-segment spec §3):
validation with the documented discard reasons, batch inheritance, ingest enrichment (messageId,
the four timestamps), and the warehouse naming preview (go-snakecase).

Pure functions: the state calls them under its lock and keeps the results.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

from relay.testing.fake_segment_config import FakeSegmentOptions

MESSAGE_KINDS: Final[tuple[str, ...]] = ("identify", "track", "page", "screen", "group", "alias")

# Discard reasons (spec §3). Message-level ones name a message; request-level ones a request.
DISCARD_UNKNOWN_SOURCE: Final = "unknown_source"
DISCARD_SOURCE_DISABLED: Final = "source_disabled"
DISCARD_WRONG_REGION: Final = "wrong_region"
DISCARD_INVALID_TYPE: Final = "invalid_type"
DISCARD_NO_USER_ANON_ID: Final = "no_user_anon_id"
DISCARD_ID_NOT_STRING: Final = "id_not_string"
DISCARD_EVENT_NOT_DEFINED: Final = "event_not_defined"
DISCARD_EVENT_NOT_STRING: Final = "event_not_string"
DISCARD_PROPERTIES_NOT_OBJECT: Final = "properties_not_object"
DISCARD_TRAITS_NOT_OBJECT: Final = "traits_not_object"
DISCARD_NAME_NOT_STRING: Final = "name_not_string"
DISCARD_CATEGORY_NOT_STRING: Final = "category_not_string"
DISCARD_GROUP_ID_REQUIRED: Final = "group_id_required"
DISCARD_ALIAS_IDS_REQUIRED: Final = "alias_ids_required"
DISCARD_INVALID_MESSAGE_ID: Final = "invalid_message_id"
DISCARD_BATCH_TOO_MANY_EVENTS: Final = "batch_too_many_events"
DISCARD_EMPTY_BATCH: Final = "empty_batch"
DISCARD_BAD_REQUEST: Final = "bad_request"
DISCARD_REASONS: Final[frozenset[str]] = frozenset(
    {
        DISCARD_UNKNOWN_SOURCE,
        DISCARD_SOURCE_DISABLED,
        DISCARD_WRONG_REGION,
        DISCARD_INVALID_TYPE,
        DISCARD_NO_USER_ANON_ID,
        DISCARD_ID_NOT_STRING,
        DISCARD_EVENT_NOT_DEFINED,
        DISCARD_EVENT_NOT_STRING,
        DISCARD_PROPERTIES_NOT_OBJECT,
        DISCARD_TRAITS_NOT_OBJECT,
        DISCARD_NAME_NOT_STRING,
        DISCARD_CATEGORY_NOT_STRING,
        DISCARD_GROUP_ID_REQUIRED,
        DISCARD_ALIAS_IDS_REQUIRED,
        DISCARD_INVALID_MESSAGE_ID,
        DISCARD_BATCH_TOO_MANY_EVENTS,
        DISCARD_EMPTY_BATCH,
        DISCARD_BAD_REQUEST,
    }
)


WAREHOUSE_RESERVED_COLUMNS: Final[frozenset[str]] = frozenset(
    {
        "id",
        "user_id",
        "anonymous_id",
        "event",
        "event_text",
        "received_at",
        "sent_at",
        "timestamp",
        "original_timestamp",
    }
)


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


# Pure helpers: time, names


def format_timestamp(moment: datetime) -> str:
    """ISO-8601 UTC with a `Z`, in milliseconds unless the value has finer precision."""
    moment = moment.astimezone(UTC).replace(tzinfo=None)
    precision = "milliseconds" if moment.microsecond % 1000 == 0 else "microseconds"
    return moment.isoformat(timespec=precision) + "Z"


def parse_timestamp(value: object) -> tuple[datetime, bool] | None:
    """Parse an ISO-8601 string: (aware datetime, whether it lacked a zone), or None."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC), True
    return parsed, False


def _is_lower(byte: int) -> bool:
    return 0x61 <= byte <= 0x7A


def _is_upper(byte: int) -> bool:
    return 0x41 <= byte <= 0x5A


def _is_digit(byte: int) -> bool:
    return 0x30 <= byte <= 0x39


def _lower_byte(byte: int) -> int:
    return byte + 0x20 if _is_upper(byte) else byte


def snakecase(name: str) -> str:
    """Segment's go-snakecase, byte for byte: how warehouses name tables and columns.

    Every byte that is not an ASCII letter or digit separates words, so `call.created` becomes
    `call_created` and `Call Created` does too.
    """
    data = name.encode("utf-8")
    length = len(data)
    index = 0
    has_lower = has_underscore = lower_since_underscore = False
    # Skip the prefix that is already snake case.
    while index < length:
        byte = data[index]
        if _is_lower(byte):
            has_lower = True
            lower_since_underscore = lower_since_underscore or has_underscore
        elif _is_digit(byte):
            pass
        elif (
            byte == 0x5F
            and 0 < index < length - 1
            and (_is_lower(data[index + 1]) or _is_digit(data[index + 1]))
        ):
            has_underscore = True
            lower_since_underscore = False
        else:
            break
        index += 1
    if index == length:
        return name
    output = bytearray(data[:index])

    def copy_word() -> None:
        nonlocal index
        while index < length and (_is_upper(data[index]) or _is_digit(data[index])):
            output.append(_lower_byte(data[index]))
            index += 1
        while index < length and (_is_lower(data[index]) or _is_digit(data[index])):
            output.append(data[index])
            index += 1

    # An upper-case run right after the prefix joins it when the prefix has no lower-case word.
    if _is_upper(data[index]) and (
        not has_lower or (has_underscore and not lower_since_underscore)
    ):
        copy_word()
    while index < length:
        byte = data[index]
        if not (_is_lower(byte) or _is_upper(byte) or _is_digit(byte)):
            index += 1
            continue
        if output:
            output.append(0x5F)
        copy_word()
    return output.decode("ascii")


def table_name(event: str) -> str:
    """The warehouse table a Track event lands in: `call.created` -> `call_created`."""
    return snakecase(event)


def warehouse_drops_property(name: str, value: object) -> bool:
    column = snakecase(name)
    if column in WAREHOUSE_RESERVED_COLUMNS or column.startswith("context_"):
        return True
    # A nested object is flattened with `_`, so a `context` object becomes `context_*` columns.
    return column == "context" and isinstance(value, dict)


# Per-message processing (spec §3)


def validate_message(message: dict[str, Any], options: FakeSegmentOptions) -> str | None:
    """The first validation failure of a message (a discard reason), or None.

    With `numeric_id_policy="coerce"` a numeric userId/anonymousId is rewritten as a string in
    `message`, which is why the caller passes its own copy.
    """
    kind = message.get("type")
    if kind not in MESSAGE_KINDS:
        return DISCARD_INVALID_TYPE
    if message.get("userId") is None and message.get("anonymousId") is None:
        return DISCARD_NO_USER_ANON_ID
    for name in ("userId", "anonymousId"):
        value = message.get(name)
        if value is None or (isinstance(value, str) and value):
            continue
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        if numeric and options.numeric_id_policy == "coerce":
            message[name] = str(value)
            continue
        return DISCARD_ID_NOT_STRING
    if kind == "track":
        event = message.get("event")
        if event is None:
            return DISCARD_EVENT_NOT_DEFINED
        if not isinstance(event, str) or not event:
            return DISCARD_EVENT_NOT_STRING
    if kind in ("track", "page", "screen"):
        properties = message.get("properties")
        if properties is not None and not isinstance(properties, dict):
            return DISCARD_PROPERTIES_NOT_OBJECT
    if kind in ("identify", "group"):
        traits = message.get("traits")
        if traits is not None and not isinstance(traits, dict):
            return DISCARD_TRAITS_NOT_OBJECT
    if kind in ("page", "screen"):
        for name, reason in (
            ("name", DISCARD_NAME_NOT_STRING),
            ("category", DISCARD_CATEGORY_NOT_STRING),
        ):
            value = message.get(name)
            if value is not None and (not isinstance(value, str) or not value):
                return reason
    if kind == "group" and message.get("groupId") in (None, ""):
        return DISCARD_GROUP_ID_REQUIRED
    if kind == "alias" and (
        message.get("previousId") in (None, "") or message.get("userId") in (None, "")
    ):
        return DISCARD_ALIAS_IDS_REQUIRED
    message_id = message.get("messageId")
    if message_id is not None and (
        not isinstance(message_id, str)
        or not message_id
        or len(message_id) > options.max_message_id_chars
    ):
        return DISCARD_INVALID_MESSAGE_ID
    return None


def inherit_batch_fields(element: dict[str, Any], body: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a batch element with the batch's `context` and `integrations` merged in (the
    element's own keys win) and the batch's `sentAt` when it has none."""
    message = dict(element)
    for name in ("context", "integrations"):
        batch_value = body.get(name)
        if not isinstance(batch_value, dict):
            continue
        own = message.get(name)
        if own is None:
            message[name] = dict(batch_value)
        elif isinstance(own, dict):
            message[name] = {**batch_value, **own}
    if message.get("sentAt") is None and body.get("sentAt") is not None:
        message["sentAt"] = body["sentAt"]
    return message


def enrich_message(message: dict[str, Any], received_at: datetime, flags: list[str]) -> None:
    """Segment's ingest enrichment: messageId when absent, and the four timestamps."""
    if message.get("messageId") is None:
        message["messageId"] = f"fake-{uuid.uuid4()}"
        flags.append("message_id_assigned")
    received_text = format_timestamp(received_at)
    message["receivedAt"] = received_text
    message.setdefault("originalTimestamp", None)
    message.setdefault("sentAt", None)
    timestamp = message.get("timestamp")
    if timestamp is None:
        message["timestamp"] = received_text
        return
    parsed = parse_timestamp(timestamp)
    if parsed is None:
        flags.append("invalid_timestamp")
        message["timestamp"] = received_text
        return
    original, naive = parsed
    if naive:
        flags.append("naive_timestamp")
    if original < _EPOCH:
        flags.append("pre_epoch_timestamp")
    message["originalTimestamp"] = timestamp
    sent_at = message.get("sentAt")
    if sent_at is None:
        return
    parsed_sent = parse_timestamp(sent_at)
    if parsed_sent is None:
        flags.append("invalid_sent_at")
        return
    sent, sent_naive = parsed_sent
    if sent_naive:
        flags.append("naive_sent_at")
    try:
        message["timestamp"] = format_timestamp(received_at - (sent - original))
    except OverflowError:
        flags.append("invalid_timestamp")
        message["timestamp"] = received_text
