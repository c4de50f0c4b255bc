"""Components configured by the settings: their fields declared with `from_setting` take their
defaults from the table (relay/settings/table.py), so a default is never stated twice, and
`configure` fills them from a `Settings`."""

from __future__ import annotations

from dataclasses import field, fields
from typing import TYPE_CHECKING, Any, Final, TypeVar

from relay.settings.table import SPECS_BY_NAME, Settings

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

C = TypeVar("C", bound="DataclassInstance")

_FED_BY: Final[str] = "relay_fed_by"


def from_setting(name: str) -> Any:
    """A field of a component's configuration (a dataclass) fed by the setting `name`, with the
    setting's default."""
    return field(default=SPECS_BY_NAME[name].default, metadata={_FED_BY: name})


def fed_by(config_class: type[DataclassInstance]) -> dict[str, str]:
    """The fields of `config_class` declared with `from_setting`, and the setting of each."""
    return {f.name: f.metadata[_FED_BY] for f in fields(config_class) if _FED_BY in f.metadata}


def configure(config_class: type[C], settings: Settings, **values: Any) -> C:
    """`config_class` with each `from_setting` field taken from `settings`, the others from
    `values` or their defaults."""
    fed = {name: getattr(settings, setting) for name, setting in fed_by(config_class).items()}
    return config_class(**fed, **values)
