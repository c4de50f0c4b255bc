"""The receiver's fast JSON paths give exactly what the standard library's reference gives.

The dedup key (and so Segment's `messageId`) is defined on the standard library's canonical
encoding (`aircall.canonical_json`). The receiver writes it with orjson where that gives the
same bytes (`canonical_json_bytes`, on what `parse_body` returned); a difference would change
the `messageId` of an event received before and after an upgrade, and Segment would take it
twice. The stored payload (`payload_json`) only has to read back as the same value.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay import aircall

# Text without lone surrogates (parse_body refuses those; no UTF-8 text can hold one), with the
# control characters, quotes, backslashes and non-BMP characters that escaping rules differ on.
texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
numbers = (
    st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([1e16, 1e-7, 1.5e300, -0.0, 0.1, 123456789012345680.0, 5e-324])
)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | texts,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=25,
)


def _reference_key(body: dict[str, Any]) -> str:
    identity = {key: body[key] for key in ("resource", "event", "timestamp", "data")}
    return hashlib.sha256(aircall.canonical_json(identity).encode("utf-8")).hexdigest()


@settings(max_examples=400)
@given(data=st.dictionaries(texts, json_values, max_size=6), indent=st.sampled_from([None, 0, 2]))
def test_fast_dedup_key_equals_the_reference(data: dict[str, Any], indent: int | None) -> None:
    body = {"resource": "call", "event": "call.created", "timestamp": 7, "token": "t", "data": data}
    text = json.dumps(body, indent=indent, ensure_ascii=indent is None)
    parsed = aircall.parse_body(text.encode("utf-8"))
    reference = json.loads(text)  # plain floats: only the standard library may encode these
    expected = aircall.canonical_json(reference).encode("utf-8")
    assert aircall.canonical_json_bytes(parsed) == expected
    fast = aircall.validate_envelope(parsed, parsed=True)
    assert fast.dedup_key == _reference_key(reference)
    assert fast.dedup_key == aircall.validate_envelope(reference).dedup_key


@settings(max_examples=200)
@given(data=st.dictionaries(texts, json_values, max_size=6))
def test_stored_payload_reads_back_as_the_same_value(data: dict[str, Any]) -> None:
    body = {"resource": "call", "event": "call.created", "timestamp": 7, "data": data}
    parsed = aircall.parse_body(json.dumps(body).encode("utf-8"))
    stored = aircall.payload_json(parsed)
    assert json.loads(stored) == body
    assert list(json.loads(stored)["data"]) == list(data)  # key order as received


@pytest.mark.parametrize(
    ("number", "spelt"),
    [
        # orjson spells these "1e16", "1e-7" and refuses the last two; the key needs Python's.
        ("1e16", "1e+16"),
        ("0.0000001", "1e-07"),
        ("18446744073709551616", "18446744073709551616"),
        ("-9223372036854775809", "-9223372036854775809"),
    ],
)
def test_numbers_orjson_spells_differently_keep_the_standard_spelling(
    number: str, spelt: str
) -> None:
    parsed = aircall.parse_body(b'{"data": {"x": ' + number.encode() + b"}}")
    assert aircall.canonical_json_bytes(parsed) == b'{"data":{"x":' + spelt.encode() + b"}}"
    assert json.loads(aircall.payload_json(parsed))["data"]["x"] == json.loads(number)


def test_nesting_beyond_orjsons_limit_still_gives_the_canonical_text() -> None:
    depth = 400  # orjson refuses to encode more than 254 levels
    raw = ('{"data":' + '{"a":' * depth + "1" + "}" * depth + "}").encode()
    # The receiver refuses a body this deep (aircall.MAX_NESTING); the function still copes.
    parsed = json.loads(raw)
    assert aircall.canonical_json_bytes(parsed) == raw


def test_a_number_too_large_for_a_double_is_refused() -> None:
    with pytest.raises(aircall.BodyError, match="out of range"):
        aircall.parse_body(b'{"data": {"x": 1e400}}')


def test_parsed_floats_are_marked_and_still_floats() -> None:
    parsed = aircall.parse_body(b'{"a": 1.5, "b": [2.0], "c": 3}')
    assert isinstance(parsed["a"], aircall.JsonFloat) and parsed["a"] == 1.5
    assert isinstance(parsed["b"][0], float)
    assert type(parsed["c"]) is int
