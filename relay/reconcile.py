"""`aircall-relay reconcile`: Aircall's calls in a window, compared with the outbox, and (with
`--backfill`) each call's missing `call.ended` stored from Aircall's API.

A call is judged once it is *due*: it ended at least `RELAY_RECONCILE_GRACE_SECONDS` ago (a call
still going on, or that ended more recently, may have webhooks on their way). A due call is

- `complete`: the outbox has a `call.ended` of it (any status: delivered, pending, skipped...);
- `missing`: the outbox has no row of it at all (Aircall never reached the relay for it);
- `awaiting_call_ended`: the outbox has rows of it, but no `call.ended`.

With `--backfill`, each missing or awaiting call is read again (`GET /v1/calls/{id}`, fresh
recording URLs) and one `call.ended` row is stored from it, origin `reconciled`
(relay/db/reconcile.py: conditional on the call having no `call.ended`, with an identity that
makes a second run add nothing). The drainer sends it like any row.

Exit codes (docs/operations.md, "When Aircall stopped sending"): 0 every due call complete (or
back-filled); 4 (`EXIT_INCOMPLETE`) some due call is missing its `call.ended` and was not
back-filled; 1 Aircall failed or answered garbage, or some call could not be back-filled; 2 the
API settings are missing or Aircall refused them. Every run that reached Aircall is recorded in
`reconcile_runs`, a failed one too (outcome `failed`, with the error), so the audit trail shows
the runs that did not complete; a failed listing stores no outbox row.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Protocol

import anyio

from relay.aircall_api import (
    AircallApi,
    AircallApiError,
    AircallAuthError,
    AircallNotFound,
    PageCallback,
)
from relay.db.engine import create_engine
from relay.db.reconcile import CallInOutbox, ReconcileStore, RunRecord
from relay.progress import ProgressCallback, ProgressDisplay
from relay.settings import Settings

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
EXIT_INCOMPLETE: Final = 4

COMPLETE: Final = "complete"
MISSING: Final = "missing"
AWAITING: Final = "awaiting_call_ended"
NOT_YET_DUE: Final = "not_yet_due"

# Calls listed in a report (text and JSON); the counts are always whole.
LISTED_CALLS: Final = 50

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class CallSource(Protocol):
    """What reconcile asks Aircall (`relay.aircall_api.AircallApi`)."""

    def calls(
        self, since: datetime, until: datetime, on_page: PageCallback | None = None
    ) -> Any: ...  # an async iterator of call objects

    async def call(self, call_id: int) -> dict[str, Any]: ...


def parse_moment(text: str, now: datetime, option: str) -> datetime:
    """`24h`, `90m`, `2d`, `3600s` (that long before `now`), or an ISO 8601 date-time (UTC
    when it has no offset); ValueError saying what is accepted."""
    text = text.strip()
    duration = _DURATION.match(text)
    if duration:
        return now - timedelta(seconds=float(duration.group(1)) * _UNIT_SECONDS[duration.group(2)])
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{option} {text!r}: expected a duration before now (24h, 90m, 2d, 3600s) or an "
            "ISO 8601 date-time (2026-12-05T08:00:00Z)"
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def judge(ended_at: int | None, in_outbox: CallInOutbox | None, now: datetime, grace: float) -> str:
    """The verdict on one call: COMPLETE, MISSING, AWAITING or NOT_YET_DUE (module docstring)."""
    if in_outbox is not None and in_outbox.has_call_ended:
        return COMPLETE
    if ended_at is None or ended_at + grace > now.timestamp():
        return NOT_YET_DUE
    return MISSING if in_outbox is None else AWAITING


@dataclass
class Report:
    """What one run found and did."""

    since: datetime
    until: datetime
    backfill: bool
    grace_seconds: float
    started_at: datetime
    finished_at: datetime | None = None
    calls_seen: int = 0
    verdicts: dict[str, list[str]] = field(
        default_factory=lambda: {COMPLETE: [], MISSING: [], AWAITING: [], NOT_YET_DUE: []}
    )
    backfilled: list[str] = field(default_factory=list)
    # Calls that had their call.ended by the time the back-fill came (a webhook just arrived).
    arrived_meanwhile: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    error: str | None = None  # the run failed: why
    exit_code: int = EXIT_OK

    @property
    def unrepaired(self) -> int:
        due = len(self.verdicts[MISSING]) + len(self.verdicts[AWAITING])
        return due - len(self.backfilled) - len(self.arrived_meanwhile)

    @property
    def outcome(self) -> str:
        if self.error is not None:
            return "failed"
        if self.errors:
            return "errors"
        return "incomplete" if self.unrepaired else COMPLETE

    def finish(self, finished_at: datetime) -> None:
        self.finished_at = finished_at
        if self.error is None:
            if self.errors:
                self.exit_code = EXIT_FAILURE
            elif self.unrepaired:
                self.exit_code = EXIT_INCOMPLETE

    def run_record(self) -> RunRecord:
        assert self.finished_at is not None
        return RunRecord(
            window_since=self.since,
            window_until=self.until,
            backfill=self.backfill,
            calls_seen=self.calls_seen,
            missing=len(self.verdicts[MISSING]),
            awaiting_call_ended=len(self.verdicts[AWAITING]),
            not_yet_due=len(self.verdicts[NOT_YET_DUE]),
            backfilled=len(self.backfilled),
            errors=len(self.errors),
            started_at=self.started_at,
            finished_at=self.finished_at,
            outcome=self.outcome,
            error=self.error,
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "window": {"since": _iso(self.since), "until": _iso(self.until)},
            "grace_seconds": self.grace_seconds,
            "backfill": self.backfill,
            "calls_seen": self.calls_seen,
            **{verdict: len(calls) for verdict, calls in self.verdicts.items()},
            "backfilled": len(self.backfilled),
            "arrived_meanwhile": len(self.arrived_meanwhile),
            "unrepaired": self.unrepaired,
            "errors": self.errors[:LISTED_CALLS],
            "error_count": len(self.errors),
            "outcome": self.outcome,
            "error": self.error,
            "exit_code": self.exit_code,
            "missing_calls": self.verdicts[MISSING][:LISTED_CALLS],
            "awaiting_call_ended_calls": self.verdicts[AWAITING][:LISTED_CALLS],
            "backfilled_calls": self.backfilled[:LISTED_CALLS],
        }

    def as_text(self) -> str:
        hours = (self.until - self.since).total_seconds() / 3600
        grace = f"{self.grace_seconds / 60:g} min"
        lines = [
            f"Aircall's calls started {_iso(self.since)} to {_iso(self.until)} ({hours:g} h), "
            "compared with the outbox",
            f"  calls seen                {self.calls_seen:>8,}",
            f"  complete                  {len(self.verdicts[COMPLETE]):>8,}"
            "  (their call.ended is in the outbox)",
            f"  not yet due               {len(self.verdicts[NOT_YET_DUE]):>8,}"
            f"  (going on, or ended less than {grace} ago)",
            f"  missing                   {len(self.verdicts[MISSING]):>8,}"
            "  (ended, and not one row of them in the outbox)",
            f"  awaiting call.ended       {len(self.verdicts[AWAITING]):>8,}"
            f"  (rows, but no call.ended {grace} after the end)",
        ]
        if self.backfill:
            lines.append(
                f"  back-filled               {len(self.backfilled):>8,}"
                "  (call.ended rows stored, origin reconciled)"
            )
            if self.arrived_meanwhile:
                lines.append(
                    f"  arrived meanwhile         {len(self.arrived_meanwhile):>8,}"
                    "  (their call.ended came in during the run)"
                )
        lines.append(f"  errors                    {len(self.errors):>8,}")
        for verdict, title in ((MISSING, "missing"), (AWAITING, "awaiting call.ended")):
            calls = self.verdicts[verdict]
            if calls and not self.backfill:
                shown = ", ".join(calls[:LISTED_CALLS])
                more = f" and {len(calls) - LISTED_CALLS} more" if len(calls) > LISTED_CALLS else ""
                lines.append(f"  {title}: {shown}{more}")
        lines.extend(f"  error: {error}" for error in self.errors[:LISTED_CALLS])
        lines.append(self._verdict_line())
        return "\n".join(lines)

    def _verdict_line(self) -> str:
        if self.error is not None:
            return f"FAILED: {self.error}"
        if self.errors:
            return (
                f"ERRORS: {len(self.errors)} call(s) could not be checked or back-filled; "
                "run again (exit 1)"
            )
        if self.unrepaired:
            return (
                f"INCOMPLETE: {self.unrepaired} ended call(s) have no call.ended in the outbox; "
                "run with --backfill to store them from Aircall's API (exit 4)"
            )
        repaired = f" ({len(self.backfilled)} back-filled)" if self.backfilled else ""
        return f"COMPLETE: every ended call has its call.ended in the outbox{repaired}"


async def reconcile(
    api: CallSource,
    store: ReconcileStore,
    *,
    since: datetime,
    until: datetime,
    grace_seconds: float,
    backfill: bool,
    clock: Callable[[], datetime],
    progress: ProgressCallback | None = None,
) -> Report:
    """One run: list, compare, back-fill if asked, record it in `reconcile_runs`. Aircall
    refusing the credentials raises `AircallAuthError` (after the run is recorded)."""
    report = Report(since, until, backfill, grace_seconds, started_at=clock())
    try:
        await _compare(api, store, report, clock, progress)
        if backfill:
            await _backfill(api, store, report, clock, progress)
    except AircallApiError as error:
        report.error = str(error)
        report.exit_code = EXIT_USAGE if isinstance(error, AircallAuthError) else EXIT_FAILURE
    report.finish(clock())
    await store.record_run(report.run_record())
    return report


async def _compare(
    api: CallSource,
    store: ReconcileStore,
    report: Report,
    clock: Callable[[], datetime],
    progress: ProgressCallback | None,
) -> None:
    ended: dict[str, int | None] = {}

    def on_page(done: int, total: int | None) -> None:
        if progress is not None:
            progress("calls listed", done, total)

    async for call in api.calls(report.since, report.until, on_page):
        ended[str(call["id"])] = call.get("ended_at")
    report.calls_seen = len(ended)
    call_ids = list(ended)
    found: dict[str, CallInOutbox] = {}
    chunk = 2000
    for start in range(0, len(call_ids), chunk):
        found.update(await store.calls_in_outbox(call_ids[start : start + chunk]))
        if progress is not None:
            progress("calls compared", min(start + chunk, len(call_ids)), len(call_ids))
    now = clock()
    for call_id, ended_at in ended.items():
        verdict = judge(ended_at, found.get(call_id), now, report.grace_seconds)
        report.verdicts[verdict].append(call_id)


async def _backfill(
    api: CallSource,
    store: ReconcileStore,
    report: Report,
    clock: Callable[[], datetime],
    progress: ProgressCallback | None,
) -> None:
    to_fill: Sequence[str] = report.verdicts[MISSING] + report.verdicts[AWAITING]
    for done, call_id in enumerate(to_fill, start=1):
        await _backfill_one(api, store, report, clock, call_id)
        if progress is not None:
            progress("calls back-filled", done, len(to_fill))


async def _backfill_one(
    api: CallSource,
    store: ReconcileStore,
    report: Report,
    clock: Callable[[], datetime],
    call_id: str,
) -> None:
    try:
        call = await api.call(int(call_id))
    except AircallNotFound:
        report.errors.append(f"call {call_id}: Aircall no longer has it (404)")
        return
    ended_at = call.get("ended_at")
    if ended_at is None:  # listed as ended, read again as not: nothing to build from
        report.errors.append(f"call {call_id}: Aircall's call object has no ended_at")
        return
    stored = await store.backfill_call_ended(call_id, call, int(ended_at), clock())
    (report.backfilled if stored is not None else report.arrived_meanwhile).append(call_id)


def render(report: Report, as_json: bool) -> str:
    return json.dumps(report.as_json(), indent=2) if as_json else report.as_text()


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def add_reconcile_command(commands: Any) -> argparse.ArgumentParser:
    command: argparse.ArgumentParser = commands.add_parser(
        "reconcile",
        help="compare Aircall's calls (Public API) with the outbox; --backfill stores the "
        "missing call.ended; exit 4 when some are missing and not back-filled",
        description="Compare the calls Aircall had in a window (RELAY_AIRCALL_API_ID, "
        "RELAY_AIRCALL_API_TOKEN) with the outbox: calls with no row at all, and calls whose "
        "call.ended has not arrived RELAY_RECONCILE_GRACE_SECONDS after they ended. Each run is "
        "recorded in the table reconcile_runs. Exit codes: 0 every ended call has its call.ended "
        "(or it was back-filled); 4 some are missing and were not back-filled; 1 Aircall failed "
        "or answered garbage, or a call could not be back-filled; 2 the API settings are not set "
        "or Aircall refused them; 3 the schema is not at head.",
    )
    command.add_argument(
        "--since",
        default="24h",
        metavar="WHEN",
        help="calls started from: a duration before now (24h, 90m, 2d) or an ISO 8601 "
        "date-time, UTC when it has no offset (default 24h)",
    )
    command.add_argument(
        "--until",
        default=None,
        metavar="WHEN",
        help="calls started before: a duration before now or an ISO 8601 date-time (default: now)",
    )
    command.add_argument(
        "--backfill",
        action="store_true",
        help="store one call.ended (origin reconciled) for each ended call that has none, read "
        "from GET /v1/calls/{id}; the drainer sends it like any row",
    )
    command.add_argument(
        "--requests-per-minute",
        type=float,
        default=None,
        metavar="N",
        help="the most requests a minute to Aircall (default 60, or what Aircall's "
        "X-AircallApi-Limit states; 0: no pacing of our own, 429s still honoured)",
    )
    command.add_argument("--json", action="store_true", help="print the report as JSON")
    return command


def run_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    """The command: settings and window checked, then one run; the report on stdout, progress
    on stderr."""
    now = datetime.now(UTC)
    try:
        since = parse_moment(args.since, now, "--since")
        until = now if args.until is None else parse_moment(args.until, now, "--until")
    except ValueError as error:
        print(f"aircall-relay reconcile: {error}", file=sys.stderr)
        return EXIT_USAGE
    if until <= since:
        print(
            f"aircall-relay reconcile: --until ({_iso(until)}) is not after --since "
            f"({_iso(since)})",
            file=sys.stderr,
        )
        return EXIT_USAGE

    async def main() -> Report:
        engine = create_engine(
            settings.database_url, settings.database_timeout_seconds, statement_timeout_seconds=None
        )
        display = ProgressDisplay(sys.stderr)
        try:
            async with AircallApi.from_settings(
                settings, requests_per_minute=args.requests_per_minute
            ) as api:
                return await reconcile(
                    api,
                    ReconcileStore(engine),
                    since=since,
                    until=until,
                    grace_seconds=settings.reconcile_grace_seconds,
                    backfill=args.backfill,
                    clock=lambda: datetime.now(UTC),
                    progress=display,
                )
        finally:
            display.close()
            await engine.dispose()

    report = anyio.run(main)
    print(render(report, args.json))
    if report.exit_code == EXIT_USAGE:
        print(
            "aircall-relay reconcile: Aircall refused the API credentials: check "
            "RELAY_AIRCALL_API_ID and RELAY_AIRCALL_API_TOKEN",
            file=sys.stderr,
        )
    elif report.error is not None:
        print(f"aircall-relay reconcile: {report.error}", file=sys.stderr)
    return report.exit_code
