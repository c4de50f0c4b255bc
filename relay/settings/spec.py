"""How a setting is declared: `setting(...)` makes a field of `Settings` (relay/settings/table.py)
and records what the rest needs to know of it (`SettingSpec`)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

from relay.settings.values import Parser

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T")

ENV_PREFIX: Final[str] = "RELAY_"
# The groups of settings, in the order docs/configuration.md shows them.
GROUPS: Final[tuple[str, ...]] = (
    "database",
    "receiver",
    "server",
    "logging",
    "segment",
    "drainer",
    "retention",
    "aircall",
)
_SPEC: Final[str] = "relay_setting"


@dataclass(frozen=True, slots=True)
class SettingSpec:
    name: str
    parse: Parser[Any]
    default: Any
    doc: str  # its row in docs/configuration.md
    group: str
    secret: bool = False
    shown: str | None = None  # the docs' Default column, when the value alone reads badly

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


def setting(
    default: object,
    parse: Parser[T],
    doc: str,
    *,
    group: str,
    secret: bool = False,
    shown: str | None = None,
) -> T:
    """A setting: a field of `Settings` with its default, parser, documentation and group. The
    field's type is what the parser returns (mypy checks it against the field's annotation)."""
    if group not in GROUPS:
        raise ValueError(f"unknown settings group {group!r}")
    spec = {"parse": parse, "doc": doc, "group": group, "secret": secret, "shown": shown}
    return cast(T, field(default=default, metadata={_SPEC: spec}))


def specs_of(table: type[DataclassInstance]) -> tuple[SettingSpec, ...]:
    """The settings declared in `table`, in their order."""
    return tuple(
        SettingSpec(name=f.name, default=f.default, **f.metadata[_SPEC])
        for f in fields(table)
        if _SPEC in f.metadata
    )
