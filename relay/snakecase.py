"""How Segment's warehouses name columns: a port of go-snakecase, the reserved column names, and
the flattening of nested properties into columns.

Pure code. The mapping (relay/segment/, its renaming rules in `rules.py`) uses it to rename
Aircall fields that a warehouse would otherwise silently discard; the tests use it to prove that
nothing collides.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from functools import lru_cache
from typing import Any, Final

# Columns Segment's warehouses add to every track event table (segment-docs
# src/connections/storage/warehouses/schema.md: "Event Tables", "Timestamps", "id",
# "uuid, uuid_ts, and loaded_at"). A property whose column has one of these names is discarded.
# `context` itself is listed because every `context_*` column is Segment's.
RESERVED_COLUMNS: Final[frozenset[str]] = frozenset(
    {
        "id",
        "anonymous_id",
        "user_id",
        "event",
        "event_text",
        "received_at",
        "sent_at",
        "timestamp",
        "original_timestamp",
        "uuid",
        "uuid_ts",
        "loaded_at",
        "context",
    }
)
RESERVED_COLUMN_PREFIX: Final[str] = "context_"

# go-snakecase returns its input untouched when every byte is a lowercase letter or a digit, or an
# underscore that is neither first nor last and is followed by a lowercase letter or digit. That is
# exactly this pattern; checking it in C keeps the common case (Aircall's own snake_case keys) fast.
_ALREADY_SNAKE: Final[re.Pattern[str]] = re.compile(r"[a-z0-9]+(?:_[a-z0-9]+)*")


def _is_lower(character: str) -> bool:
    return "a" <= character <= "z"


def _is_upper(character: str) -> bool:
    return "A" <= character <= "Z"


def _is_digit(character: str) -> bool:
    return "0" <= character <= "9"


def _is_alphanumeric(character: str) -> bool:
    return _is_lower(character) or _is_upper(character) or _is_digit(character)


@lru_cache(maxsize=8192)
def snakecase(text: str) -> str:
    """`Snakecase` from segmentio/go-snakecase (snake.go), character for character.

    Only ASCII letters and digits survive; every other character (punctuation, spaces, and any
    non-ASCII character, whose UTF-8 bytes Go sees as non-alphanumeric) separates words.
    `call.created` -> `call_created`, `callCreated` -> `call_created`,
    `CStringRef` -> `cstring_ref`.
    """
    if not text or _ALREADY_SNAKE.fullmatch(text):
        return text
    length = len(text)
    index = 0
    has_lower = False
    has_underscore = False
    lowercase_since_underscore = False
    # The leading run that go-snakecase keeps as is (it stops at the first "bad" character).
    while index < length:
        character = text[index]
        if _is_lower(character):
            has_lower = True
            if has_underscore:
                lowercase_since_underscore = True
            index += 1
            continue
        if _is_digit(character):
            index += 1
            continue
        if (
            character == "_"
            and 0 < index < length - 1
            and (_is_lower(text[index + 1]) or _is_digit(text[index + 1]))
        ):
            has_underscore = True
            lowercase_since_underscore = False
            index += 1
            continue
        break
    if index == length:
        return text
    output = list(text[:index])
    # An uppercase run right after the kept prefix joins it without a separator when the prefix
    # had no lowercase letter (or none since its last underscore): "CStringRef" -> "cstring_ref".
    if _is_upper(text[index]) and (
        not has_lower or (has_underscore and not lowercase_since_underscore)
    ):
        index = _copy_word(text, index, output)
    while index < length:
        if not _is_alphanumeric(text[index]):
            index += 1
            continue
        if output:
            output.append("_")
        index = _copy_word(text, index, output)
    return "".join(output)


def _copy_word(text: str, index: int, output: list[str]) -> int:
    """Append the word at `index` to `output`, as go-snakecase does: its uppercase letters and
    digits lowered, then its lowercase letters and digits; return the index after it."""
    length = len(text)
    while index < length and (_is_upper(text[index]) or _is_digit(text[index])):
        output.append(text[index].lower())
        index += 1
    while index < length and (_is_lower(text[index]) or _is_digit(text[index])):
        output.append(text[index])
        index += 1
    return index


def is_reserved_column(column: str) -> bool:
    """True when a warehouse would discard a property that lands in this column."""
    return column in RESERVED_COLUMNS or column.startswith(RESERVED_COLUMN_PREFIX)


@lru_cache(maxsize=8192)
def is_safe_property_name(name: str) -> bool:
    """True when no column flattened from a top-level property of this name can be reserved.

    Whatever the value, its columns are `snakecase(name)` or start with `snakecase(name) + "_"`
    (go-snakecase treats the `_` that joins flattened keys as a word separator, so a key's words
    never merge with its children's). So a name is safe when its column is non-empty, not
    reserved, and not the first words of a reserved column: `user` is unsafe because a `user`
    object flattens to `user_id`; `sent` is unsafe because of `sent_at`. Deciding on the name
    alone keeps a key's columns the same in every event, whatever its value (null or object).
    """
    column = snakecase(name)
    if not column or is_reserved_column(column):
        return False
    words = column + "_"
    return not any(reserved.startswith(words) for reserved in RESERVED_COLUMNS)


def flattened_columns(properties: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(column, property path) for every column the properties could fill in a warehouse table.

    Nested objects are flattened with `_` and arrays are one (stringified) column, as Segment
    documents. Null values and empty objects are counted as columns of their own, although
    Segment creates no column for them, so that a check built on this errs on the safe side.
    """
    for key, value in properties.items():
        yield from _flatten(key, key, value)


def _flatten(joined_keys: str, path: str, value: Any) -> Iterator[tuple[str, str]]:
    if isinstance(value, Mapping) and value:
        for key, child in value.items():
            yield from _flatten(f"{joined_keys}_{key}", f"{path}.{key}", child)
    else:
        yield snakecase(joined_keys), path


def reserved_columns_in(properties: Mapping[str, Any]) -> list[str]:
    """The reserved columns these properties would fill, so what a warehouse would discard.

    The same columns as `flattened_columns` filtered by `is_reserved_column`, without walking the
    objects under a safe name (none of their columns can be reserved): the fake Segment runs it
    on every message it accepts.
    """
    return list(_reserved_columns(properties, None))


def _reserved_columns(properties: Mapping[str, Any], parent: str | None) -> Iterator[str]:
    for key, value in properties.items():
        joined_keys = key if parent is None else f"{parent}_{key}"
        if is_safe_property_name(joined_keys):
            continue
        if isinstance(value, Mapping) and value:
            yield from _reserved_columns(value, joined_keys)
        elif is_reserved_column(column := snakecase(joined_keys)):
            yield column
