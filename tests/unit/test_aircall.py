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
