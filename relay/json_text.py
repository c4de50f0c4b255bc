"""JSON text laid out for reading, at any depth: `outbox show` prints stored payloads with it.

Python's `json` and orjson recurse, one level of nesting per frame, so a payload nested deeply
enough (rows stored before the receiver's nesting limit, or written by hand) cannot be parsed or
printed by them. `indent_json` reads the text token by token with a stack of its own instead:
any depth, the keys in their stored order, numbers spelt as stored, and strings written the way
`json.dumps` writes them (so the output of a payload the standard library can handle is what
`json.dumps(json.loads(text), indent=...)` prints, duplicate keys aside). Lines are indented up to
the receiver's nesting limit (`aircall.MAX_NESTING` levels) and no further.
"""

from __future__ import annotations

import json
import re
from typing import Final

from relay.aircall import CONTROL_CHARACTERS, MAX_NESTING

_TOKEN: Final[re.Pattern[str]] = re.compile(
    r"""[ \t\n\r]*(?:
        (?P<string>"(?:[^"\\\x00-\x1f]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*")
      | (?P<scalar>-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null)
      | (?P<mark>[{}\[\]:,])
    )""",
    re.VERBOSE,
)
_WHITESPACE: Final[str] = " \t\n\r"
_CLOSER: Final[dict[str, str]] = {"{": "}", "[": "]"}

# What the parser expects next.
_VALUE, _KEY, _COLON = "a value", "a key", "':'"
_AFTER_VALUE, _END = "',' or a closing bracket", "the end"


def indent_json(text: str, *, indent: int = 2, level: int = 0, ensure_ascii: bool = False) -> str:
    """`text` (one JSON value) laid out with `indent` spaces per level, as if it sat `level`
    levels deep; ValueError when it is not JSON. `ensure_ascii` writes every string in ASCII
    (`\\u` escapes); otherwise strings keep their characters but control characters (DEL and the
    C1 range too, which `json.dumps` leaves as they are) are escaped, so the text is safe on a
    terminal."""
    out: list[str] = []
    closers: list[str] = []
    expected = _VALUE
    position = 0

    def new_line() -> str:
        # Past the receiver's nesting limit lines stop moving right: the output stays linear in
        # the text's length however deep it nests.
        return "\n" + " " * (indent * (level + min(len(closers), MAX_NESTING)))

    while (match := _TOKEN.match(text, position)) is not None:
        if expected == _END:
            raise ValueError(f"not JSON: expected {expected} at character {match.start()}")
        position = match.end()
        mark = match.group("mark")
        if mark is None:  # a string or a scalar
            if expected not in (_VALUE, _KEY) or (expected == _KEY and not match["string"]):
                raise ValueError(f"not JSON: expected {expected} at character {match.start()}")
            token = match["string"] or match["scalar"]
            out.append(_string(token, ensure_ascii) if match["string"] else token)
            expected = _COLON if expected == _KEY else _AFTER_VALUE
        elif mark in _CLOSER and expected == _VALUE:
            following = _TOKEN.match(text, position)
            if following is not None and following["mark"] == _CLOSER[mark]:
                out.append(mark + _CLOSER[mark])  # empty: `{}` or `[]`, as json.dumps writes it
                position = following.end()
                expected = _AFTER_VALUE
            else:
                closers.append(_CLOSER[mark])
                out.append(mark + new_line())
                expected = _KEY if mark == "{" else _VALUE
        elif mark == ":" and expected == _COLON:
            out.append(": ")
            expected = _VALUE
        elif mark == "," and expected == _AFTER_VALUE and closers:
            out.append("," + new_line())
            expected = _KEY if closers[-1] == "}" else _VALUE
        elif expected == _AFTER_VALUE and closers and mark == closers[-1]:
            closers.pop()
            out.append(new_line() + mark)
        else:
            raise ValueError(f"not JSON: expected {expected} at character {match.start()}")
        if expected == _AFTER_VALUE and not closers:
            expected = _END
    rest = text[position:]
    if rest.strip(_WHITESPACE):
        where = position + len(rest) - len(rest.lstrip(_WHITESPACE))
        raise ValueError(f"not JSON: expected {expected} at character {where}")
    if expected != _END:
        raise ValueError(f"not JSON: the text ends where {expected} was expected")
    return "".join(out)


def _string(token: str, ensure_ascii: bool) -> str:
    value = json.loads(token)  # one string: no nesting
    if not ensure_ascii:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (`\ud800`): only an escape can show it
            ensure_ascii = True
    written = json.dumps(value, ensure_ascii=ensure_ascii)
    return CONTROL_CHARACTERS.sub(lambda control: f"\\u{ord(control.group()):04x}", written)
