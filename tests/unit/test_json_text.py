"""`indent_json`: stored JSON text laid out for `outbox show` at any depth (issue 10, fault 8)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.aircall import MAX_NESTING
from relay.json_text import indent_json

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=25,
)


def _escaped_controls(text: str) -> str:
    """What json.dumps leaves raw and indent_json escapes: DEL and the C1 controls."""
    return re.sub("[\x7f-\x9f]", lambda control: f"\\u{ord(control.group()):04x}", text)


@given(value=json_values, level=st.integers(0, 3))
def test_the_layout_is_what_json_dumps_writes(value: Any, level: int) -> None:
    for stored in (
        json.dumps(value, separators=(",", ":"), ensure_ascii=False),
        json.dumps(value, indent=7),  # another layout, \u escapes: the same value
    ):
        assert indent_json(stored, ensure_ascii=True) == json.dumps(value, indent=2)
        assert indent_json(stored) == _escaped_controls(
            json.dumps(value, indent=2, ensure_ascii=False)
        )
        nested = indent_json(stored, level=level, indent=4, ensure_ascii=True)
        assert nested == json.dumps(value, indent=4).replace("\n", "\n" + " " * 4 * level)


@pytest.mark.parametrize(
    "text",
    ["", " ", "{", '{"a"}', '{"a":}', "[1,]", "[1 2]", '{"a":1,}', "01", "truex", "NaN", "{1:2}",
     "]", '{"a":1}}', '{"a":1} x', '"\x01"', '"\\x"', "[1]]", '{"a":1]'],
)  # fmt: skip
def test_text_that_is_not_json_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not JSON"):
        indent_json(text)


def test_any_depth_without_recursion_indented_up_to_the_nesting_limit() -> None:
    levels = 50_000
    text = '{"k":' * levels + '"x"' + "}" * levels
    laid_out = indent_json(text)
    assert re.sub(r"\s", "", laid_out) == text
    widest = max(len(line) - len(line.lstrip(" ")) for line in laid_out.splitlines())
    assert widest == 2 * MAX_NESTING


def test_terminal_controls_in_strings_are_escaped_and_lone_surrogates_kept() -> None:
    laid_out = indent_json('{"a\\u001b[2J":"\x7f\x85\x9b","b":"\\ud800","c":"é"}')
    assert laid_out == (
        '{\n  "a\\u001b[2J": "\\u007f\\u0085\\u009b",\n  "b": "\\ud800",\n  "c": "é"\n}'
    )
