"""Settings: environment, TOML, validation messages that name the setting and hide secrets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from relay.aircall import SEGMENT_CATALOGUE_EVENTS
from relay.settings import SPECS, Secret, Settings, SettingsError, load_settings
from tests.support import ROOT

TOKEN = "0123456789abcdef0123456789abcdef"


def test_defaults() -> None:
    settings = load_settings({})
    assert settings.database_url == "sqlite+aiosqlite:///data/outbox.sqlite3"
    assert settings.forward_events == frozenset(SEGMENT_CATALOGUE_EVENTS)
    assert settings.max_body_bytes == 256 * 1024
    assert settings.webhook_path == "/aircall/webhook"
    assert settings.aircall_tokens == ()
    assert settings == Settings()


def test_tokens_with_labels_and_a_bare_token() -> None:
    settings = load_settings({"RELAY_AIRCALL_TOKENS": f"eu:{TOKEN}, {TOKEN[::-1]}"})
    assert [token.label for token in settings.aircall_tokens] == ["eu", "default"]
    assert settings.aircall_tokens[0].token.reveal() == TOKEN
    assert TOKEN not in repr(settings)
    assert TOKEN not in str(settings.aircall_tokens)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("main:zq9", "shorter than 16"),
        (f"a b:{TOKEN}", "invalid label"),
        (f"x:{TOKEN},x:{TOKEN[::-1]}", "used twice"),
        (f"x:{TOKEN},y:{TOKEN}", "repeats a token"),
    ],
)
def test_bad_tokens_are_refused_without_showing_them(value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message) as caught:
        load_settings({"RELAY_AIRCALL_TOKENS": value})
    assert "RELAY_AIRCALL_TOKENS" in str(caught.value)
    assert TOKEN not in str(caught.value)
    assert TOKEN[::-1] not in str(caught.value)
    assert "zq9" not in str(caught.value)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", frozenset()),
        ("null", frozenset()),
        ("*", None),
        ("call.created, call.hold", frozenset({"call.created", "call.hold"})),
    ],
)
def test_forward_events(raw: str, expected: frozenset[str] | None) -> None:
    settings = load_settings({"RELAY_FORWARD_EVENTS": raw})
    assert settings.forward_events == expected
    assert settings.forwards("call.created") == (expected is None or "call.created" in expected)


def test_forward_events_names_are_checked_and_unknown_ones_reported() -> None:
    with pytest.raises(SettingsError, match="RELAY_FORWARD_EVENTS"):
        load_settings({"RELAY_FORWARD_EVENTS": "Call Created"})
    settings = load_settings({"RELAY_FORWARD_EVENTS": "call.created,call.endded"})
    assert settings.unknown_forward_events() == ["call.endded"]


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("RELAY_MAX_BODY_BYTES", "lots", "expected an integer"),
        ("RELAY_MAX_BODY_BYTES", "10", "must be from 1024"),
        ("RELAY_PORT", "70000", "must be from 0 to 65535"),
        ("RELAY_DATABASE_URL", "mysql://x/y", "expected a sqlite"),
        ("RELAY_LOG_FORMAT", "xml", "expected one of"),
        ("RELAY_WEBHOOK_PATH", "no-slash", "expected a URL path"),
        ("RELAY_DATABASE_TIMEOUT_SECONDS", "-1", "must be from"),
        ("RELAY_SEGMENT_BASE_URL", "ftp://x", "expected 'us', 'eu'"),
        ("RELAY_NOT_A_SETTING", "1", "unknown setting"),
        ("RELAY_PII_DROP_PATHS", "a..b", "PII path 'a..b': step 2 is empty"),
    ],
)
def test_errors_name_the_setting(name: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message) as caught:
        load_settings({name: value})
    assert str(caught.value).startswith(name)


def test_database_url_drivers_are_chosen() -> None:
    assert load_settings({"RELAY_DATABASE_URL": "sqlite:////var/lib/x.db"}).database_url == (
        "sqlite+aiosqlite:////var/lib/x.db"
    )
    assert load_settings({"RELAY_DATABASE_URL": "postgresql://u@h/d"}).database_url == (
        "postgresql+asyncpg://u@h/d"
    )


def test_segment_region_shortcuts() -> None:
    assert load_settings({"RELAY_SEGMENT_BASE_URL": "eu"}).segment_base_url == (
        "https://events.eu1.segmentapis.com"
    )
    assert load_settings({"RELAY_SEGMENT_BASE_URL": "http://127.0.0.1:9/"}).segment_base_url == (
        "http://127.0.0.1:9"
    )


def test_write_key_is_a_secret() -> None:
    settings = load_settings({"RELAY_SEGMENT_WRITE_KEY": "wk-secret-value"})
    assert settings.segment_write_key == Secret("wk-secret-value")
    assert "wk-secret-value" not in repr(settings)
    assert "wk-secret-value" in settings.secrets()


def test_the_database_password_is_redacted_from_logs() -> None:
    url = "postgresql://relay:p%40ss-w0rd@db.internal/relay"
    assert "p@ss-w0rd" in load_settings({"RELAY_DATABASE_URL": url}).secrets()
    assert load_settings({"RELAY_DATABASE_URL": "sqlite:///data/outbox.sqlite3"}).secrets() == []
    short = load_settings({"RELAY_DATABASE_URL": "postgresql://relay:relay@db.internal/relay"})
    assert short.secrets() == []  # redacting "relay" would blank the word in every line


def test_toml_file_and_environment_precedence(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(
        '[relay]\nport = 9000\nforward_events = ["call.created"]\n'
        f'aircall_tokens = ["main:{TOKEN}"]\n'
    )
    settings = load_settings({"RELAY_PORT": "9100"}, config_file=str(path))
    assert settings.port == 9100
    assert settings.forward_events == frozenset({"call.created"})
    assert settings.aircall_tokens[0].label == "main"
    settings = load_settings({"RELAY_CONFIG_FILE": str(path)})
    assert settings.port == 9000


def test_toml_errors(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text("port = 'x'\n")
    with pytest.raises(SettingsError, match="port: expected an integer"):
        load_settings({}, config_file=str(path))
    path.write_text("prot = 1\n")
    with pytest.raises(SettingsError, match="unknown setting 'prot'"):
        load_settings({}, config_file=str(path))
    path.write_text("port = \n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings({}, config_file=str(path))
    with pytest.raises(SettingsError, match="no such file"):
        load_settings({}, config_file=str(tmp_path / "missing.toml"))


def test_hash_paths_need_a_key() -> None:
    with pytest.raises(SettingsError, match="RELAY_PII_HASH_KEY"):
        load_settings({"RELAY_PII_HASH_PATHS": "raw_digits"})


def test_tls_needs_both_files(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="set both"):
        Settings(tls_certfile=str(tmp_path / "c.pem")).check_tls()
    with pytest.raises(SettingsError, match="no readable file"):
        Settings(
            tls_certfile=str(tmp_path / "c.pem"), tls_keyfile=str(tmp_path / "k.pem")
        ).check_tls()


def test_every_setting_is_documented_and_every_documented_setting_exists() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    documented = set(re.findall(r"`(RELAY_[A-Z0-9_]+)`", text))
    declared = {spec.env for spec in SPECS} | {"RELAY_CONFIG_FILE"}
    assert declared - documented == set(), "settings missing from docs/configuration.md"
    assert documented - declared == set(), "docs/configuration.md names settings that do not exist"
    for spec in SPECS:
        assert spec.doc, spec.name
    fields = set(Settings.__dataclass_fields__) - {"config_file"}
    assert fields == {spec.name for spec in SPECS}


@pytest.mark.parametrize(
    ("raw", "expected"), [("9200", 9200), ("0", 0), ("off", None), ("OFF", None), ("", None)]
)
def test_drainer_metrics_port_is_a_port_or_off(raw: str, expected: int | None) -> None:
    assert load_settings({}).drainer_metrics_port == 9101
    assert load_settings({}).drainer_metrics_host == "127.0.0.1"
    assert load_settings({"RELAY_DRAINER_METRICS_PORT": raw}).drainer_metrics_port == expected


def test_drainer_metrics_port_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('drainer_metrics_port = 9300\ndrainer_metrics_host = "::1"\n')
    settings = load_settings({}, config_file=str(path))
    assert (settings.drainer_metrics_host, settings.drainer_metrics_port) == ("::1", 9300)
    path.write_text('drainer_metrics_port = "off"\n')
    assert load_settings({}, config_file=str(path)).drainer_metrics_port is None


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        ("RELAY_DRAINER_METRICS_PORT", "65536", "must be from 0 to 65535"),
        ("RELAY_DRAINER_METRICS_PORT", "no", "expected an integer"),
        ("RELAY_DRAINER_METRICS_HOST", " ", "expected an address"),
    ],
)
def test_bad_drainer_metrics_settings_name_the_setting(name: str, raw: str, message: str) -> None:
    with pytest.raises(SettingsError, match=f"{name}: {message}"):
        load_settings({name: raw})


@pytest.mark.parametrize(
    ("name", "value"), [("RELAY_SEGMENT_WRITE_KEY", "abc"), ("RELAY_PII_HASH_KEY", "k3y-0123456")]
)
def test_a_short_secret_is_refused_naming_the_setting_never_the_value(
    name: str, value: str
) -> None:
    """The redactor replaces a secret wherever it appears: a write key of a few characters
    would blank them inside every word of every log line (`drain[redacted]r_started`)."""
    with pytest.raises(SettingsError, match="at least") as caught:
        load_settings({name: value, "RELAY_PII_HASH_PATHS": "raw_digits"})
    assert str(caught.value).startswith(name)
    assert value not in str(caught.value)
    key = "wk_" + "x" * 5  # 8 characters: the shortest accepted
    assert load_settings({"RELAY_SEGMENT_WRITE_KEY": key}).segment_write_key == Secret(key)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite://relative.db", "'sqlite://relative.db' names no file: write sqlite:///"),
        ("sqlite://", "in-memory SQLite database would lose every event"),
        ("sqlite:///:memory:", "in-memory SQLite database would lose every event"),
    ],
)
def test_a_sqlite_url_without_a_file_is_a_configuration_error(url: str, message: str) -> None:
    """configuration.md promises exit 2 for a wrong value: `sqlite://relative.db` used to reach
    the database layer (an ArgumentError, exit 1)."""
    with pytest.raises(SettingsError, match=re.escape(message)) as caught:
        load_settings({"RELAY_DATABASE_URL": url})
    assert str(caught.value).startswith("RELAY_DATABASE_URL: ")


def test_the_aircall_api_settings() -> None:
    settings = load_settings(
        {
            "RELAY_AIRCALL_API_ID": "4f2c1d",
            "RELAY_AIRCALL_API_TOKEN": "api-token-secret-value",
            "RELAY_AIRCALL_API_URL": "http://127.0.0.1:9200/",
            "RELAY_AIRCALL_PROBE_SECONDS": "0",
        }
    )
    assert settings.require_aircall_api() == ("4f2c1d", "api-token-secret-value")
    assert settings.aircall_api_url == "http://127.0.0.1:9200"
    assert settings.aircall_probe_seconds == 0
    assert "api-token-secret-value" not in repr(settings)
    assert "api-token-secret-value" in settings.secrets()
    defaults = load_settings({})
    assert defaults.aircall_api_url == "https://api.aircall.io"
    assert defaults.aircall_probe_seconds == 300
    assert not defaults.aircall_api_configured()
    with pytest.raises(SettingsError, match="RELAY_AIRCALL_API_ID and RELAY_AIRCALL_API_TOKEN"):
        defaults.require_aircall_api()


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        ("RELAY_AIRCALL_PROBE_SECONDS", "10", r"from 30 to 86400, got 10 \(or 0 for off\)"),
        ("RELAY_AIRCALL_PROBE_SECONDS", "-1", "from 0 to 86400"),
        ("RELAY_AIRCALL_PROBE_SECONDS", "often", "expected a number"),
        ("RELAY_AIRCALL_API_URL", "api.aircall.io", "expected an http"),
        ("RELAY_AIRCALL_API_URL", "https://id:tok@api.aircall.io", "without credentials"),
        ("RELAY_AIRCALL_API_ID", "has space", "must not contain spaces"),
        ("RELAY_AIRCALL_API_TOKEN", "short", "at least 8 characters"),
    ],
)
def test_bad_aircall_api_settings_name_the_setting(name: str, raw: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message) as raised:
        load_settings({name: raw})
    assert str(raised.value).startswith(name)
    assert "tok@" not in str(raised.value)
