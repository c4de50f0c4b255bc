"""The drainer's JSON fast paths (relay/segment/encoding.py): the stored payload parsed with
orjson and the message encoded with orjson must give exactly what the standard library gives,
and fall back to it wherever orjson would not (integers beyond 64 bits, NaN, lone surrogates,
deep nesting).

Each fast path is checked against the standard library on generated JSON, and each guard by a
case that orjson alone gets wrong: these tests fail if a guard is removed.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.aircall import message_id_for
from relay.segment import (
    SEGMENT_MAX_MESSAGE_BYTES,
    MappingOptions,
    OutboxEvent,
    TrackMessage,
    UnsendableEvent,
    decode_payload,
    to_track_message,
    validate_message,
)
from relay.segment.encoding import encode_message
from tests.support import SAMPLE_FILES, outbox_event

DEFAULT = MappingOptions()
HASH_KEY = b"relay-test-hash-key-0123456789ab"
STDLIB_COMPACT = {"separators": (",", ":"), "ensure_ascii": False}


def same(left: Any, right: Any) -> bool:
    """Equal as JSON values and as Python values: same types (1 is not 1.0, True is not 1),
    same key order, -0.0 apart from 0.0, NaN equal to NaN."""
    if type(left) is not type(right):
        return False
    if isinstance(left, dict):
        return list(left) == list(right) and all(same(left[key], right[key]) for key in left)
    if isinstance(left, list):
        return len(left) == len(right) and all(map(same, left, right))
    if isinstance(left, float):
        if math.isnan(left):
            return math.isnan(right)
        return left == right and math.copysign(1.0, left) == math.copysign(1.0, right)
    return bool(left == right)


# Integers around and far beyond 64 bits, floats of every magnitude, text with escapes,
# control characters, non-ASCII and astral characters.
integers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1]),
)
finite_floats = st.floats(allow_nan=False, allow_infinity=False)
texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
scalars = st.one_of(st.none(), st.booleans(), integers, finite_floats, texts)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(texts, children, max_size=4)
    ),
    max_leaves=24,
)
no_float_values = st.recursive(
    st.one_of(st.none(), st.booleans(), integers, texts),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(texts, children, max_size=4)
    ),
    max_leaves=24,
)
# How payloads are stored: the receiver's compact UTF-8 (orjson, or the standard library when a
# float or a big integer is in it), SQLAlchemy's default `json.dumps`, or anything valid.
spellings = st.sampled_from(
    [
        {"separators": (",", ":"), "ensure_ascii": False},
        {},
        {"indent": 1, "ensure_ascii": False},
    ]
)


# decode_payload --------------------------------------------------------------------------------


@given(value=json_values, spelling=spellings)
@settings(max_examples=600)
def test_decode_payload_gives_exactly_what_json_loads_gives(value: Any, spelling: Any) -> None:
    text = json.dumps({"data": value}, **spelling)
    decoded, _fast = decode_payload(text)
    assert same(decoded, json.loads(text))
    assert same(decode_payload(text.encode())[0], json.loads(text))


@given(
    mantissa=st.integers(min_value=0, max_value=10**18),
    fraction=st.integers(min_value=0, max_value=10**17),
    exponent=st.integers(min_value=-330, max_value=310),
    negative=st.booleans(),
)
@settings(max_examples=2000)
def test_orjson_reads_floats_to_the_same_double(
    mantissa: int, fraction: int, exponent: int, negative: bool
) -> None:
    """Floats are read by orjson on the fast path: every double must be the one `float()`
    rounds to (a literal with 19 digits in a row goes to the standard library anyway)."""
    literal = f"{'-' if negative else ''}{mantissa}.{fraction}e{exponent}"
    expected = json.loads(literal)
    if not math.isfinite(expected):
        return  # orjson refuses 1e400; decode_payload then gives json.loads' infinity
    decoded, _fast = decode_payload(f"[{literal}]")
    assert same(decoded, [expected])


@pytest.mark.parametrize(
    "number",
    [2**64, 2**64 + 1, -(2**63) - 1, 10**30 + 7, 18446744073709551617, -9999999999999999999],
)
def test_integers_beyond_64_bits_keep_every_digit(number: int) -> None:
    text = f'{{"data": {{"id": {number}, "ids": [1, {number}]}}}}'
    assert not same(orjson.loads(text)["data"]["id"], number)  # orjson alone: a float
    decoded, fast = decode_payload(text)
    assert decoded["data"]["id"] == number and type(decoded["data"]["id"]) is int
    assert decoded["data"]["ids"] == [1, number]
    assert fast is False  # and the message is then written by the standard library


@pytest.mark.parametrize(
    "text",
    [
        '{"data": {"x": NaN}}',
        '{"data": {"x": Infinity, "y": -Infinity}}',
        '{"data": {"x": 1e400}}',
        '{"data": {"x": "\\ud800"}}',
    ],
    ids=["nan", "infinity", "1e400", "lone-surrogate"],
)
def test_what_orjson_refuses_is_read_by_the_standard_library(text: str) -> None:
    decoded, fast = decode_payload(text)
    assert same(decoded, json.loads(text))
    assert fast is False


def test_nesting_too_deep_for_either_parser_is_refused_like_json_loads() -> None:
    text = '{"data": ' + "[" * 1100 + "]" * 1100 + "}"
    with pytest.raises(RecursionError):
        json.loads(text)
    with pytest.raises(RecursionError):
        decode_payload(text)
    event = stored_call_event(text)
    with pytest.raises(UnsendableEvent) as raised:
        to_track_message(event, DEFAULT)
    assert raised.value.code == "not_json"


def test_a_long_digit_run_inside_a_string_only_costs_speed() -> None:
    text = '{"data": {"phone": "+1234567890123456789012", "id": 1}}'
    decoded, fast = decode_payload(text)
    assert decoded == json.loads(text) and fast is False


def test_what_json_loads_refuses_decode_payload_refuses() -> None:
    for text in ("{", '{"data": }', "\x00", "[1,]"):
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)
        with pytest.raises(json.JSONDecodeError):
            decode_payload(text)


# encode_message --------------------------------------------------------------------------------


@given(value=no_float_values)
@settings(max_examples=600)
def test_orjson_writes_the_standard_librarys_bytes(value: Any) -> None:
    message = {"type": "track", "properties": {"value": value}}
    try:
        expected = json.dumps(message, **STDLIB_COMPACT).encode("utf-8")
    except UnicodeEncodeError:  # pragma: no cover - the strategy makes no surrogates
        return
    assert encode_message(message, fast=True) == expected
    assert encode_message(message, fast=False) == expected


@given(value=json_values)
@settings(max_examples=600)
def test_with_floats_the_same_value_and_at_most_a_quarter_shorter(value: Any) -> None:
    message = {"properties": {"value": value}}
    fast, slow = encode_message(message, fast=True), encode_message(message, fast=False)
    assert same(json.loads(fast), json.loads(slow))
    assert len(slow) * 4 <= len(fast) * 5  # the bound to_track_message's exact zone relies on


def test_an_integer_beyond_64_bits_is_written_by_the_standard_library() -> None:
    message = {"properties": {"id": 2**64 + 1}}
    with pytest.raises(TypeError):
        orjson.dumps(message)
    assert encode_message(message, fast=True) == b'{"properties":{"id":18446744073709551617}}'


def test_a_lone_surrogate_is_written_by_the_standard_library() -> None:
    message = {"event": "call.\ud800"}
    assert (
        encode_message(message, fast=True)
        == encode_message(message, fast=False)
        == b'{"event":"call.\\ud800"}'
    )


# to_track_message: the stored text against the parsed payload --------------------------------


ZERO_MESSAGE_ID = message_id_for("0" * 64)


def stored_call_event(
    payload: str,
    event_name: str = "call.created",
    message_id: str = ZERO_MESSAGE_ID,
    resource_id: str = "1",
) -> OutboxEvent:
    """A claimed row of a call event whose stored payload text is `payload`."""
    return OutboxEvent(
        message_id=message_id,
        resource="call",
        event=event_name,
        resource_id=resource_id,
        occurred_at=datetime(2026, 3, 10, tzinfo=UTC),
        payload=payload,
    )


def mapped(event: OutboxEvent, options: MappingOptions) -> TrackMessage | tuple[str, str]:
    try:
        return to_track_message(event, options)
    except UnsendableEvent as error:
        return (error.code, error.reason)


def assert_same_mapping(body: dict[str, Any], options: MappingOptions, text: str) -> None:
    """The stored text maps to what the parsed payload maps to: the same message, bytes,
    trimming, or the same refusal."""
    reference = mapped(outbox_event(body), options)
    result = mapped(outbox_event(body, payload=text), options)
    if isinstance(reference, tuple):
        assert result == reference
        return
    assert isinstance(result, TrackMessage)
    assert same(result.message, reference.message)
    assert result.trimmed == reference.trimmed
    if b"." in reference.encoded or b"e" in reference.encoded:
        # Floats may be spelt differently; the same value, and sizes within the bound.
        assert same(json.loads(result.encoded), json.loads(reference.encoded))
    if not _has_float(reference.message):
        assert result.encoded == reference.encoded
    assert validate_message(result.message) == []


def _has_float(value: Any) -> bool:
    if isinstance(value, float):
        return True
    if isinstance(value, dict):
        return any(_has_float(child) for child in value.values())
    if isinstance(value, list):
        return any(_has_float(child) for child in value)
    return False


@pytest.mark.parametrize("sample_path", SAMPLE_FILES, ids=lambda path: path.stem)
@pytest.mark.parametrize("spelling", [{"separators": (",", ":"), "ensure_ascii": False}, {}])
def test_each_sample_maps_the_same_from_its_stored_text(
    sample_path: Path, spelling: dict[str, Any]
) -> None:
    body = json.loads(sample_path.read_text(encoding="utf-8"))
    body.pop("token", None)
    text = json.dumps(body, **spelling)
    for options in (
        DEFAULT,
        MappingOptions(drop_paths=("raw_digits",), hash_paths=("**.email",), hash_key=HASH_KEY),
        MappingOptions(max_message_bytes=2_000),  # trims most call events
    ):
        assert_same_mapping(body, options, text)


@given(
    data=st.dictionaries(texts, json_values, max_size=6),
    resource=st.sampled_from(["call", "user", "contact", "number", "tag"]),
    identifier=st.one_of(integers, texts, st.none()),
    limit=st.sampled_from([1_024, 1_500, 4_000, SEGMENT_MAX_MESSAGE_BYTES]),
    spelling=spellings,
)
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_generated_events_map_the_same_from_their_stored_text(
    data: dict[str, Any], resource: str, identifier: Any, limit: int, spelling: Any
) -> None:
    data = {"id": identifier, **data}
    data.pop("token", None)
    body = {"resource": resource, "event": f"{resource}.created", "timestamp": 1_773_151_668}
    body["data"] = data
    assert_same_mapping(body, MappingOptions(max_message_bytes=limit), json.dumps(body, **spelling))


def test_a_message_near_the_limit_is_measured_on_the_standard_librarys_bytes() -> None:
    """Many floats that orjson spells one byte shorter (`1e-7`, stdlib `1e-07`): with the limit
    between the two sizes, the message is trimmed exactly as the standard library's bytes say."""
    numbers = [{"id": index, "weight": 1e-7} for index in range(400)]
    body = {
        "resource": "user",
        "event": "user.created",
        "timestamp": 1_773_151_668,
        "data": {"id": 981201, "numbers": numbers},
    }
    reference = to_track_message(outbox_event(body), DEFAULT)
    size = len(reference.encoded)
    fast_size = len(encode_message(reference.message, fast=True))
    assert fast_size < size  # the two encodings differ in size
    options = MappingOptions(max_message_bytes=(size + fast_size) // 2)
    assert_same_mapping(body, options, json.dumps(body))
    assert to_track_message(outbox_event(body, json.dumps(body)), options).trimmed


def test_an_id_beyond_64_bits_reaches_segment_with_every_digit() -> None:
    body = {
        "resource": "user",
        "event": "user.created",
        "timestamp": 1_773_151_668,
        "data": {"id": 2**64 + 1, "number": {"id": 2**70}},
    }
    result = to_track_message(outbox_event(body, json.dumps(body)), DEFAULT)
    assert result.message["userId"] == "18446744073709551617"
    assert b'"user_id":18446744073709551617' in result.encoded
    assert b'"number":{"id":1180591620717411303424}' in result.encoded


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("not json", "not_json"),
        ('["a list"]', "invalid_payload"),
        ('{"data": [1]}', "invalid_payload"),
        ('{"data": {"x": NaN}}', "not_json"),
    ],
)
def test_a_stored_payload_that_cannot_be_sent_is_unsendable(text: str, code: str) -> None:
    event = stored_call_event(text)
    with pytest.raises(UnsendableEvent) as raised:
        to_track_message(event, DEFAULT)
    assert raised.value.code == code


@pytest.mark.parametrize(
    ("event_name", "message_id"),
    [("", "aircall-1"), ("call.created", ""), ("call.created", "x" * 101), ("call.created", "ok")],
)
def test_the_checks_skipped_for_a_built_message_agree_with_validate_message(
    event_name: str, message_id: str
) -> None:
    body = {"resource": "call", "event": "call.created", "timestamp": 1, "data": {"id": 7}}
    event = stored_call_event(json.dumps(body), event_name, message_id, resource_id="7")
    result = mapped(event, DEFAULT)
    if isinstance(result, TrackMessage):
        assert validate_message(result.message) == []
    else:
        message = {
            "type": "track",
            "event": event_name,
            "messageId": message_id,
            "anonymousId": "aircall-call-7",
            "timestamp": "2026-03-10T00:00:00.000Z",
            "properties": {},
        }
        codes = validate_message(message)
        assert result == (codes[0], "Segment would discard this message: " + ", ".join(codes))
