"""Reading the settings: the TOML file, then the `RELAY_*` environment over it.

An unknown `RELAY_*` variable or TOML key is an error, so that a typo never silently leaves a
default in place. Each value goes through its setting's parser (relay/settings/values.py), whose
message names the setting and never shows a secret.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from typing import Any, Final

from relay.settings.spec import ENV_PREFIX
from relay.settings.table import SPECS_BY_NAME, Settings
from relay.settings.values import SettingsError

CONFIG_FILE_ENV: Final[str] = "RELAY_CONFIG_FILE"


def load_settings(
    environ: Mapping[str, str] | None = None, config_file: str | None = None
) -> Settings:
    """Read the TOML file (if any), then the environment over it, and validate everything.

    The file is `config_file`, else `$RELAY_CONFIG_FILE`. Its keys are the setting names in
    lower case (`database_url = "..."`), at the top level or under a `[relay]` table.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    config_file = config_file or environ.get(CONFIG_FILE_ENV) or None
    if config_file is not None:
        for name, raw in _read_toml(config_file).items():
            spec = SPECS_BY_NAME.get(name)
            if spec is None:
                raise SettingsError(f"{config_file}: unknown setting {name!r}")
            values[name] = spec.parse(raw, f"{config_file}: {name}")
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key == CONFIG_FILE_ENV:
            continue
        spec = SPECS_BY_NAME.get(key[len(ENV_PREFIX) :].lower())
        if spec is None:
            raise SettingsError(f"{key}: unknown setting (see docs/configuration.md)")
        values[spec.name] = spec.parse(raw, key)
    settings = Settings(**values, config_file=config_file)
    if settings.pii_hash_paths and settings.pii_hash_key is None:
        raise SettingsError("RELAY_PII_HASH_KEY: required when RELAY_PII_HASH_PATHS is set")
    return settings


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError:
        raise SettingsError(f"{CONFIG_FILE_ENV}: no such file {path}") from None
    except tomllib.TOMLDecodeError as error:
        raise SettingsError(f"{path}: not valid TOML: {error}") from None
    table = document.get("relay", document)
    if not isinstance(table, dict):
        raise SettingsError(f"{path}: [relay] must be a table")
    return table
