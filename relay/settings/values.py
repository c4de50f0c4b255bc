"""The values a setting can hold, and their parsers.

Each parser takes the raw value (a string from the environment, or a TOML value) and where it
came from (`RELAY_PORT`, `relay.toml: port`, `--port`) for its messages, and returns the typed
value or raises SettingsError. A message names the setting and never shows a secret. Secrets are
held in `Secret`, whose repr and str never show the value.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

from relay.database_url import normalise_database_url
from relay.pii import parse_path

T = TypeVar("T")
Parser = Callable[[Any, str], T]

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


def string(raw: Any, where: str) -> str:
    if isinstance(raw, str):
        return raw.strip()
    raise SettingsError(f"{where}: expected a string")


def integer(minimum: int, maximum: int | None = None) -> Parser[int]:
    def parse(raw: Any, where: str) -> int:
        if isinstance(raw, bool):
            raise SettingsError(f"{where}: expected an integer, got a boolean")
        if isinstance(raw, int):
            value = raw
        else:
            text = string(raw, where).replace("_", "")
            if not re.fullmatch(r"-?\d+", text):
                raise SettingsError(f"{where}: expected an integer, got {text!r}")
            value = int(text)
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f"at least {minimum}" if maximum is None else f"from {minimum} to {maximum}"
            raise SettingsError(f"{where}: must be {bounds}, got {value}")
        return value

    return parse


def number(minimum: float, maximum: float | None = None) -> Parser[float]:
    def parse(raw: Any, where: str) -> float:
        if isinstance(raw, bool):
            raise SettingsError(f"{where}: expected a number, got a boolean")
        if isinstance(raw, int | float):
            value = float(raw)
        else:
            text = string(raw, where)
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


def choice(*choices: str) -> Parser[str]:
    def parse(raw: Any, where: str) -> str:
        text = string(raw, where).lower()
        if text not in choices:
            raise SettingsError(f"{where}: expected one of {', '.join(choices)}, got {text!r}")
        return text

    return parse


def optional_path(raw: Any, where: str) -> str | None:
    text = string(raw, where)
    return text or None


def _items(raw: Any, where: str) -> list[str]:
    """A list from a TOML array, or from a comma-separated string."""
    if isinstance(raw, list):
        if not all(isinstance(item, str) for item in raw):
            raise SettingsError(f"{where}: expected a list of strings")
        return [item.strip() for item in raw if item.strip()]
    return [item.strip() for item in string(raw, where).split(",") if item.strip()]


def database_url(raw: Any, where: str) -> str:
    text = string(raw, where)
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


def tokens(raw: Any, where: str) -> tuple[AircallToken, ...]:
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


def forward_events(raw: Any, where: str) -> frozenset[str] | None:
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


def webhook_path(raw: Any, where: str) -> str:
    path = string(raw, where)
    if not re.fullmatch(r"/[A-Za-z0-9_./-]*", path) or path in {"/healthz", "/readyz", "/metrics"}:
        raise SettingsError(f"{where}: expected a URL path like /aircall/webhook, got {path!r}")
    return path


def secret(minimum: int) -> Parser[Secret | None]:
    """A secret of at least `minimum` characters, or None when empty; the message never shows
    the value."""

    def parse(raw: Any, where: str) -> Secret | None:
        text = string(raw, where)
        if not text:
            return None
        if len(text) < minimum:
            raise SettingsError(f"{where}: must be at least {minimum} characters")
        return Secret(text)

    return parse


def base_url(raw: Any, where: str) -> str:
    """Segment's endpoint: `us`, `eu` or any http(s) URL."""
    text = string(raw, where)
    text = SEGMENT_REGIONS.get(text.lower(), text)
    if not re.fullmatch(r"https?://[^\s/]+(/[^\s]*)?", text):
        raise SettingsError(f"{where}: expected 'us', 'eu' or an http(s) URL, got {text!r}")
    return text.rstrip("/")


def http_url(raw: Any, where: str) -> str:
    """An http(s) base URL, without its trailing slash."""
    text = string(raw, where)
    if not re.fullmatch(r"https?://[^\s/@]+(/[^\s]*)?", text):
        raise SettingsError(
            f"{where}: expected an http(s) URL without credentials, like https://api.aircall.io"
        )
    return text.rstrip("/")


def optional_text(raw: Any, where: str) -> str | None:
    """A value without spaces, or None when empty."""
    text = string(raw, where)
    if any(character.isspace() for character in text):
        raise SettingsError(f"{where}: must not contain spaces")
    return text or None


def seconds_or_off(minimum: float, maximum: float) -> Parser[float]:
    """A period in seconds from `minimum` to `maximum`, or 0 for off."""
    bounded = number(minimum, maximum)

    def parse(raw: Any, where: str) -> float:
        value = number(0.0, maximum)(raw, where)
        if value == 0:
            return 0.0
        try:
            return bounded(raw, where)
        except SettingsError as error:
            raise SettingsError(f"{error} (or 0 for off)") from None

    return parse


def data_paths(raw: Any, where: str) -> tuple[str, ...]:
    """Paths into Aircall's `data` (relay/pii.py's syntax), each checked."""
    result = tuple(_items(raw, where))
    for path in result:
        try:
            parse_path(path)
        except ValueError as error:
            raise SettingsError(f"{where}: {error}") from None
    return result


def listen_host(raw: Any, where: str) -> str:
    host = string(raw, where)
    if not host or any(character.isspace() for character in host):
        raise SettingsError(f"{where}: expected an address to listen on, like 127.0.0.1")
    return host


def port_or_off(raw: Any, where: str) -> int | None:
    """A TCP port (0: any free one), or `off` (also an empty value) for none."""
    if isinstance(raw, str) and raw.strip().lower() in {"", "off"}:
        return None
    try:
        return integer(0, 65535)(raw, where)
    except SettingsError as error:
        raise SettingsError(f"{error} (or `off` for none)") from None
