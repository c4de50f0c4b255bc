"""Settings: read once from `RELAY_*` environment variables and an optional TOML file,
validated, frozen.

Every setting is declared once, as a field of `Settings` in relay/settings/table.py: that is the
one place to add or change a setting. Its values and parsers are in values.py, the reading in
load.py, the components fed from the table in feed.py, and docs/configuration.md's tables are
written from the table by docs.py.
"""

from relay.settings.feed import configure, fed_by, from_setting
from relay.settings.load import CONFIG_FILE_ENV, load_settings
from relay.settings.spec import SettingSpec
from relay.settings.table import DEFAULTS, SPECS, SPECS_BY_NAME, Settings
from relay.settings.values import AircallToken, Secret, SettingsError

__all__ = [
    "CONFIG_FILE_ENV",
    "DEFAULTS",
    "SPECS",
    "SPECS_BY_NAME",
    "AircallToken",
    "Secret",
    "SettingSpec",
    "Settings",
    "SettingsError",
    "configure",
    "fed_by",
    "from_setting",
    "load_settings",
]
