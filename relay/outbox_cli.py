"""`aircall-relay outbox ...`: statistics, listing, showing, requeueing, purging and copying outbox
rows.

Output is a plain table for people, or JSON with `--json` for scripts. Times are UTC, ISO-8601.
Control characters in tables are escaped (`\\n`, `\\x1b`); `--json` gives the exact text.
`copy` and `purge` report their progress on stderr.
Exit codes: 0 done; 1 the database failed; 2 a bad option; 4 `show` found no such row.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio

from relay.aircall import CONTROL_CHARACTERS
from relay.database_url import normalise_database_url
from relay.db.engine import create_engine
from relay.db.inspect import EventFilter, OutboxInspector
from relay.db.tables import utc_datetime
from relay.db.transfer import TransferError, copy_outbox
from relay.json_text import indent_json
from relay.progress import ProgressDisplay
from relay.settings import Settings

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_NOT_FOUND = 4

STATUSES = ("pending", "delivering", "delivered", "dead", "skipped")


def _moment(text: str) -> datetime:
    """An ISO-8601 time (UTC if no zone is given), or a relative one: 30m, 2h, 7d ago."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text and text[-1] in units and text[:-1].isdigit():
        return datetime.now(UTC) - timedelta(seconds=int(text[:-1]) * units[text[-1]])
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            "expected an ISO-8601 time (2026-11-23T12:00:00Z) or an age (30m, 2h, 7d), "
            f"got {text!r}"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _days(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of days, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("a number of days cannot be negative")
    return value


def _add_filters(parser: argparse.ArgumentParser, statuses: Sequence[str]) -> None:
    parser.add_argument(
        "--status", action="append", choices=statuses, help="row status (repeatable)"
    )
    parser.add_argument("--event", action="append", help="Aircall event, e.g. call.ended")
    parser.add_argument("--key", help="ordering key, e.g. call:1903456789")
    parser.add_argument("--since", type=_moment, help="received at or after (ISO time or 2h)")
    parser.add_argument("--until", type=_moment, help="received before (ISO time or 30m)")


def _stats_arguments(stats: argparse.ArgumentParser) -> None:
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.set_defaults(outbox_handler=_stats)


def _list_arguments(listing: argparse.ArgumentParser) -> None:
    _add_filters(listing, STATUSES)
    listing.add_argument("--limit", type=int, default=50, help="at most this many rows (50)")
    listing.add_argument("--json", action="store_true", help="print JSON lines")
    listing.set_defaults(outbox_handler=_list)


def _show_arguments(show: argparse.ArgumentParser) -> None:
    show.add_argument("reference", metavar="ID|MESSAGE_ID", help="receipt id or Segment messageId")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(outbox_handler=_show)


def _requeue_arguments(requeue: argparse.ArgumentParser) -> None:
    _add_filters(requeue, ("dead", "skipped", "delivered"))
    requeue.add_argument("--id", type=int, action="append", help="receipt id (repeatable)")
    requeue.add_argument("--dry-run", action="store_true", help="count, change nothing")
    requeue.set_defaults(outbox_handler=_requeue)


def _purge_arguments(purge: argparse.ArgumentParser) -> None:
    purge.add_argument(
        "--delivered-older-than",
        type=_days,
        metavar="DAYS",
        help="delete delivered rows delivered more than DAYS ago",
    )
    purge.add_argument(
        "--skipped-older-than",
        type=_days,
        metavar="DAYS",
        help="delete skipped rows received more than DAYS ago",
    )
    purge.add_argument("--batch-size", type=int, default=1000, help="rows per transaction (1000)")
    purge.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    purge.set_defaults(outbox_handler=_purge)


def _copy_arguments(copy: argparse.ArgumentParser) -> None:
    copy.add_argument(
        "--from",
        dest="source_url",
        required=True,
        metavar="URL",
        help="the database to copy from, e.g. sqlite:////var/lib/aircall-relay/outbox.sqlite3",
    )
    copy.add_argument("--batch-size", type=int, default=1000, help="rows per transaction (1000)")
    copy.set_defaults(outbox_handler=_copy)


@dataclass(frozen=True, slots=True)
class OutboxAction:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    description: str | None = None


# Every `outbox` action, in the order `--help` lists them: the parsers and the top-level help's
# list of actions are both made from this.
OUTBOX_ACTIONS: tuple[OutboxAction, ...] = (
    OutboxAction(
        "stats",
        "counts by status and event, oldest pending age, dead rows, calls awaiting call.ended",
        _stats_arguments,
    ),
    OutboxAction("list", "rows, newest first", _list_arguments),
    OutboxAction("show", "one row, its payload and its delivery requests", _show_arguments),
    OutboxAction(
        "requeue",
        "put rows back to pending (default: every dead row; narrow with filters)",
        _requeue_arguments,
    ),
    OutboxAction(
        "purge",
        "delete old delivered (or skipped) rows in batches; never pending or dead rows; "
        "progress on stderr",
        _purge_arguments,
    ),
    OutboxAction(
        "copy",
        "copy a whole outbox from another database into this one (e.g. SQLite to PostgreSQL); "
        "progress on stderr",
        _copy_arguments,
        description="Copy every outbox row and delivery request, ids and statuses included, "
        "from --from URL into the database of RELAY_DATABASE_URL, which must be migrated and "
        "empty. Stop the relay that writes the source first. Progress goes to stderr: a line "
        "rewritten in place on a terminal, a plain line every 10 s otherwise.",
    ),
)


def add_outbox_commands(commands: Any) -> None:
    names = ", ".join(action.name for action in OUTBOX_ACTIONS)
    outbox = commands.add_parser(
        "outbox",
        help=f"inspect and manage outbox rows ({names})",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = outbox.add_subparsers(dest="outbox_command", required=True, metavar="ACTION")
    for action in OUTBOX_ACTIONS:
        action.add_arguments(
            actions.add_parser(action.name, help=action.help, description=action.description)
        )


def run_outbox_command(args: argparse.Namespace, settings: Settings) -> int:
    async def main() -> int:
        # No statement timeout: a requeue or the stats of a large outbox may rightly take long,
        # and the person or timer running the command is the one waiting for it.
        engine = create_engine(
            settings.database_url, settings.database_timeout_seconds, statement_timeout_seconds=None
        )
        try:
            handler = args.outbox_handler
            code: int = await handler(args, OutboxInspector(engine), settings)
            return code
        finally:
            await engine.dispose()

    return anyio.run(main)


def _filter(args: argparse.Namespace) -> EventFilter:
    return EventFilter(
        statuses=tuple(args.status or ()),
        events=tuple(args.event or ()),
        ordering_key=args.key,
        received_since=args.since,
        received_until=args.until,
        ids=tuple(getattr(args, "id", None) or ()),
    )


async def _stats(args: argparse.Namespace, inspector: OutboxInspector, settings: Settings) -> int:
    now = datetime.now(UTC)
    stats = await inspector.stats(
        now, awaiting_since=now - timedelta(seconds=settings.call_ended_timeout_seconds)
    )
    oldest_age = (
        None
        if stats.oldest_pending_received_at is None
        else round((now - stats.oldest_pending_received_at).total_seconds(), 1)
    )
    report = {
        "by_status": stats.by_status,
        "oldest_pending_age_seconds": oldest_age,
        "dead": stats.dead,
        "calls_awaiting_call_ended": stats.calls_awaiting_call_ended,
        "call_ended_timeout_seconds": settings.call_ended_timeout_seconds,
        "delivery_requests_last_hour": stats.delivery_requests_last_hour,
        "by_event": stats.by_event,
        "last_reconcile_run": stats.last_reconcile_run,
    }
    if args.json:
        print(json.dumps(report, indent=2, default=_json_default))
        return EXIT_OK
    print(
        "rows by status:   "
        + _pairs({status: stats.by_status.get(status, 0) for status in STATUSES})
    )
    print(f"oldest pending:   {'none' if oldest_age is None else f'{oldest_age:g} s ago'}")
    print(f"dead rows:        {stats.dead}")
    print(
        f"awaiting call.ended for over {settings.call_ended_timeout_seconds:g} s: "
        f"{stats.calls_awaiting_call_ended} call(s)"
    )
    print("requests, last hour: " + (_pairs(stats.delivery_requests_last_hour) or "none"))
    print("last reconcile:   " + _describe_reconcile_run(stats.last_reconcile_run, now))
    print()
    rows = [
        {"event": event, **{status: counts.get(status, 0) for status in STATUSES}}
        for event, counts in sorted(stats.by_event.items())
    ]
    print(_table(rows, ["event", *STATUSES]) if rows else "the outbox is empty")
    return EXIT_OK


def _describe_reconcile_run(run: dict[str, Any] | None, now: datetime) -> str:
    """The latest row of `reconcile_runs` on one line (the view `last_reconcile_run` has it
    in SQL)."""
    if run is None:
        return "never (aircall-relay reconcile)"
    finished = utc_datetime(run["finished_at"])
    since, until = utc_datetime(run["window_since"]), utc_datetime(run["window_until"])
    hours = (until - since).total_seconds() / 3600
    ago = round((now - finished).total_seconds() / 60)
    return (
        f"{run['outcome']}, {ago} min ago ({hours:g} h window): {run['calls_seen']} calls, "
        f"{run['missing']} missing, {run['awaiting_call_ended']} awaiting call.ended, "
        f"{run['backfilled']} back-filled, {run['errors']} errors"
        + (f"; {run['error']}" if run["error"] else "")
    )


async def _list(args: argparse.Namespace, inspector: OutboxInspector, settings: Settings) -> int:
    rows = await inspector.list_events(_filter(args), args.limit)
    if args.json:
        for row in rows:
            print(json.dumps(row, default=_json_default))
        return EXIT_OK
    columns = ["id", "status", "event", "ordering_key", "occurred_at", "received_at", "attempts",
               "last_http_status", "late", "last_error"]  # fmt: skip
    print(_table(rows, columns) if rows else "no rows")
    return EXIT_OK


async def _show(args: argparse.Namespace, inspector: OutboxInspector, settings: Settings) -> int:
    row = await inspector.find(args.reference)
    if row is None:
        print(f"no outbox row with id or messageId {args.reference!r}")
        return EXIT_NOT_FOUND
    stored = row["payload"]  # the JSON text stored: shown at any depth (relay/json_text.py)
    try:
        payload = indent_json(stored, level=1 if args.json else 0, ensure_ascii=args.json)
        payload_error = None
    except ValueError as error:  # a row written by hand, not by the relay
        payload, payload_error = None, str(error)
    if args.json:
        if payload is not None:
            print(_json_object(row, {"payload": payload}))
        else:
            row.update(payload=None, payload_error=payload_error, payload_text=stored)
            print(json.dumps(row, default=_json_default, indent=2))
        return EXIT_OK
    del row["payload"]
    requests = row.pop("delivery_requests")
    width = max(len(name) for name in row)
    for name, value in row.items():
        print(f"{name.ljust(width)}  {_cell(value)}")
    if payload_error is None:
        print("\npayload:")
        print(payload)
    else:
        print(f"\npayload ({payload_error}; shown as stored):")
        print(printable(stored))
    print(f"\ndelivery requests ({len(requests)}):")
    if requests:
        columns = [
            "id",
            "started_at",
            "duration_ms",
            "event_count",
            "http_status",
            "outcome",
            "error",
        ]
        print(_table(requests, columns))
    return EXIT_OK


def _json_object(row: dict[str, Any], texts: dict[str, str]) -> str:
    """`json.dumps(row, indent=2)`, but with the value of each key of `texts` written as that
    JSON text (laid out for its place, one level deep)."""
    members = []
    for name, value in row.items():
        if name in texts:
            text = texts[name]
        else:  # json.dumps breaks lines only between members, never inside a string
            text = json.dumps(value, default=_json_default, indent=2).replace("\n", "\n  ")
        members.append(f"  {json.dumps(name)}: {text}")
    return "{\n" + ",\n".join(members) + "\n}"


async def _requeue(args: argparse.Namespace, inspector: OutboxInspector, settings: Settings) -> int:
    count = await inspector.requeue(_filter(args), datetime.now(UTC), dry_run=args.dry_run)
    verb = "would requeue" if args.dry_run else "requeued"
    print(f"{verb} {count} row(s)")
    return EXIT_OK


async def _purge(args: argparse.Namespace, inspector: OutboxInspector, settings: Settings) -> int:
    if args.delivered_older_than is None and args.skipped_older_than is None:
        print(
            "aircall-relay outbox purge: say what to purge: --delivered-older-than DAYS "
            "and/or --skipped-older-than DAYS (pending and dead rows are never purged here)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    now = datetime.now(UTC)
    verb = "would delete" if args.dry_run else "deleted"
    progress = ProgressDisplay(sys.stderr)
    for status, days in (
        ("delivered", args.delivered_older_than),
        ("skipped", args.skipped_older_than),
    ):
        if days is None:
            continue
        try:
            count = await inspector.purge(
                status,
                now - timedelta(days=days),
                dry_run=args.dry_run,
                batch_size=args.batch_size,
                progress=None if args.dry_run else progress,
            )
        finally:
            progress.close()
        print(f"{verb} {count} {status} row(s) older than {days:g} day(s)")
    return EXIT_OK


async def _copy(args: argparse.Namespace, inspector: OutboxInspector, settings: Settings) -> int:
    source = create_engine(
        normalise_database_url(args.source_url),
        settings.database_timeout_seconds,
        statement_timeout_seconds=None,
    )
    progress = ProgressDisplay(sys.stderr)
    try:
        result = await copy_outbox(
            source, inspector.engine, batch_size=args.batch_size, progress=progress
        )
    except TransferError as error:
        print(f"aircall-relay outbox copy: {error}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        progress.close()
        await source.dispose()
    print(
        f"copied {result.outbox_rows} outbox row(s) and {result.delivery_requests} delivery "
        "request(s)"
    )
    return EXIT_OK


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def printable(text: str) -> str:
    """`text` for a terminal: control characters (newlines, escape sequences, C1) shown as
    Python writes them in a string (`\\n`, `\\x1b`), so that a webhook cannot break a table
    or drive the operator's terminal. `--json` output is exact instead."""
    return CONTROL_CHARACTERS.sub(lambda control: repr(control.group())[1:-1], text)


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"
    text = printable(str(value))
    return text if len(text) <= 80 else text[:77] + "..."


def _pairs(counts: dict[str, int]) -> str:
    return ", ".join(f"{printable(name)} {count}" for name, count in counts.items())


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [
        max(len(column), *(len(line[index]) for line in cells))
        for index, column in enumerate(columns)
    ]
    lines = ["  ".join(column.ljust(width) for column, width in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * width for width in widths))
    lines.extend(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in cells
    )
    return "\n".join(lines)
