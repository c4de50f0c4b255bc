"""The settings table: every setting of the relay, declared once.

Each field of `Settings` is one setting: its type, default, parser, group and documentation.
Everything else comes from here: parsing (`relay/settings/load.py`), the error messages, the
`RELAY_*` names, the tables of docs/configuration.md (`python -m relay.settings.docs` writes
them, a test checks them), and the defaults of the components the settings feed
(`DrainerConfig`, `RetentionPolicy`: fields declared with `from_setting`, filled by `configure`).
To add or change a setting, edit its field here, then run `python -m relay.settings.docs`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote, urlsplit

from relay.aircall import KNOWN_EVENTS, SEGMENT_CATALOGUE_EVENTS
from relay.settings import values as parse
from relay.settings.spec import SettingSpec, setting, specs_of
from relay.settings.values import MIN_SECRET_CHARS, AircallToken, Secret, SettingsError


@dataclass(frozen=True, slots=True)
class Settings:
    """The relay's configuration, read once. Build it with `load_settings`."""

    # Database
    database_url: str = setting(
        "sqlite+aiosqlite:///data/outbox.sqlite3",
        parse.database_url,
        "SQLAlchemy URL of the outbox database. `sqlite:///relative/path` (relative to the "
        "working directory), `sqlite:////absolute/path`, or "
        "`postgresql://user:password@host:5432/database`. The async driver (aiosqlite, asyncpg) "
        "is chosen for you; `sqlite+aiosqlite://` and `postgresql+asyncpg://` are accepted as "
        "well. The SQLite file's folder is created if missing. `sqlite://outbox.db` (two "
        "slashes: a host name, no file) and in-memory databases (`sqlite://`, "
        "`sqlite:///:memory:`) are refused.",
        group="database",
        shown="`sqlite:///data/outbox.sqlite3`",
    )
    database_timeout_seconds: float = setting(
        2.0,
        parse.number(0.1, 30.0),
        "How long a write waits for a locked SQLite database (busy timeout), and a PostgreSQL "
        "connect, pool checkout or lock (`lock_timeout`), before giving up. The receiver then "
        "answers 503 with `Retry-After`, and Aircall retries. Keep it well below Aircall's 5 s.",
        group="database",
    )
    # Receiver
    aircall_tokens: tuple[AircallToken, ...] = setting(
        (),
        parse.tokens,
        "The tokens of the Aircall webhooks allowed to post, as `label:token` pairs separated by "
        "commas; a bare token gets the label `default`. Labels: letters, digits, `_ . -`, at "
        "most 64. Tokens: at least 16 characters, no spaces, no repeats. The label is stored on "
        "each row (`outbox.source`); the token never is. `serve` and `run` refuse to start "
        "without one.",
        group="receiver",
        secret=True,
    )
    forward_events: frozenset[str] | None = setting(
        frozenset(SEGMENT_CATALOGUE_EVENTS),
        parse.forward_events,
        "Aircall events forwarded to Segment, separated by commas. The default is the events of "
        "Segment's Aircall catalogue (`relay/aircall_events.py`). Any event name may be listed, "
        "including newer ones such as `call.comm_assets_generated`; a name Aircall is not known "
        "to send is accepted with a warning at start-up (likely a typo). `*` forwards every "
        "event. An empty value or `null` forwards none. Events not forwarded are still stored, "
        "with status `skipped` and the reason, and answered 200.",
        group="receiver",
        shown=f"the {len(SEGMENT_CATALOGUE_EVENTS)} catalogue events",
    )
    max_body_bytes: int = setting(
        256 * 1024,
        parse.integer(1024, 16 * 1024 * 1024),
        "Largest webhook body accepted (1 KiB to 16 MiB). A larger body is answered 413 and not "
        "stored; it is refused as soon as its `Content-Length` says so, or while reading a "
        "chunked body.",
        group="receiver",
        shown="`262144` (256 KiB)",
    )
    webhook_path: str = setting(
        "/aircall/webhook", parse.webhook_path, "URL path Aircall posts to.", group="receiver"
    )
    # Server
    host: str = setting(
        "127.0.0.1",
        parse.string,
        "Address `serve` listens on (`0.0.0.0` for every IPv4 interface, `::` for IPv6).",
        group="server",
    )
    port: int = setting(
        8080,
        parse.integer(0, 65535),
        "Port `serve` listens on; `0` takes any free port (the `listening` log line says which).",
        group="server",
    )
    workers: int = setting(
        1,
        parse.integer(1, 64),
        "Receiver processes (Hypercorn workers). Each batches its own commits. With more than "
        "one, `/metrics` (answered by any worker) sums every worker's counters "
        "([operations.md](operations.md#metrics)).",
        group="server",
    )
    receiver_metrics_host: str = setting(
        "127.0.0.1",
        parse.listen_host,
        "Address the receiver serves its Prometheus `GET /metrics` on. Keep loopback unless "
        "Prometheus runs on another machine.",
        group="server",
    )
    receiver_metrics_port: int | None = setting(
        9102,
        parse.port_or_off,
        "Port of the receiver's `/metrics`, plain HTTP even when the webhooks are HTTPS; the "
        "webhook port answers `/metrics` with 404, and this port answers nothing else. `off` (or "
        "an empty value) serves none; `0` takes any free port (the `metrics_listening` log line "
        "says which). A port already in use stops `serve` and `run` with exit code 2, naming "
        "this setting. `run` shows the drainer's metrics here too. (9100 is left to "
        "node_exporter, 9101 is the drainer's.)",
        group="server",
    )
    tls_certfile: str | None = setting(
        None,
        parse.optional_path,
        "PEM certificate chain. When set, with the key, `serve` speaks HTTPS itself (Aircall "
        "only calls HTTPS URLs with a valid certificate). Leave unset behind a TLS-terminating "
        "reverse proxy.",
        group="server",
    )
    tls_keyfile: str | None = setting(
        None, parse.optional_path, "PEM private key of that certificate.", group="server"
    )
    shutdown_grace_seconds: float = setting(
        10.0,
        parse.number(0.0, 600.0),
        "On SIGTERM, how long in-flight requests (and, for the drainer, in-flight deliveries) "
        "may take to finish before the process exits.",
        group="server",
    )
    # Logging
    log_format: str = setting(
        "auto",
        parse.choice("auto", "json", "console"),
        "`json` (one JSON object per line on stdout, for journald), `console` (readable), or "
        "`auto`: console on a terminal, JSON otherwise.",
        group="logging",
    )
    log_level: str = setting(
        "info",
        parse.choice("debug", "info", "warning", "error"),
        "Lowest level logged: `debug`, `info`, `warning` or `error`.",
        group="logging",
    )
    # Segment (the drainer)
    segment_write_key: Secret | None = setting(
        None,
        parse.secret(MIN_SECRET_CHARS),
        "Write key of the Segment HTTP API source (Segment's are 32 characters; fewer than "
        f"{MIN_SECRET_CHARS} is refused at start, since the log redactor would blank those few "
        "characters inside every word of every line). Without it nothing is sent: events stay "
        "in the outbox and the drainer says that delivery is paused.",
        group="segment",
        secret=True,
    )
    segment_base_url: str = setting(
        "https://api.segment.io",
        parse.base_url,
        "Segment endpoint: `us` (`https://api.segment.io`), `eu` "
        "(`https://events.eu1.segmentapis.com`, for EU workspaces) or any base URL (a proxy, "
        "the local fake); `/v1/batch` is appended.",
        group="segment",
    )
    segment_batch_size: int = setting(
        100,
        parse.integer(1, 2500),
        "Most events in one request (1 to 2,500, Segment's limit). Request bodies also stay "
        "under 475,000 bytes (Segment's limit is 500 KB).",
        group="segment",
    )
    segment_events_per_second: float = setting(
        500.0,
        parse.number(0.0),
        "Events sent to Segment per second, for the whole deployment: all drainers together, "
        "through a token bucket in the database (table `rate_limits`) that holds at most one "
        "batch; `0` for no limit. Segment asks for at most 1,000 events per second per "
        "workspace. Give every drainer the same value. See "
        "[architecture.md](architecture.md#the-limits-toward-segment).",
        group="segment",
    )
    segment_requests_per_second: float = setting(
        20.0,
        parse.number(0.0),
        "Requests sent to Segment per second, for the whole deployment, in the same way (a "
        "bucket of one request); `0` for no limit. With both limits `0` the drainers keep no "
        "budget at all, and each waits after the 429s it gets itself instead of pausing them "
        "all.",
        group="segment",
    )
    segment_concurrency: int = setting(
        4,
        parse.integer(1, 64),
        "Requests in flight at once. Each 429 halves it (down to 1); it grows back by one every "
        "20 successful requests.",
        group="segment",
    )
    segment_timeout_seconds: float = setting(
        30.0,
        parse.number(1.0, 300.0),
        "Time limit of one request (connect, send, answer). A request past it is retried later "
        "with the same messageIds.",
        group="segment",
    )
    segment_max_retry_after_seconds: float = setting(
        300.0,
        parse.number(1.0, 3600.0),
        "Cap on the wait a 429 asks for (`Retry-After`, `X-RateLimit-Reset`).",
        group="segment",
    )
    pii_drop_paths: tuple[str, ...] = setting(
        (),
        parse.data_paths,
        "Paths into Aircall's `data` removed before sending, separated by commas, e.g. "
        "`raw_digits,contact.phone_numbers[].value,**.email`. The outbox keeps the original. "
        "Syntax in [mapping.md](mapping.md).",
        group="segment",
    )
    pii_hash_paths: tuple[str, ...] = setting(
        (),
        parse.data_paths,
        "Paths into Aircall's `data` whose values are replaced by a keyed hash (HMAC-SHA256) "
        "before sending, so they can still be joined on but not read. Needs "
        "`RELAY_PII_HASH_KEY`.",
        group="segment",
    )
    pii_hash_key: Secret | None = setting(
        None,
        parse.secret(16),
        "The key of that hash, at least 16 characters. Keep it stable: after a change, the same "
        "phone number hashes to another value.",
        group="segment",
        secret=True,
    )
    # Drainer
    settle_seconds: float = setting(
        5.0,
        parse.number(0.0, 3600.0),
        "An event is sent no sooner than this after its receipt, so that webhooks of one call "
        "that arrive out of order within the window are sorted first (by Aircall timestamp, "
        "then call life cycle). On PostgreSQL, receipt and window are both measured on the "
        "database server's clock ([architecture](architecture.md#clocks)).",
        group="drainer",
    )
    retry_base_seconds: float = setting(
        1.0,
        parse.number(0.01, 3600.0),
        "First delay after a transient failure (5xx, timeout, connection error). Each further "
        "attempt doubles the ceiling; the delay is drawn uniformly below it (full jitter).",
        group="drainer",
    )
    retry_cap_seconds: float = setting(
        600.0, parse.number(0.01, 86400.0), "Largest ceiling of that delay.", group="drainer"
    )
    max_attempts: int = setting(
        0,
        parse.integer(0),
        "Failed deliveries (5xx, timeout, connection error) after which an event goes `dead`. A "
        "429 and a configuration pause (401/403/404/405) do not count, nor an expired lease or "
        "rows given back at a stop "
        "([architecture](architecture.md#what-each-answer-from-segment-does)). `0` never gives "
        "up: nothing transient kills an event.",
        group="drainer",
    )
    lease_seconds: float = setting(
        60.0,
        parse.number(1.0, 3600.0),
        "How long a claim on rows lasts without renewal. A live drainer renews its claims every "
        "third of this while requests are in flight; a crashed drainer's rows are claimed again "
        "when it runs out. On PostgreSQL, measured on the database server's clock.",
        group="drainer",
    )
    poll_seconds: float = setting(
        0.25,
        parse.number(0.01, 60.0),
        "How often an idle drainer looks for deliverable rows: always on SQLite, and on "
        "PostgreSQL while its listener is reconnecting.",
        group="drainer",
    )
    listen_poll_seconds: float = setting(
        5.0,
        parse.number(0.01, 600.0),
        "On PostgreSQL, how often an idle drainer looks while it listens for the receivers' "
        "notifications (`LISTEN aircall_relay_outbox`). New events do not wait for it: each "
        "commit wakes the drainers for the moment its events have settled, and a drainer wakes "
        "itself when a retry it scheduled falls due. It bounds the delay of what nothing "
        "announces: rows whose lease expired, rows a running drainer gave back because its "
        "batches were full (`outbox requeue` and a stopping drainer's release notify the "
        "drainers). See [architecture.md](architecture.md#how-a-drainer-is-woken).",
        group="drainer",
    )
    call_ended_timeout_seconds: float = setting(
        600.0,
        parse.number(1.0, 86400.0),
        "A call whose `call.hungup` was received longer ago than this, with no `call.ended`, is "
        "logged and counted as a webhook to chase (Aircall retries for up to 12 hours).",
        group="drainer",
    )
    drainer_metrics_host: str = setting(
        "127.0.0.1",
        parse.listen_host,
        "Address `drain` serves its Prometheus metrics on (`GET /metrics`). Keep loopback unless "
        "Prometheus runs on another machine.",
        group="drainer",
    )
    drainer_metrics_port: int | None = setting(
        9101,
        parse.port_or_off,
        "Port of the drainer's `/metrics`; `off` (or an empty value) serves none; `0` takes any "
        "free port (the `metrics_listening` log line says which). A port already in use stops "
        "`drain` with exit code 2, naming this setting, so several drainers on one machine each "
        "need their own port (or `0`, or `off`). `run` does not open it: its receiver's "
        "`/metrics` shows the drainer's metrics too.",
        group="drainer",
    )
    # Retention
    retention_delivered_days: float = setting(
        0.0,
        parse.number(0.0, 36500.0),
        "Delivered rows are deleted this many days after their delivery, with the "
        "`delivery_requests` records older than that (except those that rejected a message).",
        group="retention",
        shown="`0` (keep)",
    )
    retention_skipped_days: float = setting(
        0.0,
        parse.number(0.0, 36500.0),
        "Skipped rows (never forwarded) are deleted this many days after receipt.",
        group="retention",
        shown="`0` (keep)",
    )
    retention_dead_days: float = setting(
        0.0,
        parse.number(0.0, 36500.0),
        "Dead rows are deleted this many days after receipt. Kept by default, so that every "
        "failure stays on record until someone looks at it.",
        group="retention",
        shown="`0` (keep)",
    )
    # Aircall's Public API (webhook health, reconciliation)
    aircall_api_id: str | None = setting(
        None,
        parse.optional_text,
        "The API ID of an Aircall API key (Dashboard, Integrations & API), for the Public API "
        "(HTTP Basic auth). With `RELAY_AIRCALL_API_TOKEN` it turns on the `aircall webhooks` "
        "command and the drainer's webhook probe; without them both are off and say so.",
        group="aircall",
    )
    aircall_api_token: Secret | None = setting(
        None,
        parse.secret(MIN_SECRET_CHARS),
        "The API token of that key. Never logged or printed (an error says only that Aircall "
        "refused the credentials: exit code 2).",
        group="aircall",
        secret=True,
    )
    aircall_api_url: str = setting(
        "https://api.aircall.io",
        parse.http_url,
        "Base URL of Aircall's Public API; `/v1/...` is appended. Any other base URL for a "
        "proxy or the local fake (`aircall-relay fake-aircall`).",
        group="aircall",
    )
    aircall_probe_seconds: float = setting(
        300.0,
        parse.seconds_or_off(30.0, 86400.0),
        "How often the drainer asks Aircall whether the webhooks of `RELAY_AIRCALL_TOKENS` are "
        "active (the gauge `relay_aircall_webhook_active{label}`, a warning when one changes); "
        "`0` for never, else at least 30 (each probe spends one or more requests of the "
        "company's per-minute allowance). Off while the API settings are not set.",
        group="aircall",
    )
    reconcile_grace_seconds: float = setting(
        3600.0,
        parse.number(0.0, 86400.0),
        "`aircall-relay reconcile` judges a call only once it ended this long ago: a call that "
        "ended more recently, or is still going on, may still have webhooks on their way (Aircall "
        "sends `call.ended` about 30 s after the hang-up and retries failures). Past it, a call "
        "with no `call.ended` in the outbox is reported, and back-filled with `--backfill`.",
        group="aircall",
    )
    # Not a setting: the TOML file these settings were read from, if any.
    config_file: str | None = field(default=None, compare=False)

    def forwards(self, event: str) -> bool:
        return self.forward_events is None or event in self.forward_events

    def secrets(self) -> list[str]:
        """Every secret value, for the log redactor."""
        values = [token.token.reveal() for token in self.aircall_tokens]
        for secret in (self.segment_write_key, self.pii_hash_key, self.aircall_api_token):
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

    def aircall_api_configured(self) -> bool:
        return self.aircall_api_id is not None and self.aircall_api_token is not None

    def require_aircall_api(self) -> tuple[str, str]:
        """The Public API's id and token, or SettingsError naming the settings that are not set."""
        missing = [
            name
            for name, value in (
                ("RELAY_AIRCALL_API_ID", self.aircall_api_id),
                ("RELAY_AIRCALL_API_TOKEN", self.aircall_api_token),
            )
            if value is None
        ]
        if missing or self.aircall_api_id is None or self.aircall_api_token is None:
            raise SettingsError(
                f"{' and '.join(missing)}: not set, so the relay cannot ask Aircall's Public API; "
                "set RELAY_AIRCALL_API_ID and RELAY_AIRCALL_API_TOKEN to an API key of the "
                "company (Aircall Dashboard, Integrations & API)"
            )
        return self.aircall_api_id, self.aircall_api_token.reveal()

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
        parsed: dict[str, Any] = {}
        for name, value in values.items():
            spec = SPECS_BY_NAME.get(name)
            if spec is None:
                raise SettingsError(f"unknown setting {name!r}")
            if value is not None:
                where = f"--{name.replace('_', '-')}"
                parsed[name] = spec.parse(value, where) if isinstance(value, str) else value
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        return Settings(**{**data, **parsed})


SPECS: Final[tuple[SettingSpec, ...]] = specs_of(Settings)
SPECS_BY_NAME: Final[dict[str, SettingSpec]] = {spec.name: spec for spec in SPECS}
DEFAULTS: Final[Settings] = Settings()
