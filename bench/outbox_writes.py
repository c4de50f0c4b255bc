"""The receiver's SQLite write, alone: CPU and wall time per row of a group commit, by schema and
by way of writing.

`bench/receiver.py` measures the whole receiver, whose figures on a shared VM swing with the
machine's speed from one run to the next. This script measures only what the receiver's writer
thread does for one batch (`BEGIN IMMEDIATE`, the upsert of the batch's rows, reading back their
outcomes, `COMMIT` with `synchronous=FULL`), in this process's one thread, so that the variants are
compared in one run, on the same rows, interleaved round by round:

- `0003, as the receiver writes`: the schema before migration 0004 (a unique index on
  `message_id` too), written as the receiver does (`OutboxStore` through the SQLite writer:
  `executemany` of the one-row upsert, then one `SELECT ... IN` of the batch's outcomes);
- `0004, as the receiver writes`: the same before migration 0005 (three more indexes:
  `ix_outbox_ordering_key_occurred_at`, `ix_outbox_status_next_attempt_at` and the whole
  `ix_outbox_event_received_at`, where 0005 has a partial index on `call.hungup` rows);
- `head, as the receiver writes`: the same on the current schema;
- `head, one INSERT`: one multi-row `INSERT ... VALUES (...), (...)` for the whole batch instead
  of `executemany`, tried and not kept (see docs/performance.md);
- `head, packed SELECT`: the outcomes read back packed in one row (`group_concat`) instead of
  one row each, also tried and not kept.

The sqlite3 module gives up the GIL and takes it back around every step of a statement, and in
the receiver the event loop's thread may be holding it each time: the `steps` column counts the
steps per batch (`executemany` steps once per row, a fetch once per row).

Each variant gets an outbox of its own, migrated and pre-filled with `--rows` distinct events
(default 100,000; realistic payloads from the 26 samples, ids and timestamps varied, so every
insert is new), then writes `--batches` batches of `--batch-size` new events per round. CPU is
`time.thread_time()`; it includes the kernel's work for the WAL writes and the `fsync`.

Usage (from the repository root, with the project's virtualenv):

    .venv/bin/python bench/outbox_writes.py                     # 100,000 rows, 5 rounds
    .venv/bin/python bench/outbox_writes.py --rows 20000 --rounds 3 --batch-size 30

Exit status 0; there is no pass mark on speed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alembic import command  # noqa: E402

from relay import aircall  # noqa: E402
from relay.db.migrate import alembic_config  # noqa: E402
from relay.db.outbox_insert import IncomingEvent, OutboxInsert  # noqa: E402
from relay.db.sqlite_writer import SqliteWriter, _Queued  # noqa: E402

DEFAULT_EXAMPLES = ROOT / "relay" / "testing" / "samples"  # the samples the package ships


class Events:
    """Distinct incoming events, as the receiver builds them from a parsed body."""

    def __init__(self, examples: Path) -> None:
        self.samples = [json.loads(path.read_bytes()) for path in sorted(examples.glob("*.json"))]
        if not self.samples:
            raise SystemExit(f"no sample payloads in {examples}")
        self.number = 0

    def next(self) -> IncomingEvent:
        number = self.number
        self.number += 1
        body = json.loads(json.dumps(self.samples[number % len(self.samples)]))
        body.pop("token", None)
        body["data"]["id"] = 5_000_000_000 + number
        body["timestamp"] = 1_773_000_000 + number // 7
        raw = json.dumps(body).encode()
        envelope = aircall.validate_envelope(aircall.parse_body(raw), parsed=True)
        key = envelope.dedup_key
        now = datetime.now(UTC)
        return IncomingEvent(
            dedup_key=key,
            message_id=aircall.message_id_for(key),
            source="bench",
            resource=envelope.resource,
            event=envelope.event,
            resource_id=envelope.resource_id,
            ordering_key=aircall.ordering_key(envelope.resource, envelope.resource_id, key),
            occurred_at=envelope.occurred_at,
            received_at=now,
            payload=envelope.payload,
            forward=True,
        )


class CountingConnection:
    """A sqlite3 connection that counts statement steps (each one a GIL release and retake)."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection
        self.steps = 0

    def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        self.connection.executemany(sql, rows)
        self.steps += len(rows)

    def execute(self, sql: str, parameters: Any = ()) -> Any:
        cursor = self.connection.execute(sql, parameters)
        self.steps += 1
        return cursor


def write_one_insert(
    connection: CountingConnection, statement: OutboxInsert, rows: list[tuple[Any, ...]]
) -> dict[str, tuple[int, int, str]]:
    """The whole batch in one multi-row upsert, then the outcomes as the receiver reads them."""
    head, rest = statement.sql.split(" VALUES ", 1)
    group, tail = rest.split(") ON CONFLICT ", 1)
    sql = f"{head} VALUES {', '.join([group + ')'] * len(rows))} ON CONFLICT {tail}"
    connection.execute("BEGIN IMMEDIATE")
    connection.execute(sql, [value for row in rows for value in row])
    select, parameters = statement.select_outcomes([row[0] for row in rows])
    returned = connection.execute(select, parameters).fetchall()
    connection.steps += len(returned)
    connection.execute("COMMIT")
    return {key: (row_id, count, status) for row_id, key, count, status in returned}


def write_packed_select(
    connection: CountingConnection, statement: OutboxInsert, rows: list[tuple[Any, ...]]
) -> dict[str, tuple[int, int, str]]:
    """`executemany`, then the outcomes packed in one row by `group_concat`."""
    keys = [row[0] for row in rows]
    connection.execute("BEGIN IMMEDIATE")
    connection.executemany(statement.sql, rows)
    select = (
        "SELECT group_concat(id || char(31) || received_count || char(31) || status"
        f" || char(31) || dedup_key, char(30)) FROM outbox WHERE dedup_key IN"
        f" ({', '.join('?' * len(keys))})"
    )
    packed = connection.execute(select, keys).fetchone()[0]
    connection.steps += 1  # fetchone steps past its one row
    connection.execute("COMMIT")
    outcomes: dict[str, tuple[int, int, str]] = {}
    for record in packed.split("\x1e"):
        row_id, count, status, key = record.split("\x1f")
        outcomes[key] = (int(row_id), int(count), status)
    return outcomes


def write_as_the_receiver_does(
    writer: SqliteWriter, statement: OutboxInsert, rows: list[tuple[Any, ...]]
) -> dict[str, tuple[int, int, str]]:
    """The receiver's SQLite write as it is."""
    # What the writer's thread runs for one batch, run here, in this thread.
    queued = _Queued(statement.sqlite_work(rows))
    writer._transaction([queued])
    if queued.error is not None:
        raise queued.error
    return queued.result


class Variant:
    def __init__(self, revision: str, way: str, directory: Path) -> None:
        self.name = f"{revision}, {way}"
        self.path = directory / f"{len(list(directory.iterdir()))}.sqlite3"
        url = f"sqlite+aiosqlite:///{self.path}"
        command.upgrade(alembic_config(url), revision)
        self.statement = OutboxInsert("sqlite")
        self.way = way
        self.connection = self._connect()
        self.counting = CountingConnection(self.connection)
        self.writer = SqliteWriter(self._connect)
        self.cpu: list[float] = []
        self.wall: list[float] = []
        self.steps: list[float] = []

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "busy_timeout=5000"):
            connection.execute(f"PRAGMA {pragma}")
        return connection

    def write(self, rows: list[tuple[Any, ...]]) -> None:
        if self.way == "one INSERT":
            outcomes = write_one_insert(self.counting, self.statement, rows)
        elif self.way == "packed SELECT":
            outcomes = write_packed_select(self.counting, self.statement, rows)
        else:
            outcomes = write_as_the_receiver_does(self.writer, self.statement, rows)
        if len(outcomes) != len(rows):
            raise SystemExit(f"{self.name}: {len(outcomes)} outcomes for {len(rows)} rows")


def measure(variant: Variant, batches: list[list[tuple[Any, ...]]]) -> None:
    rows = sum(len(batch) for batch in batches)
    steps_before = variant.counting.steps
    cpu, wall = time.thread_time(), time.perf_counter()
    for batch in batches:
        variant.write(batch)
    variant.cpu.append((time.thread_time() - cpu) / rows * 1e6)
    variant.wall.append((time.perf_counter() - wall) / rows * 1e6)
    if variant.way == "as the receiver writes":  # BEGIN, a step per row, 1 + fetches, COMMIT
        variant.steps.append(float(2 * rows // len(batches) + 3))
    else:
        variant.steps.append((variant.counting.steps - steps_before) / len(batches))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows in each outbox first")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds per variant")
    parser.add_argument("--batches", type=int, default=100, help="batches per round")
    parser.add_argument("--batch-size", type=int, default=30, help="events per batch")
    parser.add_argument("--examples", type=Path, default=DEFAULT_EXAMPLES, help="sample payloads")
    parser.add_argument("--dir", type=Path, help="parent of the temporary directory")
    args = parser.parse_args(argv)

    events = Events(args.examples)
    directory = Path(tempfile.mkdtemp(prefix="relay-bench-writes-", dir=args.dir))
    try:
        variants = [
            Variant("0003", "as the receiver writes", directory),
            Variant("0004", "as the receiver writes", directory),
            Variant("head", "as the receiver writes", directory),
            Variant("head", "one INSERT", directory),
            Variant("head", "packed SELECT", directory),
        ]
        statement = variants[0].statement  # every variant's is the same

        def row(item: IncomingEvent) -> tuple[Any, ...]:
            return statement.row(item, 1, datetime.now(UTC))

        print(
            f"pre-filling {len(variants)} outboxes with {args.rows:,} rows each "
            f"({len(events.samples)} sample payloads, SQLite {sqlite3.sqlite_version})",
            flush=True,
        )
        for start in range(0, args.rows, 1000):
            prefill = [row(events.next()) for _ in range(min(1000, args.rows - start))]
            for variant in variants:
                write_as_the_receiver_does(variant.writer, variant.statement, prefill)
        for number in range(1, args.rounds + 1):
            for variant in variants:  # each variant gets new events, the same kind and size
                batches = [
                    [row(events.next()) for _ in range(args.batch_size)]
                    for _ in range(args.batches)
                ]
                measure(variant, batches)
            print(
                f"round {number}: " + ", ".join(f"{v.name} {v.cpu[-1]:.0f} µs" for v in variants),
                flush=True,
            )
        print()
        print(
            f"medians of {args.rounds} rounds of {args.batches} batches of {args.batch_size}, "
            f"on outboxes of {args.rows:,}+ rows (µs per row; steps per batch):"
        )
        base = statistics.median(variants[0].cpu)
        for variant in variants:
            cpu = statistics.median(variant.cpu)
            print(
                f"  {variant.name:<30} cpu {cpu:6.1f}  wall {statistics.median(variant.wall):6.1f}"
                f"  steps {statistics.median(variant.steps):5.0f}  cpu vs first {cpu / base:.2f}"
            )
        for variant in variants:
            variant.connection.close()
            variant.writer._discard()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
