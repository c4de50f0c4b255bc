"""Warehouse column naming (relay/snakecase.py): the go-snakecase port and the reserved columns."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.snakecase import (
    flattened_columns,
    is_reserved_column,
    is_safe_property_name,
    reserved_columns_in,
    snakecase,
)

# segmentio/go-snakecase snake_test.go, plus the examples in shared/reference/segment-http-api.md.
GO_SNAKECASE_CASES = [
    ("sample text", "sample_text"),
    ("sample-text", "sample_text"),
    ("sample_text", "sample_text"),
    ("sample___text", "sample_text"),
    ("sampleText", "sample_text"),
    ("inviteYourCustomersAddInvites", "invite_your_customers_add_invites"),
    ("sample 2 Text", "sample_2_text"),
    ("   sample   2    Text   ", "sample_2_text"),
    ("   $#$sample   2    Text   ", "sample_2_text"),
    ("SAMPLE 2 TEXT", "sample_2_text"),
    ("___$$Base64Encode", "base64_encode"),
    ("FOO:BAR$BAZ", "foo_bar_baz"),
    ("FOO#BAR#BAZ", "foo_bar_baz"),
    ("something.com", "something_com"),
    ("$something%", "something"),
    ("•¶§ƒ˚foo˙∆˚¬", "foo"),
    ("CStringRef", "cstring_ref"),
    ("call.created", "call_created"),
    ("call.ringing_on_agent", "call_ringing_on_agent"),
    ("call.agent_declined", "call_agent_declined"),
    ("user.opened", "user_opened"),
    ("Call Created", "call_created"),
    ("callCreated", "call_created"),
    ("", ""),
    ("_", ""),
    ("user_", "user"),
    ("_user", "user"),
    ("a__b", "a_b"),
    ("a_B", "a_b"),
    ("ID", "id"),
    ("userID", "user_id"),
    ("User Id", "user_id"),
    ("é", ""),
    ("@49L0S145_¬fwHƒ0TSLNVp", "49l0s145_fw_h_0tslnvp"),
    ("lk0B@bFmjrLQ_Z6YL", "lk0_b_b_fmjr_lq_z6yl"),
    ("samPLE text", "sam_ple_text"),
    ("5test", "5test"),
    ("test5", "test5"),
    ("THE5r", "the5r"),
    ("5TEst", "5test"),
    ("_5TEst", "5test"),
    ("@%#&5TEst", "5test"),
    ("edf_6N", "edf_6n"),
    ("f_pX9", "f_p_x9"),
    ("p_z9Rg", "p_z9_rg"),
    ("2FA Enabled", "2fa_enabled"),
    ("Enabled 2FA", "enabled_2fa"),
]


@pytest.mark.parametrize(("text", "expected"), GO_SNAKECASE_CASES)
def test_snakecase_matches_go_snakecase(text: str, expected: str) -> None:
    assert snakecase(text) == expected


@pytest.mark.parametrize(
    "column",
    [
        "id",
        "user_id",
        "anonymous_id",
        "event",
        "event_text",
        "timestamp",
        "received_at",
        "sent_at",
        "original_timestamp",
        "uuid",
        "uuid_ts",
        "loaded_at",
        "context",
        "context_library_name",
    ],
)
def test_reserved_columns(column: str) -> None:
    assert is_reserved_column(column)


@pytest.mark.parametrize(
    ("name", "safe"),
    [
        ("id", False),
        ("user", False),
        ("userId", False),
        ("User", False),
        ("sent", False),
        ("received", False),
        ("event", False),
        ("Event Text", False),
        ("context", False),
        ("contextual", True),
        ("$", False),
        ("", False),
        ("users", True),
        ("user2", True),
        ("call_id", True),
        ("number", True),
        ("contact", True),
        ("transferred_to", True),
        ("call_user", True),
    ],
)
def test_safe_property_names(name: str, safe: bool) -> None:
    assert is_safe_property_name(name) is safe


def test_flattened_columns_follow_segments_rules() -> None:
    properties = {"call_user": {"id": 1, "Name": "N", "tags": [1]}, "teams": [{"id": 2}], "x": {}}
    assert list(flattened_columns(properties)) == [
        ("call_user_id", "call_user.id"),
        ("call_user_name", "call_user.Name"),
        ("call_user_tags", "call_user.tags"),
        ("teams", "teams"),
        ("x", "x"),
    ]


@given(key=st.text(max_size=10), rest=st.lists(st.text(max_size=6), min_size=1, max_size=3))
def test_a_keys_flattened_columns_start_with_its_own_column(key: str, rest: list[str]) -> None:
    # What is_safe_property_name relies on: children never merge into the key's own words.
    own = snakecase(key)
    column = snakecase("_".join([key, *rest]))
    if own:
        assert column == own or column.startswith(own + "_")


@given(
    key=st.text(max_size=12),
    value=st.recursive(
        st.none() | st.integers(),
        lambda children: st.dictionaries(st.text(max_size=6), children, max_size=3),
        max_leaves=10,
    ),
)
def test_a_safe_name_never_reaches_a_reserved_column(key: str, value: object) -> None:
    if is_safe_property_name(key):
        for column, _path in flattened_columns({key: value}):
            assert not is_reserved_column(column), (key, column)


@given(
    properties=st.dictionaries(
        st.sampled_from(["id", "user", "User", "context", "uuid", "loaded", "sent", "x", "$"]),
        st.recursive(
            st.none() | st.integers(),
            lambda children: st.dictionaries(
                st.sampled_from(["id", "at", "ts", "Id", "ip", "y"]), children, max_size=3
            ),
            max_leaves=8,
        ),
        max_size=4,
    )
)
def test_reserved_columns_in_are_the_reserved_flattened_columns(
    properties: dict[str, object],
) -> None:
    # The fake Segment's check: the same answer as flattening everything, walking less.
    expected = [column for column, _ in flattened_columns(properties) if is_reserved_column(column)]
    assert reserved_columns_in(properties) == expected
