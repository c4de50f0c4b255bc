"""Readiness: what `aircall-relay check` reports, and the check `serve`, `drain` and `run` make
before they listen or claim (`require_schema_at_head`).

`check` looks at what a role needs: the receiver its Aircall tokens (and TLS files when set), the
drainer its Segment write key (and says whether Aircall's Public API is set for its probe and for
`reconcile`: optional, never a failure), both a database that answers with its schema at the
head this version expects. Its exit code is the first of these that applies: 2 a setting is
missing or wrong, 1 the database does not answer, 3 the schema is not at head; 0 when ready.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Literal

from relay.compose import build_store
from relay.db.engine import describe_url
from relay.db.migrate import head_revision, known_revisions
from relay.db.store import SchemaState
from relay.settings import Settings, SettingsError

EXIT_READY: Final[int] = 0
EXIT_DATABASE: Final[int] = 1
EXIT_CONFIGURATION: Final[int] = 2
EXIT_SCHEMA: Final[int] = 3

ROLES: Final[tuple[str, ...]] = ("all", "receiver", "drainer")
Status = Literal["ok", "warning", "failed", "not checked"]

# What a failed check means for the exit code, in the order they are looked at.
_EXIT_CODES: Final[tuple[tuple[str, int], ...]] = (
    ("settings", EXIT_CONFIGURATION),
    ("receiver", EXIT_CONFIGURATION),
    ("drainer", EXIT_CONFIGURATION),
    ("database", EXIT_DATABASE),
    ("schema", EXIT_SCHEMA),
)
_EXIT_REASONS: Final[dict[int, str]] = {
    EXIT_CONFIGURATION: "a setting",
    EXIT_DATABASE: "the database",
    EXIT_SCHEMA: "the schema",
}


class NotReady(Exception):
    """The database cannot be used by this version now: it does not answer (`exit_code` 1) or
    its schema is not at the head this version expects (3). The message says what to do."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True, slots=True)
class Finding:
    check: str  # settings, receiver, drainer, aircall, database, schema
    status: Status
    message: str


@dataclass
class Report:
    role: str
    findings: list[Finding] = field(default_factory=list)
    database: str | None = None
    schema_revision: str | None = None
    expected_revision: str = field(default_factory=head_revision)

    def add(self, check: str, status: Status, message: str) -> None:
        self.findings.append(Finding(check, status, message))

    def require(
        self, check: str, requirement: Callable[[], None], ok: str | None, refused: str = ""
    ) -> None:
        """Run a settings check (`Settings.require_tokens`, ...): its SettingsError is a failed
        finding (with what the refusal means), else `ok` is said, if any."""
        try:
            requirement()
        except SettingsError as error:
            self.add(check, "failed", f"{error}{refused}.")
        else:
            if ok is not None:
                self.add(check, "ok", ok)

    @property
    def exit_code(self) -> int:
        failed = {finding.check for finding in self.findings if finding.status == "failed"}
        return next((code for check, code in _EXIT_CODES if check in failed), EXIT_READY)

    def as_json(self) -> dict[str, Any]:
        return {
            "ready": self.exit_code == EXIT_READY,
            "role": self.role,
            "exit_code": self.exit_code,
            "database": self.database,
            "schema_revision": self.schema_revision,
            "expected_revision": self.expected_revision,
            "checks": [asdict(finding) for finding in self.findings],
        }

    def as_text(self) -> str:
        lines = []
        for finding in self.findings:
            prefix = "" if finding.status == "ok" else f"{finding.status.upper()}: "
            lines.append(f"{finding.check.capitalize()}: {prefix}{finding.message}")
        roles = "the receiver and the drainer" if self.role == "all" else f"the {self.role}"
        failed = sum(1 for finding in self.findings if finding.status == "failed")
        if failed:
            problems = "1 problem" if failed == 1 else f"{failed} problems"
            code = self.exit_code
            lines.append(
                f"Not ready for {roles}: {problems} (exit code {code}: {_EXIT_REASONS[code]})."
            )
        else:
            lines.append(f"Ready for {roles}.")
        return "\n".join(lines)


async def read_schema_state(settings: Settings) -> SchemaState:
    """Whether the database answers, and its schema's revision (a connection of its own)."""
    store = build_store(settings)
    try:
        return await store.schema_state()
    finally:
        await store.engine.dispose()


def schema_problem(schema: SchemaState) -> str | None:
    """Why this version cannot use the schema of a database that answered; None at head."""
    expected = head_revision()
    if schema.revision == expected:
        return None
    if schema.revision is None:
        return "the database has no outbox schema yet: run `aircall-relay migrate`"
    if schema.revision in known_revisions():
        return (
            f"the schema is at revision {schema.revision}, older than this version's "
            f"{expected}: run `aircall-relay migrate`"
        )
    return (
        f"the schema is at revision {schema.revision}, newer than this version knows (its "
        f"latest is {expected}): the database was migrated by a newer version of "
        "aircall-relay; run that version"
    )


async def require_schema_at_head(settings: Settings) -> None:
    """Raise NotReady unless the database answers and its schema is at head."""
    schema = await read_schema_state(settings)
    database = describe_url(settings.database_url)
    if not schema.reachable:
        raise NotReady(f"database error: {database} does not answer: {schema.error}", EXIT_DATABASE)
    problem = schema_problem(schema)
    if problem is not None:
        raise NotReady(f"not ready: {database}: {problem}", EXIT_SCHEMA)


def unreadable_settings(role: str, error: SettingsError) -> Report:
    """The report when the settings cannot be read at all (`check --json`)."""
    report = Report(role)
    report.add("settings", "failed", str(error))
    return report


async def check(settings: Settings, role: str) -> Report:
    """What `role` (receiver, drainer, all) needs, checked: settings, then database and schema."""
    report = Report(role)
    file = f" and {settings.config_file}" if settings.config_file else ""
    report.add("settings", "ok", f"read from the environment{file}.")
    if role in ("all", "receiver"):
        _check_receiver(settings, report)
    if role in ("all", "drainer"):
        _check_drainer(settings, report)
    await _check_database(settings, report)
    return report


def _check_receiver(settings: Settings, report: Report) -> None:
    count = len(settings.aircall_tokens)
    labels = ", ".join(token.label for token in settings.aircall_tokens)
    tokens = "1 Aircall token" if count == 1 else f"{count} Aircall tokens"
    report.require(
        "receiver",
        settings.require_tokens,
        ok=f"{tokens} configured (labels: {labels}).",
        refused="; `serve` and `run` refuse to start",
    )
    https = settings.tls_certfile and f"serves HTTPS with {settings.tls_certfile}."
    report.require("receiver", settings.check_tls, ok=https or None)
    unknown = settings.unknown_forward_events()
    if unknown:
        report.add(
            "receiver",
            "warning",
            f"RELAY_FORWARD_EVENTS names {', '.join(unknown)}, which Aircall is not known to "
            "send (a typo?).",
        )


def _check_drainer(settings: Settings, report: Report) -> None:
    report.require(
        "drainer",
        settings.require_write_key,
        ok=f"a Segment write key is set; events go to {settings.segment_base_url}/v1/batch.",
        refused="; `drain` refuses to start",
    )
    _check_aircall_api(settings, report)


def _check_aircall_api(settings: Settings, report: Report) -> None:
    """Whether Aircall's side is watched: the API settings of the drainer's probe and of
    `reconcile`. Optional, so never a failure; Aircall is not contacted here (`aircall-relay
    aircall webhooks` is the check that asks it)."""
    if not settings.aircall_api_configured():
        report.add(
            "aircall",
            "not checked",
            "RELAY_AIRCALL_API_ID and RELAY_AIRCALL_API_TOKEN are not both set: no probe of "
            "Aircall's webhooks, and `reconcile` cannot run.",
        )
        return
    period = settings.aircall_probe_seconds
    probe = (
        f"the drainer probes Aircall's webhooks every {period:g} s"
        if period > 0
        else "the drainer's probe is off (RELAY_AIRCALL_PROBE_SECONDS=0)"
    )
    report.add(
        "aircall",
        "ok",
        f"Aircall's Public API is set ({settings.aircall_api_url}): {probe}, and `reconcile` "
        "can run (`aircall-relay aircall webhooks` asks Aircall now).",
    )


async def _check_database(settings: Settings, report: Report) -> None:
    report.database = describe_url(settings.database_url)
    schema = await read_schema_state(settings)
    if not schema.reachable:
        report.add("database", "failed", f"{report.database} does not answer: {schema.error}.")
        report.add("schema", "not checked", "the database does not answer.")
        return
    report.add("database", "ok", f"{report.database} answers.")
    report.schema_revision = schema.revision
    problem = schema_problem(schema)
    if problem is None:
        report.add("schema", "ok", f"at revision {schema.revision}, the head of this version.")
    else:
        report.add("schema", "failed", f"{problem}.")
