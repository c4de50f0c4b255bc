"""Settings: read once from `RELAY_*` environment variables and an optional TOML file, validated,
frozen.

Every setting is declared once in `SPECS` (name, parser, default, help, secret or not); the
frozen `Settings` object, `docs/configuration.md` (checked by a test) and the error messages all
come from that table. Environment variables override the TOML file. An unknown `RELAY_*`
variable or TOML key is an error, so that a typo never silently falls back to a default.
Secrets are held in `Secret`, whose repr and str never show the value.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote, urlsplit

from relay.aircall import KNOWN_EVENTS, SEGMENT_CATALOGUE_EVENTS
from relay.segment import MappingOptions, parse_path

ENV_PREFIX: Final[str] = "RELAY_"
CONFIG_FILE_ENV: Final[str] = "RELAY_CONFIG_FILE"
DEFAULT_DATABASE_URL: Final[str] = "sqlite+aiosqlite:///data/outbox.sqlite3"
DEFAULT_SEGMENT_BASE_URL: Final[str] = "https://api.segment.io"
SEGMENT_REGIONS: Final[dict[str, str]] = {
    "us": "https://api.segment.io",
    "eu": "https://events.eu1.segmentapis.com",
}
MIN_TOKEN_CHARS: Final[int] = 16
# The shortest secret accepted. The log redactor replaces each secret wherever it appears in a
# line: a secret of a few characters would blank those characters in every word that holds them
# (`drain[redacted]r_started`). Segment's write keys and Aircall's tokens are 32 characters.
MIN_SECRET_CHARS: Final[int] = 8


class SettingsError(ValueError):
    """A setting is missing or wrong; the message names the setting and never shows a secret."""


class Secret:
    """A secret value (Aircall token, Segment write key) that never prints itself."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


@dataclass(frozen=True, slots=True)
class AircallToken:
    """One Aircall webhook's token with the label stored on its rows (the token never is)."""

    label: str
    token: Secret


@dataclass(frozen=True, slots=True)
class SettingSpec:
    name: str
    parse: Callable[[Any, str], Any]
    default: Any
    help: str
    secret: bool = False
    group: str = "receiver"

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


# ---------------------------------------------------------------------------------------------
# Parsers: each takes the raw value (a string from the environment, or a TOML value) and the
# setting's name for messages, and returns the typed value or raises SettingsError.


def _text(raw: Any, where: str) -> str:
    if isinstance(raw, str):
        return raw.strip()
    raise SettingsError(f"{where}: expected a string")


def _integer(minimum: int, maximum: int | None = None) -> Callable[[Any, str], int]:
    def parse(raw: Any, where: str) -> int:
        if isinstance(raw, bool):
            raise SettingsError(f"{where}: expected an integer, got a boolean")
        if isinstance(raw, int):
            value = raw
        else:
            text = _text(raw, where).replace("_", "")
            if not re.fullmatch(r"-?\d+", text):
                raise SettingsError(f"{where}: expected an integer, got {text!r}")
            value = int(text)
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f"at least {minimum}" if maximum is None else f"from {minimum} to {maximum}"
            raise SettingsError(f"{where}: must be {bounds}, got {value}")
        return value

    return parse


def _number(minimum: float, maximum: float | None = None) -> Callable[[Any, str], float]:
    def parse(raw: Any, where: str) -> float:
        if isinstance(raw, bool):
            raise SettingsError(f"{where}: expected a number, got a boolean")
        if isinstance(raw, int | float):
            value = float(raw)
        else:
            text = _text(raw, where)
            try:
                value = float(text)
            except ValueError:
                raise SettingsError(f"{where}: expected a number, got {text!r}") from None
        if not value >= minimum or (maximum is not None and value > maximum):
            bounds = (
                f"at least {minimum:g}" if maximum is None else f"from {minimum:g} to {maximum:g}"
            )
            raise SettingsError(f"{where}: must be {bounds}, got {value:g}")
        return value

    return parse


def _boolean(raw: Any, where: str) -> bool:
    if isinstance(raw, bool):
        return raw
    text = _text(raw, where).lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{where}: expected true or false, got {text!r}")


def _choice(*choices: str) -> Callable[[Any, str], str]:
    def parse(raw: Any, where: str) -> str:
        text = _text(raw, where).lower()
        if text not in choices:
            raise SettingsError(f"{where}: expected one of {', '.join(choices)}, got {text!r}")
        return text

    return parse


def _optional_path(raw: Any, where: str) -> str | None:
    text = _text(raw, where)
    return text or None


def _items(raw: Any, where: str) -> list[str]:
    """A list from a TOML array, or from a comma-separated string."""
    if isinstance(raw, list):
        if not all(isinstance(item, str) for item in raw):
            raise SettingsError(f"{where}: expected a list of strings")
        return [item.strip() for item in raw if item.strip()]
    return [item.strip() for item in _text(raw, where).split(",") if item.strip()]


def normalise_database_url(url: str) -> str:
    """Pick the async driver for a plain URL: sqlite -> aiosqlite, postgresql -> asyncpg."""
    for plain, driver in (
        ("sqlite://", "sqlite+aiosqlite://"),
        ("postgresql://", "postgresql+asyncpg://"),
        ("postgres://", "postgresql+asyncpg://"),
    ):
        if url.startswith(plain):
            return driver + url[len(plain) :]
    return url


def _database_url(raw: Any, where: str) -> str:
    text = _text(raw, where)
    url = normalise_database_url(text)
    if not url.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
        scheme = url.split("://", 1)[0] if "://" in url else "(none)"
        raise SettingsError(
            f"{where}: expected a sqlite:/// or postgresql:// URL, got scheme {scheme!r}"
        )
    if url.startswith("sqlite"):
        # A SQLite URL has no host: `sqlite://outbox.db` would name a host and no file.
        parts = urlsplit(url)
        if parts.netloc:
            raise SettingsError(
                f"{where}: {text!r} names no file: write sqlite:///outbox.db (three slashes, "
                "relative to the working directory) or sqlite:////var/lib/outbox.db (absolute)"
            )
        if parts.path in {"", "/", "/:memory:"}:
            raise SettingsError(
                f"{where}: an in-memory SQLite database would lose every event; name a file, "
                "like sqlite:///data/outbox.sqlite3"
            )
    return url


_LABEL = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _tokens(raw: Any, where: str) -> tuple[AircallToken, ...]:
    entries = _items(raw, where)
    result: list[AircallToken] = []
    for position, entry in enumerate(entries, start=1):
        label, separator, token = entry.partition(":")
        if not separator:
            label, token = "default", entry
        label, token = label.strip(), token.strip()
        if not _LABEL.fullmatch(label):
            raise SettingsError(
                f"{where}: entry {position} has an invalid label (letters, digits, '_', '.', '-';"
                " at most 64)"
            )
        if len(token) < MIN_TOKEN_CHARS or any(character.isspace() for character in token):
            raise SettingsError(
                f"{where}: entry {position} (label {label!r}) has a token shorter than "
                f"{MIN_TOKEN_CHARS} characters or containing spaces"
            )
        if any(existing.label == label for existing in result):
            raise SettingsError(f"{where}: label {label!r} is used twice")
        if any(existing.token.reveal() == token for existing in result):
            raise SettingsError(f"{where}: entry {position} (label {label!r}) repeats a token")
        result.append(AircallToken(label=label, token=Secret(token)))
    return tuple(result)


_EVENT_NAME = re.compile(r"[a-z0-9_]+(\.[a-z0-9_]+)+")


def _forward_events(raw: Any, where: str) -> frozenset[str] | None:
    """None forwards every event ('*'); an empty set forwards none ('' or 'null')."""
    if raw is None:
        return frozenset()
    if isinstance(raw, str) and raw.strip().lower() in {"", "null", "none"}:
        return frozenset()
    items = _items(raw, where)
    if items == ["*"]:
        return None
    for item in items:
        if not _EVENT_NAME.fullmatch(item):
            raise SettingsError(f"{where}: {item!r} is not an Aircall event name like call.created")
    return frozenset(items)


def _webhook_path(raw: Any, where: str) -> str:
    path = _text(raw, where)
    if not re.fullmatch(r"/[A-Za-z0-9_./-]*", path) or path in {"/healthz", "/readyz", "/metrics"}:
        raise SettingsError(f"{where}: expected a URL path like /aircall/webhook, got {path!r}")
    return path


def _secret(minimum: int) -> Callable[[Any, str], Secret | None]:
    """A secret of at least `minimum` characters, or None when empty; the message never shows
    the value."""

    def parse(raw: Any, where: str) -> Secret | None:
        text = _text(raw, where)
        if not text:
            return None
        if len(text) < minimum:
            raise SettingsError(f"{where}: must be at least {minimum} characters")
        return Secret(text)

    return parse


def _base_url(raw: Any, where: str) -> str:
    text = _text(raw, where)
    text = SEGMENT_REGIONS.get(text.lower(), text)
    if not re.fullmatch(r"https?://[^\s/]+(/[^\s]*)?", text):
        raise SettingsError(f"{where}: expected 'us', 'eu' or an http(s) URL, got {text!r}")
    return text.rstrip("/")


def _paths(raw: Any, where: str) -> tuple[str, ...]:
    return tuple(_items(raw, where))


def _listen_host(raw: Any, where: str) -> str:
    host = _text(raw, where)
    if not host or any(character.isspace() for character in host):
        raise SettingsError(f"{where}: expected an address to listen on, like 127.0.0.1")
    return host


def _port_or_off(raw: Any, where: str) -> int | None:
    """A TCP port (0: any free one), or `off` (also an empty value) for none."""
    if isinstance(raw, str) and raw.strip().lower() in {"", "off"}:
        return None
    try:
        return _integer(0, 65535)(raw, where)
    except SettingsError as error:
        raise SettingsError(f"{error} (or `off` for none)") from None


# ---------------------------------------------------------------------------------------------

SPECS: Final[tuple[SettingSpec, ...]] = (
    SettingSpec(
        "database_url",
        _database_url,
        DEFAULT_DATABASE_URL,
        "SQLAlchemy URL of the outbox database. `sqlite:///path` (relative to the working "
        "directory; `sqlite:////abs/path` for an absolute one) or `postgresql://user@host/db`; "
        "the async driver (aiosqlite, asyncpg) is chosen for you.",
        group="database",
    ),
    SettingSpec(
        "database_timeout_seconds",
        _number(0.1, 30.0),
        2.0,
        "How long a statement waits for a locked SQLite database or a PostgreSQL connection "
        "before the receiver answers 503 (Aircall gives up after 5 s and retries later).",
        group="database",
    ),
    SettingSpec(
        "aircall_tokens",
        _tokens,
        (),
        "The tokens of the Aircall webhooks allowed to post, as `label:token` pairs separated "
        "by commas (a bare token gets the label `default`). The label is stored on each row; "
        "the token never is. Required by `serve` and `run`.",
        secret=True,
    ),
    SettingSpec(
        "forward_events",
        _forward_events,
        frozenset(SEGMENT_CATALOGUE_EVENTS),
        "Aircall events forwarded to Segment, separated by commas. Default: the 26 events of "
        "Segment's Aircall catalogue. `*` forwards every event; an empty value or `null` "
        "forwards none. Other events are stored as `skipped` and still answered 200.",
    ),
    SettingSpec(
        "max_body_bytes",
        _integer(1024, 16 * 1024 * 1024),
        256 * 1024,
        "Largest webhook body accepted; a larger one is answered 413 and not stored.",
    ),
    SettingSpec(
        "webhook_path",
        _webhook_path,
        "/aircall/webhook",
        "URL path Aircall posts to.",
    ),
    SettingSpec("host", _text, "127.0.0.1", "Address `serve` listens on.", group="server"),
    SettingSpec("port", _integer(0, 65535), 8080, "Port `serve` listens on.", group="server"),
    SettingSpec(
        "workers",
        _integer(1, 64),
        1,
        "Receiver processes (Hypercorn workers). Each batches its own commits.",
        group="server",
    ),
    SettingSpec(
        "receiver_metrics_host",
        _listen_host,
        "127.0.0.1",
        "Address the receiver serves its Prometheus `/metrics` on, apart from the webhooks.",
        group="server",
    ),
    SettingSpec(
        "receiver_metrics_port",
        _port_or_off,
        9102,
        "Port of the receiver's `/metrics` (plain HTTP, never the webhook port); `off` for "
        "none, 0 for any free one. `run` shows the drainer's metrics there too.",
        group="server",
    ),
    SettingSpec(
        "tls_certfile",
        _optional_path,
        None,
        "PEM certificate chain: when set (with the key), `serve` speaks HTTPS itself.",
        group="server",
    ),
    SettingSpec(
        "tls_keyfile",
        _optional_path,
        None,
        "PEM private key for `tls_certfile`.",
        group="server",
    ),
    SettingSpec(
        "shutdown_grace_seconds",
        _number(0.0, 600.0),
        10.0,
        "On SIGTERM, how long in-flight work may take to finish before the process exits.",
        group="server",
    ),
    SettingSpec(
        "log_format",
        _choice("auto", "json", "console"),
        "auto",
        "`json` lines (for journald), `console` (readable), or `auto`: console on a terminal, "
        "JSON otherwise.",
        group="logging",
    ),
    SettingSpec(
        "log_level",
        _choice("debug", "info", "warning", "error"),
        "info",
        "Lowest level logged.",
        group="logging",
    ),
    SettingSpec(
        "segment_write_key",
        _secret(MIN_SECRET_CHARS),
        None,
        "Write key of the Segment HTTP API source. Without it the drainer keeps every event "
        "in the outbox and says that delivery is paused.",
        secret=True,
        group="segment",
    ),
    SettingSpec(
        "segment_base_url",
        _base_url,
        DEFAULT_SEGMENT_BASE_URL,
        "Segment endpoint: `us` (https://api.segment.io), `eu` "
        "(https://events.eu1.segmentapis.com) or any base URL; `/v1/batch` is appended.",
        group="segment",
    ),
    SettingSpec(
        "segment_batch_size",
        _integer(1, 2500),
        100,
        "Most events in one request to Segment (Segment accepts 2,500; bodies also stay under "
        "475,000 bytes).",
        group="segment",
    ),
    SettingSpec(
        "segment_events_per_second",
        _number(0.0),
        500.0,
        "Events sent to Segment per second, for the whole deployment (all drainers together, "
        "through a budget in the database); 0 for no limit. Segment asks for at most 1,000 per "
        "second per workspace.",
        group="segment",
    ),
    SettingSpec(
        "segment_requests_per_second",
        _number(0.0),
        20.0,
        "Requests sent to Segment per second, for the whole deployment (all drainers "
        "together); 0 for no limit.",
        group="segment",
    ),
    SettingSpec(
        "segment_concurrency",
        _integer(1, 64),
        4,
        "Requests to Segment in flight at once (each holds different ordering keys).",
        group="segment",
    ),
    SettingSpec(
        "segment_timeout_seconds",
        _number(1.0, 300.0),
        30.0,
        "Time limit of one request to Segment (connect, send, answer); past it the request is "
        "retried with the same messageIds.",
        group="segment",
    ),
    SettingSpec(
        "segment_max_retry_after_seconds",
        _number(1.0, 3600.0),
        300.0,
        "Cap on the wait a 429 asks for (Retry-After / X-RateLimit-Reset).",
        group="segment",
    ),
    SettingSpec(
        "retry_base_seconds",
        _number(0.01, 3600.0),
        1.0,
        "First retry delay after a transient failure (5xx, timeout, connection error); it "
        "doubles with each attempt, with full jitter.",
        group="drainer",
    ),
    SettingSpec(
        "retry_cap_seconds",
        _number(0.01, 86400.0),
        600.0,
        "Longest retry delay.",
        group="drainer",
    ),
    SettingSpec(
        "max_attempts",
        _integer(0),
        0,
        "Failed deliveries (5xx, timeout, connection error) after which an event goes `dead`; "
        "a 429 or a configuration pause does not count. 0 (the default) never gives up, so "
        "nothing transient kills an event.",
        group="drainer",
    ),
    SettingSpec(
        "settle_seconds",
        _number(0.0, 3600.0),
        5.0,
        "An event is delivered no sooner than this after its receipt, so that webhooks of one "
        "call arriving out of order within it are sorted first.",
        group="drainer",
    ),
    SettingSpec(
        "lease_seconds",
        _number(1.0, 3600.0),
        60.0,
        "How long a drainer's claim on rows lasts without renewal (renewed while in flight); a "
        "crashed drainer's rows are claimed again when it expires.",
        group="drainer",
    ),
    SettingSpec(
        "poll_seconds",
        _number(0.01, 60.0),
        0.25,
        "How often an idle drainer looks for deliverable rows.",
        group="drainer",
    ),
    SettingSpec(
        "listen_poll_seconds",
        _number(0.01, 600.0),
        5.0,
        "On PostgreSQL, how often an idle drainer looks for deliverable rows while it listens "
        "for the receivers' notifications (which wake it for new rows); `poll_seconds` applies "
        "on SQLite and while the listener reconnects.",
        group="drainer",
    ),
    SettingSpec(
        "call_ended_timeout_seconds",
        _number(1.0, 86400.0),
        600.0,
        "A call whose call.hungup is older than this with no call.ended is reported (log, "
        "metric, view) as a webhook to chase.",
        group="drainer",
    ),
    SettingSpec(
        "drainer_metrics_host",
        _listen_host,
        "127.0.0.1",
        "Address the drainer serves its Prometheus `/metrics` on.",
        group="drainer",
    ),
    SettingSpec(
        "drainer_metrics_port",
        _port_or_off,
        9101,
        "Port of the drainer's `/metrics`; `off` for none, 0 for any free one. Not used by "
        "`run`, whose receiver `/metrics` shows the drainer's metrics too.",
        group="drainer",
    ),
    SettingSpec(
        "retention_delivered_days",
        _number(0.0, 36500.0),
        0.0,
        "Delivered rows are deleted this many days after delivery (with their old request "
        "records); 0 keeps them forever.",
        group="retention",
    ),
    SettingSpec(
        "retention_skipped_days",
        _number(0.0, 36500.0),
        0.0,
        "Skipped rows (never forwarded) are deleted this many days after receipt; 0 keeps them.",
        group="retention",
    ),
    SettingSpec(
        "retention_dead_days",
        _number(0.0, 36500.0),
        0.0,
        "Dead rows are deleted this many days after receipt; 0 (the default) keeps them, so "
        "that every failure stays on record until someone looks at it.",
        group="retention",
    ),
    SettingSpec(
        "pii_drop_paths",
        _paths,
        (),
        "Paths into Aircall's `data` removed before sending (the outbox keeps them), separated "
        "by commas: `raw_digits`, `contact.phone_numbers[].value`, `**.email`. "
        "See docs/mapping.md.",
        group="segment",
    ),
    SettingSpec(
        "pii_hash_paths",
        _paths,
        (),
        "Paths into Aircall's `data` whose values are replaced by a keyed hash before sending. "
        "Needs `pii_hash_key`.",
        group="segment",
    ),
    SettingSpec(
        "pii_hash_key",
        _secret(16),
        None,
        "Secret key of the HMAC-SHA256 used for `pii_hash_paths`; keep it stable, or the same "
        "phone number hashes differently after a change.",
        secret=True,
        group="segment",
    ),
)

SPECS_BY_NAME: Final[dict[str, SettingSpec]] = {spec.name: spec for spec in SPECS}


@dataclass(frozen=True, slots=True)
class Settings:
    """The relay's configuration, read once. Build it with `load_settings`."""

    database_url: str = DEFAULT_DATABASE_URL
    database_timeout_seconds: float = 2.0
    aircall_tokens: tuple[AircallToken, ...] = ()
    forward_events: frozenset[str] | None = frozenset(SEGMENT_CATALOGUE_EVENTS)
    max_body_bytes: int = 256 * 1024
    webhook_path: str = "/aircall/webhook"
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    receiver_metrics_host: str = "127.0.0.1"
    receiver_metrics_port: int | None = 9102
    tls_certfile: str | None = None
    tls_keyfile: str | None = None
    shutdown_grace_seconds: float = 10.0
    log_format: str = "auto"
    log_level: str = "info"
    segment_write_key: Secret | None = None
    segment_base_url: str = DEFAULT_SEGMENT_BASE_URL
    segment_batch_size: int = 100
    segment_events_per_second: float = 500.0
    segment_requests_per_second: float = 20.0
    segment_concurrency: int = 4
    segment_timeout_seconds: float = 30.0
    segment_max_retry_after_seconds: float = 300.0
    retry_base_seconds: float = 1.0
    retry_cap_seconds: float = 600.0
    max_attempts: int = 0
    settle_seconds: float = 5.0
    lease_seconds: float = 60.0
    poll_seconds: float = 0.25
    listen_poll_seconds: float = 5.0
    call_ended_timeout_seconds: float = 600.0
    drainer_metrics_host: str = "127.0.0.1"
    drainer_metrics_port: int | None = 9101
    retention_delivered_days: float = 0.0
    retention_skipped_days: float = 0.0
    retention_dead_days: float = 0.0
    pii_drop_paths: tuple[str, ...] = ()
    pii_hash_paths: tuple[str, ...] = ()
    pii_hash_key: Secret | None = None
    config_file: str | None = field(default=None, compare=False)

    def forwards(self, event: str) -> bool:
        return self.forward_events is None or event in self.forward_events

    def secrets(self) -> list[str]:
        """Every secret value, for the log redactor."""
        values = [token.token.reveal() for token in self.aircall_tokens]
        for secret in (self.segment_write_key, self.pii_hash_key):
            if secret is not None:
                values.append(secret.reveal())
        # The database password too: a driver's error may quote the URL it was given. Values
        # are redacted wherever they appear, so a password of under 8 characters (a word like
        # `relay`) is left out rather than blanking that word in every log line.
        database_password = unquote(urlsplit(self.database_url).password or "")
        if len(database_password) >= 8:
            values.append(database_password)
        return values

    def unknown_forward_events(self) -> list[str]:
        """Forwarded names Aircall is not known to send: likely typos, warned about at start."""
        if self.forward_events is None:
            return []
        return sorted(event for event in self.forward_events if event not in KNOWN_EVENTS)

    def mapping_options(self) -> MappingOptions:
        """How the drainer maps events, from the PII settings (validated at load)."""
        return MappingOptions(
            drop_paths=self.pii_drop_paths,
            hash_paths=self.pii_hash_paths,
            hash_key=None if self.pii_hash_key is None else self.pii_hash_key.reveal().encode(),
        )

    def require_tokens(self) -> None:
        if not self.aircall_tokens:
            raise SettingsError(
                "RELAY_AIRCALL_TOKENS: no Aircall token configured, so every webhook would be "
                "refused with 401; set it to label:token pairs"
            )

    def require_write_key(self) -> None:
        if self.segment_write_key is None:
            raise SettingsError(
                "RELAY_SEGMENT_WRITE_KEY: not set, so nothing could be delivered; set it to the "
                "write key of your Segment HTTP API source"
            )

    def check_tls(self) -> None:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise SettingsError(
                "RELAY_TLS_CERTFILE and RELAY_TLS_KEYFILE: set both to serve HTTPS, or neither"
            )
        for name, path in (
            ("RELAY_TLS_CERTFILE", self.tls_certfile),
            ("RELAY_TLS_KEYFILE", self.tls_keyfile),
        ):
            if path is not None and not Path(path).is_file():
                raise SettingsError(f"{name}: no readable file at {path}")

    def with_overrides(self, **values: Any) -> Settings:
        """A copy with some settings replaced (command-line options), validated the same way."""
        known = {f.name for f in fields(self)}
        parsed: dict[str, Any] = {}
        for name, value in values.items():
            if name not in known:
                raise SettingsError(f"unknown setting {name!r}")
            if value is None:
                continue
            spec = SPECS_BY_NAME.get(name)
            parsed[name] = (
                spec.parse(value, f"--{name.replace('_', '-')}")
                if spec and isinstance(value, str)
                else value
            )
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.update(parsed)
        return Settings(**data)


def load_settings(
    environ: Mapping[str, str] | None = None, config_file: str | None = None
) -> Settings:
    """Read the TOML file (if any), then the environment over it, and validate everything.

    The file is `config_file`, else `$RELAY_CONFIG_FILE`. Its keys are the setting names in
    lower case (`database_url = "..."`), at the top level or under a `[relay]` table.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {spec.name: spec.default for spec in SPECS}
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
    for name, paths in (
        ("RELAY_PII_DROP_PATHS", settings.pii_drop_paths),
        ("RELAY_PII_HASH_PATHS", settings.pii_hash_paths),
    ):
        for path in paths:
            try:
                parse_path(path)
            except ValueError as error:
                raise SettingsError(f"{name}: {error}") from None
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
