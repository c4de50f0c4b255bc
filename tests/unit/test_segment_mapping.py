"""Aircall event -> Segment track message (relay/segment/, relay/pii.py): PRODUCT §7."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay import __version__
from relay.aircall import canonical_json
from relay.pii import keyed_hash
from relay.segment import (
    MAX_BATCH_BYTES,
    MAX_BATCH_EVENTS,
    MAX_MESSAGE_ID_CHARS,
    SEGMENT_MAX_MESSAGE_BYTES,
    MappingOptions,
    OutboxEvent,
    TrackMessage,
    UnsendableEvent,
    batch_body_bytes,
    batch_overhead_bytes,
    encode_batch,
    format_timestamp,
    parse_path,
    to_track_message,
    validate_message,
)
from relay.segment.rules import RENAMED, RESERVED_ALLOWED
from relay.snakecase import flattened_columns, is_reserved_column, snakecase
from tests.support import EXAMPLES, SAMPLE_FILES, outbox_event

SAMPLES_DIR = EXAMPLES
DOCS_MAPPING = Path(__file__).resolve().parents[2] / "docs" / "mapping.md"
DEFAULT = MappingOptions()
HASH_KEY = b"relay-test-hash-key-0123456789ab"
ISO_MILLISECONDS_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


# Helpers ------------------------------------------------------------------------------------------


def load_sample(name: str) -> dict[str, Any]:
    path = SAMPLES_DIR / f"{name}.json"
    if not path.is_file():
        pytest.fail(f"sample payload {path} is missing")
    body: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return body


def body_of(resource: str, data: dict[str, Any], event: str | None = None) -> dict[str, Any]:
    return {
        "resource": resource,
        "event": event or f"{resource}.created",
        "timestamp": 1_773_151_668,
        "token": "7c2e91a04bd35f6e8a1d0c9b47f2e6a3",
        "data": data,
    }


def reserved_collisions(message: Mapping[str, Any], resource: str) -> list[tuple[str, str]]:
    """(column, path) of every property a warehouse would discard, but the documented
    `user_id` of a user event, which holds userId's value."""
    collisions = [
        (column, path)
        for column, path in flattened_columns(message["properties"])
        if is_reserved_column(column)
    ]
    if resource == "user" and "userId" in message:
        collisions = [item for item in collisions if item != ("user_id", "user_id")]
    return collisions


def map_or_unsendable(
    event: OutboxEvent, options: MappingOptions
) -> TrackMessage | UnsendableEvent:
    try:
        return to_track_message(event, options)
    except UnsendableEvent as error:
        return error


def assert_sendable(result: TrackMessage, options: MappingOptions = DEFAULT) -> None:
    assert validate_message(result.message) == []
    assert json.loads(result.encoded) == result.message
    assert len(result.encoded) <= options.max_message_bytes
    assert ("userId" in result.message) != ("anonymousId" in result.message)
    assert "sentAt" not in result.message


# The 26 samples -----------------------------------------------------------------------------------


def test_the_sample_folder_holds_the_26_catalogue_events() -> None:
    assert SAMPLES_DIR.is_dir(), f"sample payloads not found: {SAMPLES_DIR} is missing"
    assert len(SAMPLE_FILES) == 26, [path.name for path in SAMPLE_FILES]


@pytest.mark.parametrize("sample_path", SAMPLE_FILES, ids=lambda path: path.stem)
def test_each_sample_maps_to_a_valid_track_message(sample_path: Path) -> None:
    body = json.loads(sample_path.read_text(encoding="utf-8"))
    data = body["data"]
    event = outbox_event(body)
    result = to_track_message(event, DEFAULT)
    message = result.message

    assert_sendable(result)
    assert message["type"] == "track"
    assert message["event"] == body["event"] == sample_path.stem
    assert message["messageId"] == event.message_id
    assert len(message["messageId"]) <= MAX_MESSAGE_ID_CHARS
    assert ISO_MILLISECONDS_Z.fullmatch(message["timestamp"])
    assert datetime.fromisoformat(message["timestamp"]) == datetime.fromtimestamp(
        body["timestamp"], UTC
    )
    assert message["context"] == {
        "library": {"name": "aircall-segment-relay", "version": __version__}
    }
    assert result.trimmed == ()

    # Identity by the rules: the user concerned, else an anonymous id built from the resource id.
    resource = body["resource"]
    agent = data.get("user")
    if resource == "user":
        assert message["userId"] == str(data["id"])
    elif resource == "call" and isinstance(agent, dict) and "id" in agent:
        assert message["userId"] == str(agent["id"])
    else:
        assert message["anonymousId"] == f"aircall-{resource}-{data['id']}"

    # `id` renamed, the token gone, nothing else lost, nothing a warehouse would discard.
    properties = message["properties"]
    assert properties[f"{resource}_id"] == data["id"]
    assert "id" not in properties
    assert "token" not in properties
    assert len(properties) == len(data)
    assert reserved_collisions(message, resource) == []
    if resource == "call" and "user" in data:
        assert properties["call_user"] == data["user"]
        assert "user" not in properties

    # Stable: the same row maps to the same bytes every time.
    assert to_track_message(outbox_event(body), DEFAULT).encoded == result.encoded


def test_call_ended_matches_the_worked_example_in_the_docs() -> None:
    text = DOCS_MAPPING.read_text(encoding="utf-8")
    marker = "<!-- worked-example:call.ended -->"
    assert marker in text, f"{DOCS_MAPPING} lost its worked example marker"
    block = text.split(marker, 1)[1].split("```json", 1)[1].split("```", 1)[0]
    options = MappingOptions(library_version="0.1.0")
    expected = to_track_message(outbox_event(load_sample("call.ended")), options).message
    assert json.loads(block) == expected


# Identity -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("agent", "expected"),
    [
        ({"id": 981201, "name": "Nora"}, {"userId": "981201"}),
        ({"id": "u-17"}, {"userId": "u-17"}),
        (None, {"anonymousId": "aircall-call-1903456789"}),
        ({"name": "no id"}, {"anonymousId": "aircall-call-1903456789"}),
        ({"id": True}, {"anonymousId": "aircall-call-1903456789"}),
        ("981201", {"anonymousId": "aircall-call-1903456789"}),
    ],
)
def test_a_call_is_its_agents_when_it_has_one(agent: Any, expected: dict[str, str]) -> None:
    message = to_track_message(
        outbox_event(body_of("call", {"id": 1903456789, "user": agent})), DEFAULT
    ).message
    identity = {key: message[key] for key in ("userId", "anonymousId") if key in message}
    assert identity == expected


def test_an_event_without_a_resource_id_is_anonymous_by_its_message_id() -> None:
    event = outbox_event(body_of("message", {"text": "hi"}, event="message.sent"))
    assert event.resource_id is None
    message = to_track_message(event, DEFAULT).message
    assert message["anonymousId"] == "aircall-message-" + event.message_id[8:24]
    assert "userId" not in message


def test_a_user_without_a_usable_id_is_anonymous_and_keeps_its_id_property() -> None:
    event = outbox_event(body_of("user", {"id": 1.5, "name": "Odd"}, event="user.created"))
    message = to_track_message(event, DEFAULT).message
    assert message["anonymousId"].startswith("aircall-user-")
    # Not `user_id`: without userId the warehouse column would not hold this value.
    assert message["properties"]["aircall_user_id"] == 1.5
    assert reserved_collisions(message, "user") == []


def test_ids_above_2_to_the_53_keep_every_digit() -> None:
    huge = 2**64 + 1
    user = to_track_message(
        outbox_event(body_of("user", {"id": huge}, event="user.created")), DEFAULT
    )
    assert user.message["userId"] == "18446744073709551617"
    assert user.message["properties"]["user_id"] == huge
    assert b'"user_id":18446744073709551617' in user.encoded

    call = to_track_message(outbox_event(body_of("call", {"id": huge + 2})), DEFAULT)
    assert call.message["anonymousId"] == "aircall-call-18446744073709551619"
    assert b'"call_id":18446744073709551619' in call.encoded
    assert json.loads(call.encoded)["properties"]["call_id"] == huge + 2


# Warehouse-safe property names ------------------------------------------------------------------


def test_reserved_top_level_names_are_prefixed_with_the_resource() -> None:
    data = {
        "id": 7,
        "event": "x",
        "timestamp": 1,
        "received_at": 2,
        "sent": {"at": 3},
        "context": {"ip": "x"},
        "context_page": "y",
        "uuid": "u",
        "user_id": 5,
        "Anonymous ID": "z",
        "$": {"id": 1},
        "keep_me": 1,
    }
    message = to_track_message(outbox_event(body_of("contact", data)), DEFAULT).message
    assert list(message["properties"]) == [
        "contact_id",
        "contact_event",
        "contact_timestamp",
        "contact_received_at",
        "contact_sent",
        "contact_context",
        "contact_context_page",
        "contact_uuid",
        "contact_user_id",
        "contact_Anonymous ID",
        "contact_$",
        "keep_me",
    ]
    assert reserved_collisions(message, "contact") == []


def test_each_reserved_column_the_rules_allow_is_where_a_key_is_renamed_to() -> None:
    """An entry of RESERVED_ALLOWED whose name is not the key's renamed name, or whose column
    is not reserved, would allow nothing, silently."""
    assert RESERVED_ALLOWED
    for (resource, key), name in RESERVED_ALLOWED.items():
        assert name == RENAMED.format(resource=resource, key=key)
        assert is_reserved_column(snakecase(name))


def test_a_renamed_key_never_overwrites_an_existing_one() -> None:
    data = {"id": 1, "call_id": 2, "aircall_call_id": 3, "callUser": 4, "user": 5}
    properties = to_track_message(outbox_event(body_of("call", data)), DEFAULT).message[
        "properties"
    ]
    assert properties == {
        "aircall_call_id_2": 1,
        "call_id": 2,
        "aircall_call_id": 3,
        "callUser": 4,
        "aircall_call_user": 5,
    }
    columns = [snakecase(name) for name in properties]
    assert len(columns) == len(set(columns))


@pytest.mark.parametrize("resource", ["event", "context", "anonymous", "received", "uuid", "x"])
def test_unusual_resources_still_avoid_reserved_columns(resource: str) -> None:
    data = {"id": 1, "text": {"a": 1}, "at": 2, "ts": 3, "timestamp": 4, "user": {"id": 9}}
    message = to_track_message(outbox_event(body_of(resource, data)), DEFAULT).message
    assert reserved_collisions(message, resource) == []
    assert len(message["properties"]) == len(data)


def test_a_token_inside_data_is_not_sent() -> None:
    message = to_track_message(
        outbox_event(body_of("call", {"id": 1, "token": "secret"})), DEFAULT
    ).message
    assert message["properties"] == {"call_id": 1}
    assert (
        b"secret"
        not in to_track_message(
            outbox_event(body_of("call", {"id": 1, "token": "secret"})), DEFAULT
        ).encoded
    )


def test_mapping_does_not_modify_the_payload() -> None:
    body = load_sample("call.ended")
    event = outbox_event(body)
    before = copy.deepcopy(event.payload)
    to_track_message(event, DEFAULT)
    assert event.payload == before
    assert "id" in event.payload["data"]


# Personal data ------------------------------------------------------------------------------------


def test_drop_paths_remove_keys_array_fields_and_keys_at_any_depth() -> None:
    body = load_sample("call.ended")
    event = outbox_event(body)
    before = copy.deepcopy(event.payload)
    options = MappingOptions(
        drop_paths=(
            "raw_digits",
            "contact.phone_numbers[].value",
            "participants[].phone_number",
            "contact.emails[].value",
            "*.last_name",
            "**.email",
            "recording",
            "no.such.path",
        )
    )
    result = to_track_message(event, options)
    properties = result.message["properties"]
    assert_sendable(result)
    assert "raw_digits" not in properties
    assert "recording" not in properties
    assert properties["contact"]["phone_numbers"] == [{"id": 412009871, "label": "Mobile"}]
    assert all("phone_number" not in person for person in properties["participants"])
    assert "last_name" not in properties["contact"]
    assert b"@example." not in result.encoded
    assert b"900461" not in result.encoded
    assert properties["call_user"]["name"] == "Nora Lindqvist"  # untouched
    # The outbox keeps the original.
    assert event.payload == before
    assert event.payload["data"]["contact"]["phone_numbers"][0]["value"] == "+44 7700 900461"


def test_hash_paths_replace_values_with_a_keyed_hash() -> None:
    body = load_sample("call.ended")
    event = outbox_event(body)
    before = copy.deepcopy(event.payload)
    options = MappingOptions(
        hash_paths=(
            "raw_digits",
            "contact.phone_numbers[].value",
            "participants[].phone_number",
            "**.email",
            "user.email",  # also matched by **.email: hashed once, not twice
            "*.name",
            "missed_call_reason",  # null stays null
            "contact.emails",  # a whole array, hashed as one value
        ),
        hash_key=HASH_KEY,
    )
    result = to_track_message(event, options)
    properties = result.message["properties"]
    assert_sendable(result)

    phone = "+44 7700 900461"
    expected_phone = (
        "hmac-sha256:" + hmac.new(HASH_KEY, json.dumps(phone).encode(), hashlib.sha256).hexdigest()
    )
    # One phone number, three places, one hash: joinable downstream, never readable.
    assert properties["raw_digits"] == expected_phone
    assert properties["contact"]["phone_numbers"][0]["value"] == expected_phone
    assert properties["participants"][0]["phone_number"] == expected_phone
    assert properties["call_user"]["email"] == keyed_hash(HASH_KEY, "nora.lindqvist@example.com")
    assert properties["transferred_to"]["email"] == keyed_hash(HASH_KEY, "ines.duarte@example.com")
    assert properties["number"]["name"] == keyed_hash(HASH_KEY, "Acme Support UK")
    assert properties["missed_call_reason"] is None
    assert properties["contact"]["emails"] == keyed_hash(
        HASH_KEY, body["data"]["contact"]["emails"]
    )
    assert b"@example." not in result.encoded
    assert event.payload == before

    again = to_track_message(outbox_event(body), options)
    assert again.encoded == result.encoded
    other_key = MappingOptions(hash_paths=options.hash_paths, hash_key=b"another-key-0123456789")
    other = to_track_message(outbox_event(body), other_key).message["properties"]
    assert other["raw_digits"].startswith("hmac-sha256:")
    assert other["raw_digits"] != properties["raw_digits"]


def test_keyed_hash_is_of_the_canonical_json() -> None:
    value = {"b": [1, 2**70], "a": "é"}
    digest = hmac.new(HASH_KEY, canonical_json(value).encode(), hashlib.sha256).hexdigest()
    assert keyed_hash(HASH_KEY, value) == "hmac-sha256:" + digest
    assert keyed_hash(HASH_KEY, None) is None


def test_drop_wins_over_hash_on_the_same_field() -> None:
    options = MappingOptions(
        drop_paths=("raw_digits",), hash_paths=("raw_digits",), hash_key=HASH_KEY
    )
    properties = to_track_message(
        outbox_event(body_of("call", {"id": 1, "raw_digits": "+44"})), options
    ).message["properties"]
    assert properties == {"call_id": 1}


def test_pii_paths_apply_before_renaming() -> None:
    options = MappingOptions(drop_paths=("user.email", "id"))
    data = {"id": 1, "user": {"id": 2, "email": "a@example.com"}}
    message = to_track_message(outbox_event(body_of("call", data)), options).message
    assert message["properties"] == {"call_user": {"id": 2}}
    # Identity is read from Aircall's data, before the paths apply.
    assert message["userId"] == "2"


def test_hash_paths_need_a_key() -> None:
    with pytest.raises(ValueError, match="hash_key is required"):
        MappingOptions(hash_paths=("raw_digits",))
    with pytest.raises(ValueError, match="at least 16 bytes"):
        MappingOptions(hash_paths=("raw_digits",), hash_key=b"short")
    with pytest.raises(ValueError, match="must be bytes"):
        MappingOptions(hash_paths=("raw_digits",), hash_key="a text key of 32 characters....")  # type: ignore[arg-type]
    assert MappingOptions(hash_key=b"unused without hash paths").hash_paths == ()


def test_the_hash_key_never_shows_in_repr() -> None:
    options = MappingOptions(hash_paths=("raw_digits",), hash_key=HASH_KEY)
    assert HASH_KEY.decode() not in repr(options)


@pytest.mark.parametrize(
    "path",
    [
        "",
        "a..b",
        ".a",
        "a.",
        "a b",
        "**",
        "a.**",
        "**.**.a",
        "**[].a",
        "a[]",
        "[].a",
        "a[0].b",
        "a*.b",
        "a.b*",
        "a[.b",
        "a].b",
        "a[][].b",
    ],
)
def test_bad_path_syntax_is_refused_naming_the_path(path: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(path))):
        parse_path(path)
    with pytest.raises(ValueError, match=re.escape(repr(path))):
        MappingOptions(drop_paths=("raw_digits", path))


@pytest.mark.parametrize(
    "path",
    [
        "raw_digits",
        "contact.phone_numbers[].value",
        "participants[].phone_number",
        "*.email",
        "**.email",
        "*[].name",
        "teams[].users[].email",
        "**.user.email",
        "a.**.b",
        "comments[].posted_by.*",
    ],
)
def test_good_paths_parse(path: str) -> None:
    assert parse_path(path).text == path


def test_a_single_string_is_not_taken_for_a_list_of_paths() -> None:
    with pytest.raises(ValueError, match="not one string"):
        MappingOptions(drop_paths="raw_digits")  # type: ignore[arg-type]


# Size -------------------------------------------------------------------------------------------


def numbers_array(count: int) -> list[dict[str, Any]]:
    template = load_sample("user.connected")["data"]["numbers"][0]
    return [{**template, "id": 600_000 + index, "name": f"Line {index}"} for index in range(count)]


def test_a_user_with_60_numbers_is_trimmed_to_number_ids() -> None:
    body = load_sample("user.connected")
    body["data"]["numbers"] = numbers_array(60)
    event = outbox_event(body)
    before = copy.deepcopy(event.payload)
    assert len(json.dumps(before).encode()) > 32_768

    result = to_track_message(event, DEFAULT)
    assert_sendable(result)
    assert result.message["properties"]["numbers"] == [
        {"id": 600_000 + index} for index in range(60)
    ]
    assert result.message["context"]["aircall_relay"] == {
        "trimmed": [{"path": "numbers", "action": "reduced_to_ids", "length": 60}]
    }
    assert result.message["context"]["library"]["name"] == "aircall-segment-relay"
    assert result.trimmed == ("numbers: reduced_to_ids (60 items)",)
    assert event.payload == before  # the outbox keeps all 60 numbers whole


def test_an_array_still_too_large_as_ids_is_removed_and_counted() -> None:
    body = body_of("user", {"id": 5, "numbers": [{"id": 10**12 + i} for i in range(3_000)]})
    result = to_track_message(outbox_event(body), DEFAULT)
    assert_sendable(result)
    assert "numbers" not in result.message["properties"]
    assert result.message["context"]["aircall_relay"]["trimmed"] == [
        {"path": "numbers", "action": "removed", "length": 3_000}
    ]


def test_nested_heavy_arrays_of_a_call_are_trimmed_after_the_primary_ones() -> None:
    body = load_sample("call.ended")
    users = load_sample("number.opened")["data"]["users"]
    body["data"]["number"]["users"] = [
        {**users[index % 3], "id": 700_000 + index} for index in range(150)
    ]
    body["data"]["user"]["numbers"] = numbers_array(2)
    result = to_track_message(outbox_event(body), DEFAULT)
    assert_sendable(result)
    trimmed = result.message["context"]["aircall_relay"]["trimmed"]
    assert trimmed == [{"path": "number.users", "action": "reduced_to_ids", "length": 150}]
    assert result.message["properties"]["call_user"]["numbers"] == body["data"]["user"]["numbers"]


def test_every_array_is_reduced_before_any_is_removed() -> None:
    data = {
        "id": 1,
        "users": [{"id": i, "bio": "x" * 300} for i in range(200)],
        "teams": [{"id": 1, "users": [{"id": i, "bio": "y" * 300} for i in range(300)]}],
    }
    result = to_track_message(outbox_event(body_of("number", data)), DEFAULT)
    assert_sendable(result)
    assert result.message["context"]["aircall_relay"]["trimmed"] == [
        {"path": "users", "action": "reduced_to_ids", "length": 200},
        {"path": "teams[0].users", "action": "reduced_to_ids", "length": 300},
    ]
    assert result.message["properties"]["teams"][0]["users"][299] == {"id": 299}


def test_a_message_still_too_large_is_unsendable_with_its_sizes() -> None:
    body = load_sample("user.connected")
    body["data"]["numbers"] = numbers_array(60)
    body["data"]["name"] = "N" * 40_000
    with pytest.raises(UnsendableEvent) as caught:
        to_track_message(outbox_event(body), DEFAULT)
    assert caught.value.code == "too_large"
    assert re.search(r"message is \d{2},\d{3} bytes after trimming numbers", caught.value.reason)
    assert "32,000" in caught.value.reason
    assert "32,768" in caught.value.reason
    assert str(caught.value) == caught.value.reason


def test_too_large_without_anything_to_trim_says_so() -> None:
    with pytest.raises(UnsendableEvent, match="no known heavy array") as caught:
        to_track_message(
            outbox_event(body_of("contact", {"id": 1, "information": "i" * 33_000})), DEFAULT
        )
    assert caught.value.code == "too_large"


def test_the_size_limit_is_configurable_within_segments() -> None:
    small = MappingOptions(max_message_bytes=2_000)
    with pytest.raises(UnsendableEvent, match="2,000"):
        to_track_message(outbox_event(load_sample("call.ended")), small)
    for bad in (1_000, SEGMENT_MAX_MESSAGE_BYTES + 1):
        with pytest.raises(ValueError, match="max_message_bytes"):
            MappingOptions(max_message_bytes=bad)


# Validation ---------------------------------------------------------------------------------------


def valid_message() -> dict[str, Any]:
    return to_track_message(outbox_event(load_sample("contact.created")), DEFAULT).message


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"type": "tracks"}, "invalid_type"),
        ({"type": None}, "invalid_type"),
        ({"anonymousId": None}, "no_user_anon_id"),
        ({"anonymousId": ""}, "id_not_string"),
        ({"anonymousId": 42}, "id_not_string"),
        ({"userId": ["a"]}, "id_not_string"),
        ({"event": None}, "event_not_defined"),
        ({"event": ""}, "event_not_string"),
        ({"event": 3}, "event_not_string"),
        ({"properties": []}, "properties_not_object"),
        ({"properties": "x"}, "properties_not_object"),
        ({"messageId": "m" * (MAX_MESSAGE_ID_CHARS + 1)}, "invalid_message_id"),
        ({"messageId": 12}, "invalid_message_id"),
        ({"messageId": ""}, "invalid_message_id"),
        ({"timestamp": "2026-03-10T14:07:48"}, "invalid_timestamp"),
        ({"timestamp": "yesterday"}, "invalid_timestamp"),
        ({"timestamp": 1773151668}, "invalid_timestamp"),
        ({"sentAt": "2026-03-10 14:07"}, "invalid_timestamp"),
    ],
)
def test_validate_message_catches_each_discard_code(change: dict[str, Any], code: str) -> None:
    message = {**valid_message(), **change}
    assert code in validate_message(message)


def test_validate_message_accepts_what_segment_accepts() -> None:
    message = valid_message()
    assert validate_message(message) == []
    assert validate_message({key: v for key, v in message.items() if key != "event"}) == [
        "event_not_defined"
    ]
    # analytics-python sends `anonymousId: null` beside a userId; Segment accepts it.
    assert validate_message({**message, "userId": "1", "anonymousId": None}) == []
    assert validate_message({**message, "timestamp": "2026-03-10T15:07:48.5+01:00"}) == []
    without_type = {key: v for key, v in message.items() if key != "type"}
    assert validate_message(without_type) == ["invalid_type"]


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("event", "", "event_not_string"),
        ("message_id", "aircall-" + "f" * 93, "invalid_message_id"),
        ("message_id", "", "invalid_message_id"),
    ],
)
def test_to_track_message_refuses_what_segment_would_discard(
    field: str, value: str, code: str
) -> None:
    changes: dict[str, Any] = {field: value}
    event = dataclasses.replace(outbox_event(load_sample("contact.created")), **changes)
    with pytest.raises(UnsendableEvent) as caught:
        to_track_message(event, DEFAULT)
    assert caught.value.code == code
    assert code in caught.value.reason


def test_a_payload_without_data_is_unsendable() -> None:
    event = outbox_event(load_sample("contact.created"))
    broken = OutboxEvent(
        message_id=event.message_id,
        resource=event.resource,
        event=event.event,
        resource_id=event.resource_id,
        occurred_at=event.occurred_at,
        payload={"resource": "contact", "event": "contact.created", "timestamp": 1},
    )
    with pytest.raises(UnsendableEvent) as caught:
        to_track_message(broken, DEFAULT)
    assert caught.value.code == "invalid_payload"


def test_a_naive_occurred_at_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        OutboxEvent("aircall-x", "call", "call.created", "1", datetime(2026, 3, 10), {})


def test_timestamps_are_utc_with_milliseconds() -> None:
    paris = timezone(timedelta(hours=1))
    assert format_timestamp(datetime(2026, 3, 10, 15, 7, 48, 123_999, paris)) == (
        "2026-03-10T14:07:48.123Z"
    )
    assert format_timestamp(datetime(1970, 1, 1, tzinfo=UTC)) == "1970-01-01T00:00:00.000Z"
    with pytest.raises(ValueError, match="timezone-aware"):
        format_timestamp(datetime(2026, 3, 10))


def test_a_lone_surrogate_is_sent_escaped() -> None:
    # JSON may spell one (`"\\ud800"`); it has no UTF-8 form, so it goes as JSON's own escape.
    event = OutboxEvent(
        message_id="aircall-" + "0" * 64,
        resource="contact",
        event="contact.updated",
        resource_id="1",
        occurred_at=datetime(2026, 3, 10, tzinfo=UTC),
        payload={"data": {"id": 1, "information": "a\ud800b", "name": "é"}},
    )
    options = MappingOptions(hash_paths=("name", "information"), hash_key=HASH_KEY)
    for result in (to_track_message(event, DEFAULT), to_track_message(event, options)):
        assert json.loads(result.encoded) == result.message
    assert b"\\ud800" in to_track_message(event, DEFAULT).encoded


def test_data_nested_too_deeply_is_unsendable() -> None:
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(5_000):
        node["a"] = {}
        node = node["a"]
    event = OutboxEvent(
        message_id="aircall-" + "0" * 64,
        resource="contact",
        event="contact.updated",
        resource_id="1",
        occurred_at=datetime(2026, 3, 10, tzinfo=UTC),
        payload={"data": {"id": 1, "deep": deep}},
    )
    with pytest.raises(UnsendableEvent) as caught:
        to_track_message(event, MappingOptions(drop_paths=("**.b",)))
    assert caught.value.code == "not_json"


# Batches ------------------------------------------------------------------------------------------


def sample_encoded_messages() -> list[bytes]:
    return [
        to_track_message(outbox_event(json.loads(path.read_text())), DEFAULT).encoded
        for path in SAMPLE_FILES
    ]


def test_encode_batch_splices_messages_byte_for_byte() -> None:
    messages = sample_encoded_messages()
    sent_at = datetime(2026, 3, 10, 14, 8, 0, 250_000, tzinfo=UTC)
    body = encode_batch(messages, sent_at)
    parsed = json.loads(body)
    assert list(parsed) == ["batch", "sentAt"]
    assert parsed["sentAt"] == "2026-03-10T14:08:00.250Z"
    assert [json.loads(message) for message in messages] == parsed["batch"]
    assert body == b'{"batch":[' + b",".join(messages) + b'],"sentAt":"2026-03-10T14:08:00.250Z"}'
    assert all("sentAt" not in message for message in parsed["batch"])


def test_batch_sizes_are_exact() -> None:
    messages = sample_encoded_messages()
    sent_at = datetime(2026, 3, 10, 14, 8, tzinfo=UTC)
    assert batch_overhead_bytes() == len(encode_batch([b"{}"], sent_at)) - 2
    for count in (1, 2, len(messages)):
        chosen = messages[:count]
        body = encode_batch(chosen, sent_at)
        sizes = [len(message) for message in chosen]
        assert len(body) == batch_body_bytes(sizes)
        assert len(body) == batch_overhead_bytes() + sum(sizes) + count - 1
    assert MAX_BATCH_BYTES == 475_000


def test_encode_batch_refuses_batches_segment_would_drop() -> None:
    sent_at = datetime(2026, 3, 10, tzinfo=UTC)
    with pytest.raises(ValueError, match="empty"):
        encode_batch([], sent_at)
    with pytest.raises(ValueError, match="2,500"):
        encode_batch([b"{}"] * (MAX_BATCH_EVENTS + 1), sent_at)
    with pytest.raises(ValueError, match="timezone-aware"):
        encode_batch([b"{}"], datetime(2026, 3, 10))


# Properties of the mapping for any data -----------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=40,
)
interesting_keys = st.sampled_from(
    [
        "id",
        "user",
        "users",
        "numbers",
        "token",
        "event",
        "context",
        "context_x",
        "user_id",
        "received",
        "Sent At",
        "uuid_ts",
        "$",
        "",
        "call_id",
        "aircall_call_id",
        "callId",
        "é",
    ]
)
data_dicts = st.dictionaries(interesting_keys | st.text(max_size=12), json_values, max_size=12)
resources = st.sampled_from(["call", "user", "number", "contact", "message", "event", "context"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(resource=resources, data=data_dicts, timestamp=st.integers(0, 253_402_300_799))
def test_any_data_maps_to_a_sendable_message_or_is_unsendable(
    resource: str, data: dict[str, Any], timestamp: int
) -> None:
    body = {"resource": resource, "event": f"{resource}.any", "timestamp": timestamp, "data": data}
    event = outbox_event(body)
    before = copy.deepcopy(event.payload)
    result = map_or_unsendable(event, DEFAULT)
    if isinstance(result, UnsendableEvent):
        assert result.code == "too_large"
        return
    message = result.message
    assert_sendable(result)
    assert json.loads(result.encoded) == message
    assert datetime.fromisoformat(message["timestamp"]) == datetime.fromtimestamp(timestamp, UTC)
    for name in message["properties"]:
        column = snakecase(name)
        allowed = resource == "user" and name == "user_id" and "userId" in message
        assert allowed or not is_reserved_column(column), name
    assert reserved_collisions(message, resource) == []
    kept = [key for key in data if key != "token"]
    assert len(message["properties"]) == len(kept)
    assert event.payload == before


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=data_dicts)
def test_pii_paths_never_leak_or_touch_the_payload(data: dict[str, Any]) -> None:
    options = MappingOptions(
        drop_paths=("**.email", "users[].name"), hash_paths=("*.id", "**.user"), hash_key=HASH_KEY
    )
    event = outbox_event(body_of("call", data))
    before = copy.deepcopy(event.payload)
    result = map_or_unsendable(event, options)
    if isinstance(result, UnsendableEvent):
        assert result.code == "too_large"
        return
    assert_sendable(result, options)

    def is_hashed(value: Any) -> bool:
        return value is None or (isinstance(value, str) and value.startswith("hmac-sha256:"))

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            assert "email" not in node
            for key, child in node.items():
                if key == "user":
                    assert is_hashed(child)
                else:
                    walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    properties = result.message["properties"]
    for child in properties.values():
        walk(child)
    assert "email" not in properties
    if "user" in data:
        # Top-level keys keep their order, so the name `user` got is found by position.
        names = [key for key in data if key not in ("token", "email")]
        assert is_hashed(list(properties.values())[names.index("user")])
    assert event.payload == before


def test_a_back_filled_row_says_so_in_context_also_when_trimmed() -> None:
    body = load_sample("call.ended")
    webhook = to_track_message(outbox_event(body), DEFAULT)
    assert "aircall_relay" not in webhook.message["context"]
    reconciled = to_track_message(
        dataclasses.replace(outbox_event(body), origin="reconciled"), DEFAULT
    )
    assert reconciled.message["context"]["aircall_relay"] == {"origin": "reconciled"}
    assert reconciled.message["properties"] == webhook.message["properties"]
    users = load_sample("number.opened")["data"]["users"]
    body["data"]["number"]["users"] = [
        {**users[index % 3], "id": 700_000 + index} for index in range(150)
    ]
    trimmed = to_track_message(
        dataclasses.replace(outbox_event(body), origin="reconciled"), DEFAULT
    )
    assert_sendable(trimmed)
    assert trimmed.message["context"]["aircall_relay"] == {
        "origin": "reconciled",
        "trimmed": [{"path": "number.users", "action": "reduced_to_ids", "length": 150}],
    }
