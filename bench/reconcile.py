"""Reconcile benchmark: `reconcile` over 10,000 calls of the fake Aircall, its limit off.

The outbox is filled first with the webhooks of those calls, as an outage would leave them: 80 %
complete (`call.created`, `call.hungup`, `call.ended`), 10 % awaiting `call.ended` (`call.created`
and `call.hungup` only), 10 % missing (no row), plus `--history` rows of other calls (three each,
already delivered), so that the look-ups search a table of a realistic size. The fake Aircall
(in this process, on loopback, `requests_per_minute=None`) holds the 10,000 calls; the client
runs with no pacing (`requests_per_minute=0`).

Each run is one `reconcile` without back-fill (the database is not changed: every run compares
the same outbox); it prints the calls compared per second over the whole run (listing through
HTTP, the look-ups, the verdicts, the run's record), the time of the outbox look-ups alone, and
their cost per call. Then one run with `--backfill` (2,000 calls to back-fill: one
`GET /v1/calls/{id}` and one conditional insert each), and the plans of the two statements
(EXPLAIN QUERY PLAN on SQLite, EXPLAIN on PostgreSQL) to show that they read the indexes.

Usage (from the repository root, with the project's virtualenv):

    .venv/bin/python bench/reconcile.py                        # SQLite, 10,000 calls, 3 runs
    .venv/bin/python bench/reconcile.py --database-url postgresql://postgres@127.0.0.1/

With `--database-url` the benchmark creates a scratch database on that server
(`relay_bench_reconcile_<pid>`, needs CREATEDB), runs `VACUUM ANALYZE` after filling it, and
drops it at the end. The figures are printed; there is no pass mark on speed. Exit status 0 when
every run found what the outbox holds (8,000 complete, 1,000 awaiting, 1,000 missing) and the
back-fill stored 2,000 rows, else 1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relay import aircall  # noqa: E402
from relay.aircall_api import AircallApi  # noqa: E402
from relay.db.engine import create_engine  # noqa: E402
from relay.db.migrate import upgrade_to_head  # noqa: E402
from relay.db.reconcile import (  # noqa: E402
    _CALL_ENDED_OF_CLAIMED,
    _CALLS_IN_OUTBOX,
    CallInOutbox,
    ReconcileStore,
    call_key,
    has_call_ended,
)
from relay.db.store import IncomingEvent, OutboxStore  # noqa: E402
from relay.db.tables import outbox  # noqa: E402
from relay.reconcile import AWAITING, COMPLETE, MISSING, reconcile  # noqa: E402
from relay.testing.fake_aircall import FakeAircall, sample_calls  # noqa: E402
from relay.testing.sample_payloads import sample_payload  # noqa: E402

API_ID, API_TOKEN = "bench-api-id", "bench-api-token-0123456789"


class TimedStore(ReconcileStore):
    """The store, with the time spent in the outbox look-ups added up."""

    lookup_seconds = 0.0

    async def calls_in_outbox(self, call_ids: Sequence[str]) -> dict[str, CallInOutbox]:
        started = time.perf_counter()
        try:
            return await super().calls_in_outbox(call_ids)
        finally:
            self.lookup_seconds += time.perf_counter() - started


def webhook(name: str, call_id: int, timestamp: int) -> IncomingEvent:
    body = sample_payload(name)
    body.pop("token", None)
    body["data"]["id"] = call_id
    body["timestamp"] = timestamp
    envelope = aircall.validate_envelope(body)
    return IncomingEvent(
        dedup_key=envelope.dedup_key,
        message_id=envelope.message_id,
        source="main",
        resource=envelope.resource,
        event=envelope.event,
        resource_id=envelope.resource_id,
        ordering_key=envelope.ordering_key,
        occurred_at=envelope.occurred_at,
        received_at=datetime.now(UTC) - timedelta(hours=2),
        payload=envelope.payload,
        forward=True,
    )


async def fill(url: str, calls: list[dict[str, Any]], history: int) -> None:
    engine = create_engine(url, timeout_seconds=30)
    store = OutboxStore(engine)
    events: list[IncomingEvent] = []
    for index, call in enumerate(calls):
        kind = index % 10
        names = () if kind == 9 else ("call.created", "call.hungup")
        names += ("call.ended",) if kind < 8 else ()
        events.extend(webhook(name, call["id"], call["ended_at"]) for name in names)
    for number in range(history):
        call_id = 5_000_000_000 + number
        events.extend(
            webhook(name, call_id, 1_700_000_000 + number)
            for name in ("call.created", "call.hungup", "call.ended")
        )
    try:
        for start in range(0, len(events), 1000):
            await store.insert_events(events[start : start + 1000])
        await store.close_writer()
        async with engine.begin() as connection:
            # History is delivered; the calls' rows are pending, as after an outage.
            await connection.execute(
                sa.text(
                    "UPDATE outbox SET status = 'delivered', delivered_at = received_at"
                    " WHERE ordering_key >= 'call:5000000000'"
                )
            )
    finally:
        await engine.dispose()


async def plans(url: str) -> list[str]:
    """The plans of the statements that read the outbox per call: the look-up, the condition of
    the back-fill's insert (its conflict check is the unique index on `dedup_key`), and the
    drainer's look at a claimed `call.ended`'s call."""
    keys = [call_key(str(1_000_000_001 + n)) for n in range(3)]
    exists = sa.select(sa.literal(1)).where(~has_call_ended(outbox.alias("ended"), keys[0]))
    statements = (
        ("calls_in_outbox (3 keys shown; 500 per statement)", _CALLS_IN_OUTBOX, {"keys": keys}),
        ("backfill_call_ended: its NOT EXISTS condition", exists, {}),
        ("the drainer: call.ended rows of claimed calls", _CALL_ENDED_OF_CLAIMED, {"ids": [1, 2]}),
    )
    engine = create_engine(url, timeout_seconds=2.0)
    prefix = "EXPLAIN QUERY PLAN " if engine.dialect.name == "sqlite" else "EXPLAIN "
    lines: list[str] = []
    try:
        async with engine.connect() as connection:
            for title, statement, parameters in statements:
                sql = statement.params(**parameters).compile(
                    dialect=engine.dialect, compile_kwargs={"literal_binds": True}
                )
                lines.append(f"-- {title}")
                rows = await connection.exec_driver_sql(prefix + str(sql))
                lines.extend(f"   {row[-1]}" for row in rows)
    finally:
        await engine.dispose()
    return lines


async def one_run(url: str, fake: FakeAircall, since: datetime, backfill: bool) -> dict[str, Any]:
    engine = create_engine(url, timeout_seconds=30, statement_timeout_seconds=None)
    store = TimedStore(engine)
    api = AircallApi(fake.base_url, API_ID, API_TOKEN, requests_per_minute=0)
    started = time.perf_counter()
    try:
        async with api:
            report = await reconcile(
                api,
                store,
                since=since,
                until=datetime.now(UTC),
                grace_seconds=3600,
                backfill=backfill,
                clock=lambda: datetime.now(UTC),
            )
    finally:
        await engine.dispose()
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "lookup_seconds": store.lookup_seconds,
        "calls": report.calls_seen,
        "complete": len(report.verdicts[COMPLETE]),
        "awaiting": len(report.verdicts[AWAITING]),
        "missing": len(report.verdicts[MISSING]),
        "backfilled": len(report.backfilled),
        "requests": api.requests,
    }


async def scratch_postgres(server_url: str, name: str, create: bool) -> str:
    admin = server_url.replace("postgresql+asyncpg://", "postgresql://").rstrip("/")
    connection = await asyncpg.connect(admin + "/postgres")
    try:
        if create:
            await connection.execute(f'CREATE DATABASE "{name}"')
        else:
            await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()
    return f"{admin}/{name}"


async def vacuum(url: str) -> None:
    connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await connection.execute("VACUUM ANALYZE outbox")
    finally:
        await connection.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--history", type=int, default=30_000, help="other calls, 3 rows each")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--database-url", help="a PostgreSQL server (a scratch database on it)")
    args = parser.parse_args()

    now = int(time.time())
    calls = sample_calls(args.calls, start=now - 3 * 3600 - args.calls * 2, spacing=2)
    since = datetime.fromtimestamp(calls[0]["started_at"] - 60, UTC)
    scratch = f"relay_bench_reconcile_{os.getpid()}"
    directory = tempfile.TemporaryDirectory(prefix="relay-bench-reconcile-")
    if args.database_url:
        url = asyncio.run(scratch_postgres(args.database_url, scratch, create=True))
    else:
        url = f"sqlite:///{directory.name}/outbox.sqlite3"
    ok = True
    try:
        upgrade_to_head(url)
        filled = time.perf_counter()
        asyncio.run(fill(url, calls, args.history))
        if args.database_url:
            asyncio.run(vacuum(url))
        rows = args.calls // 10 * 8 * 3 + args.calls // 10 * 2 + args.history * 3
        print(
            f"outbox: {rows:,} rows ({args.calls:,} calls reconciled, {args.history:,} other "
            f"calls), filled in {time.perf_counter() - filled:.1f} s; database: "
            f"{'PostgreSQL' if args.database_url else 'SQLite'}"
        )
        with FakeAircall(api_id=API_ID, api_token=API_TOKEN, requests_per_minute=None) as fake:
            fake.add_calls(calls)
            results = []
            for number in range(1, args.runs + 1):
                result = asyncio.run(one_run(url, fake, since, backfill=False))
                results.append(result)
                ok &= (result["complete"], result["awaiting"], result["missing"]) == (
                    args.calls * 8 // 10,
                    args.calls // 10,
                    args.calls // 10,
                )
                print(
                    f"run {number}: {result['calls']:,} calls compared in "
                    f"{result['seconds']:.2f} s = {result['calls'] / result['seconds']:,.0f} "
                    f"calls/s ({result['requests']} requests to the fake); outbox look-ups "
                    f"{result['lookup_seconds'] * 1000:.0f} ms = "
                    f"{result['lookup_seconds'] / result['calls'] * 1e6:.1f} us per call"
                )
            rate = statistics.median(r["calls"] / r["seconds"] for r in results)
            per_call = statistics.median(r["lookup_seconds"] / r["calls"] for r in results)
            print(
                f"median: {rate:,.0f} calls compared/s; look-ups {per_call * 1e6:.1f} us per call"
            )
            filled_run = asyncio.run(one_run(url, fake, since, backfill=True))
            ok &= filled_run["backfilled"] == args.calls // 5
            backfill_seconds = filled_run["seconds"] - statistics.median(
                r["seconds"] for r in results
            )
            print(
                f"with --backfill: {filled_run['backfilled']:,} call.ended stored in "
                f"{filled_run['seconds']:.2f} s (about "
                f"{backfill_seconds / max(filled_run['backfilled'], 1) * 1000:.2f} ms per call "
                "back-filled: one GET /v1/calls/{id} and one conditional insert)"
            )
        print("plans:")
        for line in asyncio.run(plans(url)):
            print(line)
    finally:
        if args.database_url:
            asyncio.run(scratch_postgres(args.database_url, scratch, create=False))
        directory.cleanup()
    if not ok:
        print("CHECK FAILED: the runs did not find what the outbox holds", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
