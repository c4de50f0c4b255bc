"""`aircall-relay outbox ...`: statistics, listing, showing, requeueing and purging outbox rows.

Output is a plain table for people, or JSON with `--json` for scripts. Times are UTC, ISO-8601.
Exit codes: 0 done; 1 the database failed; 2 a bad option; 4 `show` found no such row.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio

from relay.db.engine import create_engine
from relay.db.inspect import EventFilter, OutboxInspector
from relay.db.transfer import TransferError, copy_outbox
from relay.settings import Settings, normalise_database_url

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


def add_outbox_commands(commands: Any) -> None:
    outbox = commands.add_parser(
        "outbox",
        help="inspect and manage outbox rows (stats, list, show, requeue, purge)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = outbox.add_subparsers(dest="outbox_command", required=True, metavar="ACTION")

    def add_filters(parser: argparse.ArgumentParser, statuses: Sequence[str]) -> None:
        parser.add_argument(
            "--status", action="append", choices=statuses, help="row status (repeatable)"
        )
        parser.add_argument("--event", action="append", help="Aircall event, e.g. call.ended")
        parser.add_argument("--key", help="ordering key, e.g. call:1903456789")
        parser.add_argument("--since", type=_moment, help="received at or after (ISO time or 2h)")
        parser.add_argument("--until", type=_moment, help="received before (ISO time or 30m)")

    stats = actions.add_parser(
        "stats",
        help="counts by status and event, oldest pending age, dead rows, calls awaiting call.ended",
    )
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.set_defaults(outbox_handler=_stats)

    listing = actions.add_parser("list", help="rows, newest first")
    add_filters(listing, STATUSES)
    listing.add_argument("--limit", type=int, default=50, help="at most this many rows (50)")
    listing.add_argument("--json", action="store_true", help="print JSON lines")
    listing.set_defaults(outbox_handler=_list)

    show = actions.add_parser("show", help="one row, its payload and its delivery requests")
    show.add_argument("reference", metavar="ID|MESSAGE_ID", help="receipt id or Segment messageId")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(outbox_handler=_show)

    requeue = actions.add_parser(
        "requeue",
        help="put rows back to pending (default: every dead row; narrow with filters)",
    )
    add_filters(requeue, ("dead", "skipped", "delivered"))
    requeue.add_argument("--id", type=int, action="append", help="receipt id (repeatable)")
    requeue.add_argument("--dry-run", action="store_true", help="count, change nothing")
    requeue.set_defaults(outbox_handler=_requeue)

    purge = actions.add_parser(
        "purge",
        help="delete old delivered (or skipped) rows in batches; never pending or dead rows",
    )
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
    add_copy_command(actions)


def add_copy_command(actions: Any) -> None:
    copy = actions.add_parser(
        "copy",
        help="copy a whole outbox from another database into this one (e.g. SQLite to PostgreSQL)",
        description="Copy every outbox row and delivery request, ids and statuses included, from "
        "--from URL into the database of RELAY_DATABASE_URL, which must be migrated and empty. "
        "Stop the relay that writes the source first.",
    )
    copy.add_argument(
        "--from",
        dest="source_url",
        required=True,
        metavar="URL",
        help="the database to copy from, e.g. sqlite:////var/lib/aircall-relay/outbox.sqlite3",
    )
    copy.add_argument("--batch-size", type=int, default=1000, help="rows per transaction (1000)")
    copy.set_defaults(outbox_handler=_copy)


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
    }
    if args.json:
        print(json.dumps(report, indent=2))
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
    print()
    rows = [
        {"event": event, **{status: counts.get(status, 0) for status in STATUSES}}
        for event, counts in sorted(stats.by_event.items())
    ]
    print(_table(rows, ["event", *STATUSES]) if rows else "the outbox is empty")
    return EXIT_OK


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
    if args.json:
        print(json.dumps(row, default=_json_default, indent=2))
        return EXIT_OK
    requests = row.pop("delivery_requests")
    payload = row.pop("payload")
    width = max(len(name) for name in row)
    for name, value in row.items():
        print(f"{name.ljust(width)}  {_cell(value)}")
    print("\npayload:")
    print(json.dumps(payload, indent=2, ensure_ascii=False))
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
    for status, days in (
        ("delivered", args.delivered_older_than),
        ("skipped", args.skipped_older_than),
    ):
        if days is None:
            continue
        count = await inspector.purge(
            status, now - timedelta(days=days), dry_run=args.dry_run, batch_size=args.batch_size
        )
        print(f"{verb} {count} {status} row(s) older than {days:g} day(s)")
    return EXIT_OK


async def _copy(args: argparse.Namespace, inspector: OutboxInspector, settings: Settings) -> int:
    source = create_engine(
        normalise_database_url(args.source_url),
        settings.database_timeout_seconds,
        statement_timeout_seconds=None,
    )
    try:
        result = await copy_outbox(source, inspector.engine, batch_size=args.batch_size)
    except TransferError as error:
        print(f"aircall-relay outbox copy: {error}", file=sys.stderr)
        return EXIT_USAGE
    finally:
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


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _pairs(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in counts.items())


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
