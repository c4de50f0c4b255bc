"""The mapping's rules, as data first: who a message is about (`userId` or `anonymousId`), how
top-level keys are renamed so that no warehouse column drops them, and which arrays a message too
large loses first. Below the tables, the functions that apply them.

docs/mapping.md explains each rule to operators (§2 identity, §3 renaming, §5 size), with a
worked example the tests check against the code; relay/snakecase.py says which warehouse columns
are reserved. A rule changed here changes what every event sends: change those docs with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any, Final

from relay.aircall import MESSAGE_ID_PREFIX, resource_id_of
from relay.pii import Location
from relay.snakecase import is_safe_property_name, snakecase

# -- identity (docs/mapping.md §2) -------------------------------------------------------------

# By resource: the object in `data` (keys from `data`; () is `data` itself) whose `id` is the
# Aircall user the event is about. That id, as a string, is the message's `userId`.
USER_ID_FROM: Final[Mapping[str, tuple[str, ...]]] = {
    "user": (),  # a user event: the user itself, `data.id`
    "call": ("user",),  # a call: its agent, `data.user.id`, once the call has one
}
# Otherwise (another resource, or no usable id where the rule points) the message carries an
# `anonymousId` that names the resource, ANONYMOUS_ID_PREFIX + `<resource>-<id>`: by its id
# (`aircall-call-1903456789`), or, for an event whose `data` has no usable id, by the first
# MESSAGE_HEX_CHARS hex characters of its messageId (`aircall-integration-5f0c...`). Exactly one
# of the two keys is sent, never null.
ANONYMOUS_ID_PREFIX: Final[str] = "aircall-"
MESSAGE_HEX_CHARS: Final[int] = 16

# -- renaming (docs/mapping.md §3) -------------------------------------------------------------

# Top-level keys of `data` that are not sent at all.
NOT_SENT: Final[frozenset[str]] = frozenset({"token"})
# A top-level key is unsafe when its column is empty, reserved, or the first words of a reserved
# column (relay.snakecase.is_safe_property_name). An unsafe key is sent as RENAMED (`id` of a
# call -> `call_id`, a call's `user` -> `call_user`) when that is safe and its column is no other
# property's; else as RENAMED_ELSE, numbered from 2 while its column is another property's
# (`aircall_call_id_2`, `_3`, ...). Every column of an `aircall_...` name starts with
# `aircall`, which no reserved column does. Only top-level keys are renamed; safe keys keep their
# names, and every key keeps Aircall's order.
RENAMED: Final[str] = "{resource}_{key}"
RENAMED_ELSE: Final[str] = "aircall_{resource}_{key}"
NUMBERED: Final[str] = "{name}_{number}"
# Renamed keys that may land on a reserved column, (resource, key) -> property: a user event's
# `id` is sent as `user_id`, the same value as the message's `userId`, which the warehouse writes
# in its `user_id` column anyway. Only while the message has a `userId`: a user whose id is
# unusable is anonymous, and its `id` goes as `aircall_user_id`.
RESERVED_ALLOWED: Final[Mapping[tuple[str, str], str]] = {("user", "id"): "user_id"}

# -- trimming (docs/mapping.md §5) -------------------------------------------------------------

# Arrays Aircall repeats whole inside other objects, about 1 KB per element (reference §8).
HEAVY_ARRAY_KEYS: Final[frozenset[str]] = frozenset({"numbers", "users"})
# By resource, the top-level array trimmed first (a user's numbers, a number's users); then every
# other heavy array, in document order.
TRIMMED_FIRST: Final[Mapping[str, str]] = {"user": "numbers", "number": "users"}
# The passes, each over every array in that order, re-measuring after each step: the array's
# elements reduced to `{"id": ...}`, then, if still too large, the array removed. (The names are
# recorded in the message: `context.aircall_relay.trimmed[].action`.)
REDUCED_TO_IDS: Final[str] = "reduced_to_ids"
REMOVED: Final[str] = "removed"
TRIM_PASSES: Final[tuple[str, ...]] = (REDUCED_TO_IDS, REMOVED)


# -- the rules applied ---------------------------------------------------------------------------


def identity(
    resource: str, resource_id: str | None, message_id: str, data: dict[str, Any]
) -> tuple[str, str]:
    """("userId", id) or ("anonymousId", id) for an event, read from Aircall's `data` before
    the personal-data paths apply."""
    holder_path = USER_ID_FROM.get(resource)
    if holder_path is not None:
        holder: Any = data
        for key in holder_path:
            holder = holder.get(key)
            if not isinstance(holder, dict):
                break
        else:
            user_id = resource_id_of(holder)
            if user_id is not None:
                return "userId", user_id
    if resource_id is None:
        resource_id = message_id.removeprefix(MESSAGE_ID_PREFIX)[:MESSAGE_HEX_CHARS]
    return "anonymousId", f"{ANONYMOUS_ID_PREFIX}{resource}-{resource_id}"


def rename_properties(
    resource: str, data: Mapping[str, Any], *, has_user_id: bool
) -> dict[str, Any]:
    """`data`'s top-level keys under the names they are sent as, in Aircall's order, without the
    keys not sent. `has_user_id`: the message carries a `userId` (see RESERVED_ALLOWED)."""
    plan = _rename_plan(resource, tuple(data), has_user_id)
    return {target: data[source] for source, target in plan}


@lru_cache(maxsize=1024)
def _rename_plan(
    resource: str, keys: tuple[str, ...], has_user_id: bool
) -> tuple[tuple[str, str], ...]:
    """(Aircall key, property name) for each key sent, in Aircall's order.

    Cached: the keys of one kind of event are the same tuple every time.
    """
    kept = {key for key in keys if key not in NOT_SENT and is_safe_property_name(key)}
    taken_columns = {snakecase(key) for key in kept}
    plan: list[tuple[str, str]] = []
    for key in keys:
        if key in NOT_SENT:
            continue
        if key in kept:
            plan.append((key, key))
            continue
        target = _renamed(resource, key, taken_columns, has_user_id)
        taken_columns.add(snakecase(target))
        plan.append((key, target))
    return tuple(plan)


def _renamed(resource: str, key: str, taken_columns: set[str], has_user_id: bool) -> str:
    first_choice = RENAMED.format(resource=resource, key=key)
    allowed_reserved = has_user_id and RESERVED_ALLOWED.get((resource, key)) == first_choice
    if (allowed_reserved or is_safe_property_name(first_choice)) and snakecase(
        first_choice
    ) not in taken_columns:
        return first_choice
    fallback = RENAMED_ELSE.format(resource=resource, key=key)
    candidate = fallback
    number = 1
    while snakecase(candidate) in taken_columns:
        number += 1
        candidate = NUMBERED.format(name=fallback, number=number)
    return candidate


def heavy_arrays(resource: str, properties: dict[str, Any]) -> list[Location]:
    """The arrays trimming may touch, in the order it touches them (none inside another)."""
    found: list[Location] = []
    first = TRIMMED_FIRST.get(resource)
    if first is not None and isinstance(properties.get(first), list):
        found.append((first,))
    _collect_heavy_arrays(properties, (), found)
    return found


def _collect_heavy_arrays(node: Any, location: Location, found: list[Location]) -> None:
    if isinstance(node, dict):
        for key, child in node.items():
            child_location = (*location, key)
            if key in HEAVY_ARRAY_KEYS and isinstance(child, list):
                if child_location not in found:
                    found.append(child_location)
                # Not inside: reducing or removing this array reaches whatever it holds.
                continue
            _collect_heavy_arrays(child, child_location, found)
    elif isinstance(node, list):
        for position, child in enumerate(node):
            _collect_heavy_arrays(child, (*location, position), found)
