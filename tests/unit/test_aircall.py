"""The envelope, the dedup key and the ordering helpers (pure)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay import aircall
from tests.support import sample


def test_dedup_key_is_sha256_of_canonical_json_without_token() -> None:
    body = sample("call.created")
    import hashlib

    canonical = json.dumps(
        {key: body[key] for key in ("resource", "event", "timestamp", "data")},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    expected = hashlib.sha256(canonical.encode()).hexdigest()
    assert aircall.validate_envelope(body).dedup_key == expected
    other_token = dict(body, token="another-token-entirely")
    assert aircall.validate_envelope(other_token).dedup_key == expected


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


def _shuffled(value: Any, seed: int) -> Any:
    if isinstance(value, dict):
        keys = list(value)
        keys = keys[seed % max(len(keys), 1) :] + keys[: seed % max(len(keys), 1)]
        return {key: _shuffled(value[key], seed + 1) for key in reversed(keys)}
    if isinstance(value, list):
        return [_shuffled(item, seed + 1) for item in value]
    return value


@given(data=st.dictionaries(st.text(max_size=8), json_values, max_size=6), seed=st.integers(0, 50))
def test_dedup_key_ignores_key_order_and_spacing(data: dict[str, Any], seed: int) -> None:
    body = {"resource": "call", "event": "call.created", "timestamp": 1, "token": "t", "data": data}
    text = json.dumps(_shuffled(body, seed), indent=seed % 5)
    parsed = aircall.parse_body(text.encode())
    assert aircall.validate_envelope(parsed).dedup_key == aircall.validate_envelope(body).dedup_key


@given(first=st.integers(), second=st.integers())
def test_different_data_gives_different_keys(first: int, second: int) -> None:
    one = aircall.dedup_key("call", "call.created", 1, {"id": first})
    two = aircall.dedup_key("call", "call.created", 1, {"id": second})
    assert (one == two) == (first == second)


def test_message_id_is_prefixed_hex_under_segments_limit() -> None:
    envelope = aircall.validate_envelope(sample("call.ended"))
    assert envelope.message_id == "aircall-" + envelope.dedup_key
    assert len(envelope.message_id) == 72 < 100


def test_envelope_fields() -> None:
    body = sample("call.ended")
    envelope = aircall.validate_envelope(body)
    assert envelope.occurred_at == datetime(2026, 3, 10, 14, 7, 48, tzinfo=UTC)
    assert envelope.resource_id == "1903456789"
    assert envelope.ordering_key == "call:1903456789"
    assert "token" not in envelope.payload
    assert list(envelope.payload) == ["resource", "event", "timestamp", "data"]
    assert "token" in body  # the caller's body is not modified


def test_big_ids_keep_every_digit() -> None:
    raw = (
        b'{"resource":"call","event":"call.created","timestamp":1,'
        b'"data":{"id":18446744073709551621}}'
    )
    envelope = aircall.validate_envelope(aircall.parse_body(raw))
    assert envelope.resource_id == "18446744073709551621"


def test_resource_without_id_gets_a_key_of_its_own() -> None:
    one = aircall.validate_envelope(
        {"resource": "integration", "event": "integration.deleted", "timestamp": 1, "data": {}}
    )
    two = aircall.validate_envelope(
        {"resource": "integration", "event": "integration.deleted", "timestamp": 2, "data": {}}
    )
    assert one.resource_id is None
    assert one.ordering_key.startswith("integration:~")
    assert one.ordering_key != two.ordering_key


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\xff", "UTF-8"),
        (b"[1]", "an array"),
        (b"1", "a number"),
        (b"{", "not valid JSON"),
        (b'{"a": Infinity}', "not valid JSON"),
        (b"[" * 50_000 + b"]" * 50_000, "nested too deeply"),
        (b'{"a": "\\udc00"}', "lone Unicode surrogate"),
    ],
)
def test_parse_body_errors(raw: bytes, message: str) -> None:
    with pytest.raises(aircall.BodyError, match=message):
        aircall.parse_body(raw)


def test_surrogate_pairs_are_fine() -> None:
    assert aircall.parse_body(b'{"a": "\\ud83d\\ude00"}') == {"a": "\U0001f600"}


def test_lifecycle_rank_orders_a_call() -> None:
    order = [
        "call.created",
        "call.ringing_on_agent",
        "call.agent_declined",
        "call.answered",
        "call.hold",
        "call.unhold",
        "call.transferred",
        "call.hungup",
        "call.ended",
        "call.tagged",
    ]
    ranks = [aircall.lifecycle_rank(event) for event in order]
    assert ranks == sorted(ranks)
    assert aircall.lifecycle_rank("call.tagged") == aircall.lifecycle_rank("call.commented")


def test_catalogue_has_26_events_and_skip_reasons_differ() -> None:
    assert len(aircall.SEGMENT_CATALOGUE_EVENTS) == len(set(aircall.SEGMENT_CATALOGUE_EVENTS)) == 26
    assert aircall.skip_reason("call.hold").startswith("filtered")
    assert aircall.skip_reason("call.nope").startswith("unknown event")


# --- what the outbox keeps in columns: storable alike on SQLite and PostgreSQL (issue 10, 1) ---


def _envelope(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resource": "call",
        "event": "call.created",
        "timestamp": 1773151326,
        "data": {"id": 1903456789},
    }
    body.update(fields)
    return body


def _refusal(body: dict[str, Any]) -> aircall.EnvelopeError:
    with pytest.raises(aircall.EnvelopeError) as refused:
        aircall.validate_envelope(body)
    return refused.value


def test_envelope_limits_are_the_outbox_column_lengths() -> None:
    from relay.db.tables import outbox

    assert outbox.c.resource.type.length == aircall.MAX_RESOURCE_CHARS
    assert outbox.c.event.type.length == aircall.MAX_EVENT_CHARS
    assert outbox.c.resource_id.type.length == aircall.MAX_RESOURCE_ID_CHARS
    # The ordering key is `resource:id`, or `resource:~` + 16 hex for an event without an id.
    longest = aircall.MAX_RESOURCE_CHARS + 1 + max(aircall.MAX_RESOURCE_ID_CHARS, 17)
    assert longest <= outbox.c.ordering_key.type.length


CONTROL_CHARACTERS = ["\x00", "\n", "\r", "\t", "\x1b", "\x7f", "\x85", "\x9b"]


@pytest.mark.parametrize("control", CONTROL_CHARACTERS)
@pytest.mark.parametrize(
    ("field", "body"),
    [
        ("resource", lambda c: _envelope(resource=f"ca{c}ll")),
        ("event", lambda c: _envelope(event=f"call.cre{c}ated")),
        ("data.id", lambda c: _envelope(data={"id": f"abc{c}def"})),
    ],
)
def test_control_characters_in_names_and_ids_are_refused(
    field: str, body: Any, control: str
) -> None:
    error = _refusal(body(control))
    assert error.field == field
    assert str(error).startswith(f"{field}: contains the control character U+{ord(control):04X}")


@pytest.mark.parametrize(
    ("field", "limit"),
    [("resource", aircall.MAX_RESOURCE_CHARS), ("event", aircall.MAX_EVENT_CHARS)],
)
def test_names_longer_than_their_column_are_refused_under_their_own_name(
    field: str, limit: int
) -> None:
    assert aircall.validate_envelope(_envelope(**{field: "x" * limit}))
    error = _refusal(_envelope(**{field: "x" * (limit + 1)}))
    assert (error.field, error.detail) == (
        field,
        f"{limit + 1} characters, longer than the {limit} the outbox keeps",
    )


@pytest.mark.parametrize(
    ("data_id", "resource_id"),
    [
        pytest.param(10**64 - 1, "9" * 64, id="64-digits"),
        pytest.param(-(10**63) + 1, "-" + "9" * 63, id="64-characters-with-the-sign"),
        pytest.param("x" * 64, "x" * 64, id="x64"),
        ("", None),  # no usable id: a key of its own, stored as it came
        ("   ", None),
        (1.5, None),
        (True, None),
        (None, None),
        ({"id": "a\x00b"}, None),
    ],
)
def test_ids_that_fit_the_column_or_are_no_id_are_accepted(
    data_id: Any, resource_id: str | None
) -> None:
    envelope = aircall.validate_envelope(_envelope(data={"id": data_id}))
    assert envelope.resource_id == resource_id
    assert len(envelope.ordering_key) <= 200


@pytest.mark.parametrize(
    ("data_id", "detail"),
    [
        pytest.param(10**64, "an integer too long to be a resource id: at most 64 digits", id="65"),
        pytest.param(
            -(10**63), "an integer too long to be a resource id: at most 64 digits", id="-64"
        ),
        pytest.param(10**400, "an integer too long to be a resource id", id="401"),
        pytest.param("x" * 65, "65 characters, longer than the 64 the outbox keeps", id="x65"),
        pytest.param("a\x00", "contains the control character U+0000 at position 1", id="nul"),
    ],
)
def test_ids_that_cannot_be_a_resource_id_are_refused(data_id: Any, detail: str) -> None:
    error = _refusal(_envelope(data={"id": data_id}))
    assert error.field == "data.id"
    assert error.detail.startswith(detail), error.detail


def test_nul_and_controls_deep_in_data_or_in_keys_are_accepted_and_hashed() -> None:
    """Legitimate JSON both databases hold as JSON text (`\\u0000`): stored, never refused."""
    data = {"id": 7, "a\x00key": "v\x00alue", "nested": {"deep\x1b": ["\x00", {"\n": "\x9b"}]}}
    raw = json.dumps(_envelope(data=data)).encode()
    assert b"\\u0000" in raw
    envelope = aircall.validate_envelope(aircall.parse_body(raw), parsed=True)
    assert envelope.data == data
    assert envelope.dedup_key == aircall.dedup_key("call", "call.created", 1773151326, data)
    assert json.loads(aircall.payload_json(envelope.payload)) == envelope.payload
    assert "\\u0000" in aircall.payload_json(envelope.payload)


# --- error details name the field and the type (issue 10, 8) ------------------------------------

JSON_TYPES: dict[str, Any] = {
    "an object": {},
    "an array": [],
    "a string": "text",
    "a number": 3,
    "a boolean": False,
    "null": None,
}
EXPECTED_TYPE = {
    "resource": ("a string", "a non-empty string"),
    "event": ("a string", "a non-empty string"),
    "timestamp": ("a number", "an integer (UNIX seconds)"),
    "data": ("an object", "an object"),
}


@pytest.mark.parametrize(
    ("field", "given"),
    [
        (field, given)
        for field, (right_type, _) in EXPECTED_TYPE.items()
        for given in JSON_TYPES
        if given != right_type
    ],
)
def test_a_field_of_the_wrong_type_is_named_with_the_type_it_has(field: str, given: str) -> None:
    error = _refusal(_envelope(**{field: JSON_TYPES[given]}))
    assert str(error) == f"{field}: expected {EXPECTED_TYPE[field][1]}, got {given}"


@pytest.mark.parametrize("field", list(EXPECTED_TYPE))
def test_a_missing_field_is_named(field: str) -> None:
    body = _envelope()
    del body[field]
    assert str(_refusal(body)) == f"{field}: missing; expected {EXPECTED_TYPE[field][1]}"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"resource": ""}, "resource: expected a non-empty string, got an empty string"),
        ({"event": "  "}, "event: expected a non-empty string, got a string of only whitespace"),
        (
            {"timestamp": 1773151326.5},
            "timestamp: expected an integer (UNIX seconds), got a number with a fraction",
        ),
        ({"timestamp": -1}, "timestamp: -1 is not a UNIX time in seconds"),
    ],
)
def test_a_value_of_the_right_type_but_wrong_is_named(fields: dict[str, Any], message: str) -> None:
    assert str(_refusal(_envelope(**fields))) == message


# --- one nesting limit, at the door (issue 10, 8) ----------------------------------------------


def _nested_body(levels: int) -> bytes:
    """A body `levels` deep: the body object is level 1, `data` level 2, then arrays."""
    arrays = levels - 2
    data = '{"x":' + "[" * arrays + "]" * arrays + "}"
    return ('{"resource":"call","event":"call.created","timestamp":1,"data":' + data + "}").encode()


def test_bodies_up_to_the_nesting_limit_are_accepted() -> None:
    body = aircall.parse_body(_nested_body(aircall.MAX_NESTING))
    envelope = aircall.validate_envelope(body, parsed=True)
    assert envelope.dedup_key == aircall.dedup_key(
        "call", "call.created", 1, envelope.data, parsed=False
    )


@pytest.mark.parametrize("levels", [aircall.MAX_NESTING + 1, 256, 975, 977, 5_000])
def test_bodies_past_the_nesting_limit_are_refused_saying_so(levels: int) -> None:
    with pytest.raises(aircall.BodyError) as refused:
        aircall.parse_body(_nested_body(levels))
    assert str(refused.value) == (
        f"the JSON is nested too deeply: the relay accepts at most {aircall.MAX_NESTING} levels "
        "(the body object is level 1)"
    )


def test_brackets_inside_strings_are_not_nesting() -> None:
    brackets = "[{" * 500
    body = aircall.parse_body(json.dumps(_envelope(data={"id": 1, "text": brackets})).encode())
    assert body["data"]["text"] == brackets
