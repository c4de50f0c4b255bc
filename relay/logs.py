"""Logging: structlog set-up (JSON lines for journald, readable lines on a terminal) and the
redaction of secrets.

Redaction is by key (`token`, `write_key`, `authorization`, ... are replaced) and by value: every
configured secret is replaced wherever it appears inside any logged string, so a token that slips
into an exception message is still not written.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any, Final, TextIO

import orjson
import structlog

REDACTED: Final[str] = "[redacted]"
SECRET_KEYS: Final[frozenset[str]] = frozenset(
    {"token", "tokens", "write_key", "writekey", "authorization", "password", "secret", "payload"}
)


class Redactor:
    """A structlog processor that removes secrets by key name and by value."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets = sorted({secret for secret in secrets if secret}, key=len, reverse=True)

    def _scrub(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in self._secrets:
                if secret in value:
                    value = value.replace(secret, REDACTED)
            return value
        if isinstance(value, dict):
            return {
                key: REDACTED if str(key).lower() in SECRET_KEYS else self._scrub(item)
                for key, item in value.items()
            }
        if isinstance(value, list | tuple):
            return [self._scrub(item) for item in value]
        return value

    def __call__(
        self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        # Once per logged field, one per webhook line: numbers, booleans and None hold no
        # secret, and a string with none of them is kept as it is (docs/performance.md).
        secrets = self._secrets
        for key, value in event_dict.items():  # values replaced, no key added or removed
            if key.lower() in SECRET_KEYS:
                event_dict[key] = REDACTED
            elif type(value) is str:
                for secret in secrets:
                    if secret in value:
                        event_dict[key] = self._scrub(value)
                        break
            elif type(value) not in _PLAIN:
                event_dict[key] = self._scrub(value)
        return event_dict


_PLAIN: Final = frozenset({int, float, bool, type(None)})


def _json_line(value: Any, **options: Any) -> str:
    """One log line's JSON: orjson (faster than the standard encoder: docs/performance.md),
    compact, UTF-8 as is; what orjson refuses (an integer beyond 64 bits, a lone surrogate) the
    standard library writes, with the same fallback for objects JSON has no type for."""
    try:
        return orjson.dumps(value, default=options.get("default")).decode("utf-8")
    except TypeError:
        return json.dumps(value, **options)


def configure_logging(
    log_format: str,
    level: str,
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> None:
    """Set up structlog (and route the standard library's logging through the same output)."""
    stream = stream or sys.stdout
    console = log_format == "console" or (log_format == "auto" and stream.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
        if console
        else structlog.processors.JSONRenderer(_json_line, sort_keys=False)
    )
    redactor = Redactor(secrets)
    numeric_level = getattr(logging, level.upper(), logging.INFO)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redactor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # Libraries (hypercorn, alembic, asyncio) log through the standard library: give them the
    # same redaction and output, at warning level so their chatter stays out of the way. A
    # record's traceback is turned into text before the redactor runs, so that a secret in an
    # exception's message is redacted there too.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                redactor,
                renderer,
            ],
            foreign_pre_chain=[
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.stdlib.add_logger_name,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric_level, logging.WARNING))


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
