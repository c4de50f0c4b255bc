"""Each default is stated once, in the settings table (relay/settings/table.py): the components the
settings configure take theirs from it, and docs/configuration.md's tables are written from it."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from dataclasses import fields
from typing import Any

import pytest

import relay
from relay.aircall_api import AircallApi
from relay.db.engine import create_engine
from relay.db.notify import OutboxListener, listener_for
from relay.drainer.config import DrainerConfig
from relay.drainer.retention import RetentionPolicy
from relay.settings import DEFAULTS, SPECS, Settings, fed_by, load_settings
from relay.settings.docs import DOCUMENT, render

# The components built `from_settings`, and the fields of each that are its own constants (not
# settings, so with defaults of their own).
COMPONENTS: dict[type[Any], set[str]] = {
    DrainerConfig: {
        "max_batch_bytes",
        "configuration_retry_seconds",
        "call_ended_check_seconds",
        "unreachable_alert_seconds",
    },
    RetentionPolicy: set(),
}
# Built `from_settings` but holding no setting as a field: clients that take the values they need
# (a URL, a credential) and state no default of a setting.
CLIENTS: set[type[Any]] = {AircallApi}


class _Probe:
    """A value of its own for one setting: found in a component, it says which setting fed it."""

    def __init__(self, setting: str) -> None:
        self.setting = setting


def _probed_settings() -> Settings:
    return Settings(**{spec.name: _Probe(spec.name) for spec in SPECS})


def test_every_component_configured_by_the_settings_is_checked() -> None:
    found = set()
    for module_info in pkgutil.walk_packages(relay.__path__, "relay."):
        if module_info.name.startswith("relay.testing"):
            continue
        module = importlib.import_module(module_info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and "from_settings" in vars(cls):
                found.add(cls)
    assert found == set(COMPONENTS) | CLIENTS


@pytest.mark.parametrize("component", list(COMPONENTS), ids=lambda cls: cls.__name__)
def test_a_component_states_no_default_of_a_setting(component: type[Any]) -> None:
    """A field fed by a setting is declared `from_setting(name)`, which takes the table's default;
    a default of its own there would be the same default stated twice."""
    configured = component.from_settings(_probed_settings())
    declared = fed_by(component)
    for field in fields(component):
        value = getattr(configured, field.name)
        where = f"{component.__name__}.{field.name}"
        if isinstance(value, _Probe):
            assert declared.get(field.name) == value.setting, (
                f"{where} is fed by the setting {value.setting} but states a default of its own:"
                f" declare it `from_setting({value.setting!r})`"
            )
        else:
            assert field.name in COMPONENTS[component], (
                f"{where} is neither fed by a setting (`from_setting`) nor one of "
                f"{component.__name__}'s own constants"
            )
    for name, setting in declared.items():
        assert getattr(component(), name) == getattr(DEFAULTS, setting)


@pytest.mark.parametrize(
    "function", [create_engine, listener_for, OutboxListener], ids=lambda f: f.__name__
)
def test_the_database_layer_states_no_default_of_the_database_timeout(function: Any) -> None:
    """The engines and the listener take RELAY_DATABASE_TIMEOUT_SECONDS from their caller: a
    default of their own would be that setting's default stated a second time (and `migrate`
    once ignored the setting because of it)."""
    parameter = inspect.signature(function).parameters["timeout_seconds"]
    assert parameter.default is inspect.Parameter.empty


def test_the_settings_table_is_the_settings_object() -> None:
    assert [spec.name for spec in SPECS] == [
        field.name for field in fields(Settings) if field.name != "config_file"
    ]
    assert all(getattr(DEFAULTS, spec.name) == spec.default for spec in SPECS)
    assert load_settings({}) == DEFAULTS


def test_configuration_md_tables_are_written_from_the_table() -> None:
    document = DOCUMENT.read_text()
    assert render(document) == document, (
        "docs/configuration.md differs from relay/settings/table.py: run "
        "`python -m relay.settings.docs`"
    )


def test_a_default_shown_in_the_docs_is_the_default() -> None:
    """The Default column says `shown` where the value alone reads badly: what it quotes must
    parse to the default, so that it cannot drift from the table."""
    checked = 0
    for spec in SPECS:
        for quoted in re.findall(r"`([^`]+)`", spec.shown or ""):
            assert spec.parse(quoted, spec.env) == spec.default, spec.name
            checked += 1
    assert checked >= 3


def test_docs_rendering_refuses_a_document_without_every_group() -> None:
    document = DOCUMENT.read_text()
    without = re.sub(
        r"<!-- settings: logging.*?<!-- end of settings: logging -->", "", document, flags=re.DOTALL
    )
    with pytest.raises(ValueError, match="one marked table per group"):
        render(without)
