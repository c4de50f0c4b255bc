"""Personal data in Aircall's `data`: the path syntax an operator uses to name fields, and dropping
or hashing what the paths match before an event goes to Segment (PRODUCT §7).

Pure code. Edits are copy-on-write: the input is never modified, and the result shares every
container the edit did not touch, so the outbox keeps the original and nothing is deep-copied.

Path syntax, relative to `data`: dot-separated steps, each a key, `*` (any one key) or `**` (any
depth, through objects and arrays, including none); `[]` after a key or `*` steps into every element
of the array there. A path ends with a key or `*`. Examples: `raw_digits`, `contact.emails[].value`,
`participants[].phone_number`, `*.email`, `**.email`, `comments[].content`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from relay.aircall import canonical_json

HASH_PREFIX: Final[str] = "hmac-sha256:"
# A shorter key could be found by brute force, and with it every hashed phone number reversed.
MIN_HASH_KEY_BYTES: Final[int] = 16

_ANY_KEY: Final[str] = "*"
_ANY_DEPTH: Final[str] = "**"
_EACH_ELEMENT: Final[str] = "[]"
_FORBIDDEN_IN_KEYS: Final[frozenset[str]] = frozenset("*[]")


@dataclass(frozen=True, slots=True)
class KeyStep:
    """One key (`name`), or any one key when `name` is None; `each_element` is a trailing `[]`."""

    name: str | None
    each_element: bool = False


@dataclass(frozen=True, slots=True)
class AnyDepthStep:
    """`**`: the rest of the path applies here and in every object below, at any depth."""


PathStep: TypeAlias = KeyStep | AnyDepthStep
# Where a value sits in a JSON tree: object keys and array indexes from the root.
Location: TypeAlias = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class DataPath:
    """A parsed path: its text as configured, and its steps."""

    text: str
    steps: tuple[PathStep, ...]


def parse_path(path: str) -> DataPath:
    """Parse and validate one path; ValueError names the path and what is wrong with it."""
    if not isinstance(path, str):
        raise ValueError(f"PII path {path!r}: must be a string")

    def invalid(detail: str) -> ValueError:
        return ValueError(f"PII path {path!r}: {detail}")

    if not path:
        raise invalid("is empty")
    if any(character.isspace() for character in path):
        raise invalid("contains whitespace")
    segments = path.split(".")
    steps: list[PathStep] = []
    for position, segment in enumerate(segments, start=1):
        if not segment:
            raise invalid(f"step {position} is empty (two dots, or a dot at an end)")
        if segment == _ANY_DEPTH:
            if position == len(segments):
                raise invalid("`**` must be followed by a key, as in `**.email`")
            if steps and isinstance(steps[-1], AnyDepthStep):
                raise invalid("`**.**` is the same as `**`; write it once")
            steps.append(AnyDepthStep())
            continue
        each_element = segment.endswith(_EACH_ELEMENT)
        name = segment[: -len(_EACH_ELEMENT)] if each_element else segment
        if each_element and position == len(segments):
            raise invalid(
                "must end with a key, not `[]`; name the array's key to drop or hash it whole"
            )
        if not name:
            raise invalid(f"step {position} `{segment}` has `[]` without a key before it")
        if name == _ANY_DEPTH:
            raise invalid("`**[]` is not allowed; `**` already goes through arrays")
        if name == _ANY_KEY:
            steps.append(KeyStep(None, each_element))
            continue
        if any(character in _FORBIDDEN_IN_KEYS for character in name):
            raise invalid(
                f"step {position} `{segment}`: `*` must be a whole step, and `[]` may only end one"
            )
        steps.append(KeyStep(name, each_element))
    return DataPath(text=path, steps=tuple(steps))


def find_locations(root: Any, path: DataPath) -> list[Location]:
    """Every location the path matches in `root`, outer before inner; none is not an error."""
    found: list[Location] = []
    _collect(root, path.steps, 0, (), found)
    return found


def _collect(
    node: Any, steps: tuple[PathStep, ...], index: int, location: Location, found: list[Location]
) -> None:
    step = steps[index]
    if isinstance(step, AnyDepthStep):
        # The next step is never `**` and always needs an object: visit only the objects.
        objects: list[tuple[dict[str, Any], Location]] = []
        _objects_within(node, location, objects)
        for found_object, object_location in objects:
            _collect(found_object, steps, index + 1, object_location, found)
        return
    if not isinstance(node, dict):
        return
    names: Iterable[str] = node.keys() if step.name is None else (step.name,)
    is_last = index == len(steps) - 1
    for name in names:
        if name not in node:
            continue
        child_location = (*location, name)
        if is_last:
            found.append(child_location)
            continue
        child = node[name]
        if not step.each_element:
            _collect(child, steps, index + 1, child_location, found)
        elif isinstance(child, list):
            for position, element in enumerate(child):
                _collect(element, steps, index + 1, (*child_location, position), found)


def _objects_within(
    node: Any, location: Location, objects: list[tuple[dict[str, Any], Location]]
) -> None:
    """Every object at or below `node`, through objects and arrays, outer first."""
    if isinstance(node, dict):
        objects.append((node, location))
        for key, child in node.items():
            if isinstance(child, dict | list):
                _objects_within(child, (*location, key), objects)
    elif isinstance(node, list):
        for position, child in enumerate(node):
            if isinstance(child, dict | list):
                _objects_within(child, (*location, position), objects)


class _Remove:
    """Returned by an edit to delete the value's key from its object."""


REMOVE: Final[_Remove] = _Remove()
_MISSING: Final[object] = object()


def edit_locations(
    root: Mapping[str, Any],
    locations: Iterable[Location],
    change: Callable[[Any], Any],
) -> dict[str, Any]:
    """A copy of `root` where the value at each location is replaced by `change(value)`.

    `change` may return REMOVE to delete the key (a location that ends with an array index cannot
    be removed, so the other elements keep their positions). Containers on the way to an edited
    value are copied once; everything else is shared with `root`. Each location is edited once,
    outer ones first, and one that no longer exists (it was inside a value already replaced or
    removed) is skipped, so overlapping paths never hash a hash.
    """
    result = dict(root)
    copies: dict[int, Any] = {id(result): result}
    unique = dict.fromkeys(locations)
    for location in sorted(unique, key=len):
        if not location:
            continue
        container: Any = result
        for step in location[:-1]:
            child = _child(container, step)
            if not isinstance(child, dict | list):
                break
            if id(child) not in copies:
                child = dict(child) if isinstance(child, dict) else list(child)
                copies[id(child)] = child
                container[step] = child
            container = child
        else:
            last = location[-1]
            current = _child(container, last)
            if current is _MISSING:
                continue
            replacement = change(current)
            if replacement is REMOVE:
                if isinstance(container, dict):
                    del container[last]
            else:
                container[last] = replacement
    return result


def _child(container: Any, step: str | int) -> Any:
    if isinstance(container, dict):
        return container.get(step, _MISSING) if isinstance(step, str) else _MISSING
    if isinstance(container, list) and isinstance(step, int) and 0 <= step < len(container):
        return container[step]
    return _MISSING


def value_at(root: Any, location: Location) -> Any:
    """The value at a location, or None when there is none."""
    node = root
    for step in location:
        node = _child(node, step)
        if node is _MISSING:
            return None
    return node


def location_text(location: Location) -> str:
    """`("teams", 0, "users")` -> `teams[0].users`, the notation of the paths above."""
    parts: list[str] = []
    for step in location:
        if isinstance(step, int):
            parts.append(f"[{step}]")
        else:
            parts.append(f".{step}" if parts else step)
    return "".join(parts)


class Redactor:
    """Drops, then hashes, what the configured paths match; built once from validated settings."""

    __slots__ = ("_drop_paths", "_hash_paths", "_keyed_hash")

    def __init__(
        self,
        drop_paths: Iterable[DataPath],
        hash_paths: Iterable[DataPath],
        hash_key: bytes | None,
    ) -> None:
        self._drop_paths = tuple(drop_paths)
        self._hash_paths = tuple(hash_paths)
        if self._hash_paths:
            self._keyed_hash = _keyed_hasher(hash_key)

    def apply(self, data: Mapping[str, Any]) -> Mapping[str, Any]:
        """`data` with the drops and hashes applied; `data` itself when no path matched."""
        result = data
        locations = [loc for path in self._drop_paths for loc in find_locations(result, path)]
        if locations:
            result = edit_locations(result, locations, _remove)
        locations = [loc for path in self._hash_paths for loc in find_locations(result, path)]
        if locations:
            result = edit_locations(result, locations, self._keyed_hash)
        return result


def _remove(_value: Any) -> _Remove:
    return REMOVE


def _keyed_hasher(hash_key: bytes | None) -> Callable[[Any], str | None]:
    if not isinstance(hash_key, bytes):
        raise ValueError("the PII hash key must be bytes")
    if len(hash_key) < MIN_HASH_KEY_BYTES:
        raise ValueError(
            f"a hash key of at least {MIN_HASH_KEY_BYTES} bytes is required to hash PII paths"
        )
    base = hmac.new(hash_key, digestmod=hashlib.sha256)

    def keyed_hash(value: Any) -> str | None:
        if value is None:
            return None
        digest = base.copy()
        # surrogatepass: a lone surrogate (JSON can spell one) still hashes, deterministically.
        digest.update(canonical_json(value).encode("utf-8", "surrogatepass"))
        return HASH_PREFIX + digest.hexdigest()

    return keyed_hash


def keyed_hash(hash_key: bytes, value: Any) -> str | None:
    """The value as a hashed path sends it: `hmac-sha256:` + hex HMAC-SHA256 of its canonical
    JSON (a string is hashed with its quotes: `"+44 7700 900461"`); null stays null."""
    return _keyed_hasher(hash_key)(value)
