"""Drainer benchmark: how fast a backlog empties into Segment, and how long an event waits between
its receipt and Segment's acceptance under a steady load.

`throughput` fills an outbox with a backlog of realistic webhooks (the life cycles of many calls,
with contacts, users and numbers in between, built from the 26 sample payloads; every event
distinct, received in the past, so all of them are settled), then runs `aircall-relay drain
--once` with the limits off (no token buckets, no settle window) against the fake Segment in a
process of its own (`aircall-relay fake-segment --no-keep-request-bodies`), the drainer pinned to
one CPU and the fake to the other. It prints, for each run: events/s (delivered events over the
time from the first request's start to the last one's end, from `delivery_requests`), the whole
process's wall time, CPU seconds per 1,000 events (user + system of the drainer process, start-up
included, from `os.wait4`), and the drainer's peak RSS (VmHWM, polled until it exits); then the
medians per backlog size. Each run starts from a copy of the same filled database.

`throughput --drainers 1,2,4` drains the backlog with several drainers at once instead: for each
count, that many long-running `aircall-relay drain` processes (`--once` does not suit several: a
drainer whose claim finds every key held by the others would take that for the end), started
with their imports done and let go together, stopped with SIGTERM once no row is pending or in
flight. Nothing is pinned: the drainers, the fake and the database share every core. Each line
gives events/s (same window as above) and the CPU of each party over the drain, in % of one
core: the drainers (and per 1,000 events), the PostgreSQL backends serving the run's database
and the server's background processes (from /proc, when the server runs on this machine), the
fake, this script, everything else, and the whole machine. A drain during which other processes
took more than a fifth of a core is marked DISTURBED and measured again (`--retries`), and each
drain waits first for a quiet second (`--quiet-wait`). The medians end with each count's rate
against the first count's in the same run.

`latency` starts the fake, `aircall-relay serve` and `aircall-relay drain` with the default
settle window and limits, posts distinct webhooks at a fixed rate (open loop) over loopback, waits
until every event is delivered and prints receipt-to-acceptance latency percentiles: receipt is
the outbox's `received_at` (set by the receiver), acceptance the fake's `receivedAt` of the
message with that `messageId` (both the wall clock of this machine).

Both check the result at the end: every outbox row `delivered`, each messageId accepted exactly
once by the fake, nothing discarded, no duplicates, and each ordering key's events accepted in
the relay's delivery order (Aircall timestamp, life-cycle rank, receipt id), none flagged late.

Usage (from the repository root, with the project's virtualenv):

    .venv/bin/python bench/drainer.py throughput                       # 100,000 rows, 3 runs
    .venv/bin/python bench/drainer.py throughput --rows 10000,100000 --runs 3
    .venv/bin/python bench/drainer.py throughput --database-url postgresql://postgres@127.0.0.1/
    .venv/bin/python bench/drainer.py throughput --rows 20000 --drainers 1,2,4 \
        --database-url postgresql://postgres@127.0.0.1/
    .venv/bin/python bench/drainer.py latency                          # 200 webhooks/s for 60 s
    .venv/bin/python bench/drainer.py latency --rate 200 --seconds 60

With `--database-url` (PostgreSQL only) the benchmark creates scratch databases on that server
(`relay_bench_drainer_<pid>_...`, needs CREATEDB) and drops them at the end. There the backlog
comes after as many rows of history, already delivered (`--history`), and the filled database
gets `VACUUM ANALYZE`, as autovacuum would: PostgreSQL plans the drainer's statements from the
table's statistics, and with those of a table where every row is pending, recording a request
reads every delivered row. Each `--drainers` drain starts after a `CHECKPOINT` (skipped without
the right to it).

Everything talks to 127.0.0.1 only, and every wait is bounded. Exit status: 0 when every check
passed, 1 otherwise (the figures are printed either way; there is no pass mark on speed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import re
import resource
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proc_cpu import PostgresCpu, busy_cpu_seconds, wait_for_quiet  # noqa: E402
from sqlalchemy import text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from relay import aircall  # noqa: E402
from relay.db.engine import create_engine  # noqa: E402
from relay.db.store import IncomingEvent, OutboxStore  # noqa: E402
from relay.db.tables import utc_datetime  # noqa: E402

DEFAULT_EXAMPLES = ROOT / "relay" / "testing" / "samples"  # the samples the package ships
HOST = "127.0.0.1"  # everything here talks to loopback only
TOKEN = "7c2e91a04bd35f6e8a1d0c9b47f2e6a3"  # the sample payloads' token
WRITE_KEY = "wk_bench_drainer_0123456789"
WEBHOOK_PATH = "/aircall/webhook"

# ---------------------------------------------------------------------------------------------
# Workload: realistic life cycles of calls, contacts, users and numbers

# A call's events (their offsets, seconds after call.created, come from the samples' timestamps).
CALL_EVENTS: tuple[str, ...] = aircall.SAMPLE_CALL_EVENTS
VOICEMAIL_EVENT = "call.voicemail_left"  # every fourth call, 20 s after call.ended
OTHER_LIFECYCLES: dict[str, tuple[str, ...]] = {
    "contact": ("contact.created", "contact.updated", "contact.deleted"),
    "user": (
        "user.created",
        "user.opened",
        "user.connected",
        "user.disconnected",
        "user.closed",
        "user.deleted",
    ),
    "number": ("number.created", "number.opened", "number.closed", "number.deleted"),
}
OTHER_STEP_SECONDS = 30.0  # between two events of a contact, user or number
# Of every 20 entities: 16 calls, 2 contacts, 1 user, 1 number (about 93 % call events).
ENTITY_CYCLE: tuple[str, ...] = ("call",) * 8 + ("contact",) + ("call",) * 8 + ("contact",)
ENTITY_CYCLE += ("user", "number")
_ID_MARK = "918273645501"
_TS_MARK = "918273645502"
_FIRST_ID = 7_000_000_000  # above any id in the samples


@dataclass(frozen=True, slots=True)
class PlannedEvent:
    at: float  # virtual seconds from the start of the workload
    entity: int
    name: str


class Workload:
    """Distinct webhook bodies in the order Aircall would send them: many entities (mostly calls)
    overlapping in time, each with its own id, events at the samples' offsets (scaled)."""

    def __init__(self, examples: Path, time_scale: float = 1.0) -> None:
        files = {path.stem: path for path in sorted(examples.glob("*.json"))}
        if len(files) < 26:
            raise SystemExit(f"expected the 26 sample payloads in {examples} (use --examples)")
        self.templates: dict[str, tuple[str, str]] = {}
        timestamps: dict[str, int] = {}
        for name, path in files.items():
            body = json.loads(path.read_text())
            timestamps[name] = int(body["timestamp"])
            body["data"]["id"] = int(_ID_MARK)
            body["timestamp"] = int(_TS_MARK)
            text_body = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
            if text_body.count(_ID_MARK) != 1 or text_body.count(_TS_MARK) != 1:
                raise SystemExit(f"sample {name} collides with the benchmark's markers")
            self.templates[name] = (text_body, body["resource"])
        created = timestamps["call.created"]
        self.call_offsets = {
            name: (timestamps[name] - created) * time_scale for name in CALL_EVENTS
        }
        self.voicemail_offset = self.call_offsets["call.ended"] + 20 * time_scale
        self.other_step = OTHER_STEP_SECONDS * time_scale

    @property
    def events_per_entity(self) -> float:
        """The mean number of events per entity (a fourth of the calls leave a voicemail)."""
        counts = [
            len(CALL_EVENTS) + 0.25 if kind == "call" else len(OTHER_LIFECYCLES[kind])
            for kind in ENTITY_CYCLE
        ]
        return sum(counts) / len(counts)

    def plan(self, events: int, entity_spacing: float) -> list[PlannedEvent]:
        """The first `events` events, in order of sending, entities starting `entity_spacing`
        virtual seconds apart."""
        entities = int(events / self.events_per_entity) + 64
        while True:
            planned = list(self._events(entities, entity_spacing))
            planned.sort(key=lambda item: (item.at, item.entity))
            # Keep a prefix in time: complete up to a point, like a backlog or a live stream.
            if len(planned) >= events and planned[events - 1].at <= entities * entity_spacing:
                return planned[:events]
            entities *= 2

    def _events(self, entities: int, spacing: float) -> Iterator[PlannedEvent]:
        calls = 0
        for entity in range(entities):
            start = entity * spacing
            kind = ENTITY_CYCLE[entity % len(ENTITY_CYCLE)]
            if kind == "call":
                for name in CALL_EVENTS:
                    yield PlannedEvent(start + self.call_offsets[name], entity, name)
                if calls % 4 == 3:
                    yield PlannedEvent(start + self.voicemail_offset, entity, VOICEMAIL_EVENT)
                calls += 1
            else:
                for step, name in enumerate(OTHER_LIFECYCLES[kind]):
                    yield PlannedEvent(start + step * self.other_step, entity, name)

    def body(self, event: PlannedEvent, epoch: float, token: str | None) -> dict[str, Any]:
        """The webhook of `event`, Aircall's timestamp `epoch` + its virtual time."""
        template, _ = self.templates[event.name]
        text_body = template.replace(_ID_MARK, str(_FIRST_ID + event.entity), 1).replace(
            _TS_MARK, str(int(epoch + event.at)), 1
        )
        body: dict[str, Any] = json.loads(text_body)
        if token is None:
            body.pop("token", None)
        else:
            body["token"] = token
        return body


def incoming(body: dict[str, Any], received_at: datetime) -> IncomingEvent:
    """The outbox row the receiver would write for `body`."""
    envelope = aircall.validate_envelope(body)
    dedup_key = envelope.dedup_key
    return IncomingEvent(
        dedup_key=dedup_key,
        message_id=aircall.message_id_for(dedup_key),
        source="bench",
        resource=envelope.resource,
        event=envelope.event,
        resource_id=envelope.resource_id,
        ordering_key=aircall.ordering_key(envelope.resource, envelope.resource_id, dedup_key),
        occurred_at=envelope.occurred_at,
        received_at=received_at,
        payload=envelope.payload,
        forward=True,
    )


# ---------------------------------------------------------------------------------------------
# Databases


class Databases:
    """Scratch databases: SQLite files in the work directory, or PostgreSQL databases created on
    the given server (and dropped by `cleanup`)."""

    def __init__(self, workdir: Path, server_url: str | None) -> None:
        self.workdir = workdir
        self.server_url = server_url
        self.created: list[str] = []
        if server_url is not None and not server_url.startswith("postgresql"):
            raise SystemExit("--database-url: only a PostgreSQL server URL is supported")

    @property
    def kind(self) -> str:
        return "SQLite" if self.server_url is None else "PostgreSQL"

    def url(self, name: str) -> str:
        if self.server_url is None:
            return f"sqlite:///{self.workdir / (name + '.sqlite3')}"
        database = f"relay_bench_drainer_{os.getpid()}_{name}"
        return make_url(self.server_url).set(database=database).render_as_string(False)

    def create(self, name: str) -> str:
        url = self.url(name)
        if self.server_url is not None:
            database = make_url(url).database
            asyncio.run(self._admin(f'DROP DATABASE IF EXISTS "{database}"'))
            asyncio.run(self._admin(f'CREATE DATABASE "{database}"'))
            self.created.append(str(database))
        return url

    def copy(self, template: str, name: str) -> str:
        """A new database with the content of `template`."""
        url = self.url(name)
        if self.server_url is None:
            source = self.workdir / f"{template}.sqlite3"
            target = self.workdir / f"{name}.sqlite3"
            for suffix in ("", "-wal", "-shm"):
                Path(f"{target}{suffix}").unlink(missing_ok=True)
            shutil.copyfile(source, target)
        else:
            database = make_url(url).database
            source_database = make_url(self.url(template)).database
            asyncio.run(self._admin(f'DROP DATABASE IF EXISTS "{database}"'))
            asyncio.run(self._admin(f'CREATE DATABASE "{database}" TEMPLATE "{source_database}"'))
            self.created.append(str(database))
        return url

    def drop(self, name: str) -> None:
        if self.server_url is None:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.workdir / (name + '.sqlite3')}{suffix}").unlink(missing_ok=True)
        else:
            database = str(make_url(self.url(name)).database)
            asyncio.run(self._admin(f'DROP DATABASE IF EXISTS "{database}"'))
            with contextlib.suppress(ValueError):
                self.created.remove(database)

    def cleanup(self) -> None:
        for database in list(self.created):
            with contextlib.suppress(Exception):
                asyncio.run(self._admin(f'DROP DATABASE IF EXISTS "{database}"'))
        self.created.clear()

    async def _admin(self, statement: str) -> None:
        assert self.server_url is not None
        connection = await pg_connect(self.server_url, database="postgres")
        try:
            await connection.execute(statement)
        finally:
            await connection.close()


async def pg_connect(database_url: str, database: str | None = None) -> Any:
    """A plain asyncpg connection to the PostgreSQL database of the URL (or `database`)."""
    import asyncpg

    url = make_url(database_url)
    return await asyncpg.connect(
        host=url.host or HOST,
        port=url.port or 5432,
        user=url.username or "postgres",
        password=url.password,
        database=database or url.database or "postgres",
        timeout=10,
    )


def relay_env(database_url: str | None, **settings: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("RELAY_")}
    env.update({"RELAY_LOG_FORMAT": "json", "RELAY_LOG_LEVEL": "INFO", "PYTHONPATH": str(ROOT)})
    if _setting_exists("receiver_metrics_port"):  # nothing here scrapes the receiver
        env["RELAY_RECEIVER_METRICS_PORT"] = "off"
    if database_url is not None:
        env["RELAY_DATABASE_URL"] = database_url
    env.update({f"RELAY_{name.upper()}": value for name, value in settings.items()})
    return env


def migrate(database_url: str) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "relay.cli", "migrate"],
        env=relay_env(database_url),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if completed.returncode != 0:
        raise SystemExit(f"migrate failed:\n{completed.stdout}{completed.stderr}")


async def fill(
    database_url: str, rows: Sequence[IncomingEvent], delivered: int = 0, batch: int = 1000
) -> int:
    """Insert the rows as the receiver would, the first `delivered` of them then marked
    delivered (history); returns the id of the last of those (0 for none)."""
    # 1,000 rows per group commit, as the receiver writes them (at most 256 there).
    engine = create_engine(database_url, timeout_seconds=30)
    store = OutboxStore(engine)
    last_history_id = 0
    try:
        for start in range(0, len(rows), batch):
            await store.insert_events(rows[start : start + batch])
        if delivered > 0:
            async with engine.begin() as connection:
                if database_url.startswith("postgresql"):
                    # One UPDATE of the whole history may outlast the relay's statement timeout.
                    await connection.execute(text("SET LOCAL statement_timeout = 0"))
                ids = (
                    await connection.execute(
                        text("SELECT id FROM outbox ORDER BY id LIMIT :n"), {"n": delivered}
                    )
                ).all()
                last_history_id = int(ids[-1][0])
                await connection.execute(
                    text(
                        "UPDATE outbox SET status = 'delivered', attempts = 1, "
                        "delivered_at = received_at, next_attempt_at = NULL WHERE id <= :last"
                    ),
                    {"last": last_history_id},
                )
    finally:
        with contextlib.suppress(Exception):
            await store.close_writer()
        await engine.dispose()
    if database_url.startswith("postgresql"):
        # Statistics and a visibility map, as autovacuum would make after such a load (the test
        # server runs with autovacuum off). The drainer's plans depend on them: with statistics
        # of an outbox where every row is pending (no history), PostgreSQL plans the `late` check
        # of a request's record on the (status, id) index, and reads every delivered row for
        # each row it records.
        connection = await pg_connect(database_url)
        try:
            await connection.execute("VACUUM ANALYZE outbox")
            await connection.execute("VACUUM ANALYZE delivery_requests")
        finally:
            await connection.close()
    path = make_url(database_url).database
    if database_url.startswith("sqlite") and path:  # everything into the main file, for copies
        connection = sqlite3.connect(path)
        try:
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            connection.close()
    return last_history_id


async def query(database_url: str, sql: str) -> list[Any]:
    engine = create_engine(database_url, timeout_seconds=30)
    try:
        async with engine.connect() as connection:
            return list(await connection.execute(text(sql)))
    finally:
        await engine.dispose()


# ---------------------------------------------------------------------------------------------
# Processes


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 1024 / 1024:.0f} GiB RAM"
    return (
        f"{os.cpu_count()} cores ({model}){memory}, Linux {os.uname().release}, Python "
        + (sys.version.split()[0])
    )


def peak_rss_kib(pid: int) -> int:
    """The peak resident set size of a live process so far (VmHWM), 0 once it is gone.

    Not `ru_maxrss`: Linux carries a process's high-water mark over fork and exec into its
    children, so a child of this (large) script would report this script's peak as its own.
    """
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Child:
    """A subprocess with its output in a log file, optionally pinned to CPUs."""

    def __init__(
        self,
        name: str,
        command: list[str],
        env: dict[str, str],
        workdir: Path,
        cpus: set[int],
        stdin: bool = False,
    ) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self._log: TextIO = self.log_path.open("w")
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        if cpus:  # threads started later inherit this
            with contextlib.suppress(OSError):
                os.sched_setaffinity(self.process.pid, cpus)
        self.rusage: resource.struct_rusage | None = None
        self.ended: float | None = None
        self.peak_rss_kib = 0

    def wait_for_line(self, pattern: re.Pattern[str], within: float = 30.0) -> re.Match[str]:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            for line in self.log_path.read_text().splitlines():
                found = pattern.search(line)
                if found:
                    return found
            if self.process.poll() is not None:
                raise SystemExit(f"{self.name} exited:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.05)
        self.stop()
        raise SystemExit(f"{self.name} did not print {pattern.pattern!r} within {within:g} s")

    def wait(self, within: float) -> int | None:
        """Reap the process (its rusage kept); None if it is still running after `within`."""
        deadline = time.monotonic() + within
        while True:
            self.peak_rss_kib = max(self.peak_rss_kib, peak_rss_kib(self.process.pid))
            pid, status, usage = os.wait4(self.process.pid, os.WNOHANG)
            if pid:
                self.ended = time.monotonic()
                self.rusage = usage
                self.process.returncode = os.waitstatus_to_exitcode(status)
                self._log.close()
                return self.process.returncode
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)

    def stop(self, within: float = 30.0) -> None:
        if self.process.stdin is not None and not self.process.stdin.closed:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        if self.process.returncode is None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            if self.wait(within) is None:
                self.process.kill()
                self.wait(10)
        if not self._log.closed:
            self._log.close()


# `aircall-relay fake-segment`, with the fake's cyclic garbage collector off. The fake keeps
# every message it accepts (100,000 messages are about a gigabyte of dicts); with the collector
# on, its full collections over that growing heap pause it for hundreds of milliseconds at a time
# late in a run, and the drainer would be measured waiting for the fake.
FAKE_LAUNCHER = (
    "import gc, sys; gc.disable(); from relay.cli import main; sys.exit(main(sys.argv[1:]))"
)


def start_fake(workdir: Path, cpus: set[int], name: str = "fake-segment") -> tuple[Child, str]:
    child = Child(
        name,
        [
            sys.executable,
            "-c",
            FAKE_LAUNCHER,
            "fake-segment",
            "--host",
            HOST,
            "--port",
            "0",
            "--write-key",
            WRITE_KEY,
            "--no-keep-request-bodies",
        ],
        relay_env(None),
        workdir,
        cpus,
    )
    found = child.wait_for_line(re.compile(r"fake-segment listening on (http://\S+)"))
    return child, found.group(1)


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (NaN for no values)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1))
    return ordered[rank]


# ---------------------------------------------------------------------------------------------
# Checks


def _lifecycle_order(row: Any) -> tuple[datetime, int, int]:
    return (utc_datetime(row.occurred_at), aircall.lifecycle_rank(row.event), int(row.id))


def fetch_accepted(base_url: str, page: int = 5000) -> list[dict[str, Any]]:
    """messageId, receivedAt, request_seq and position of every message the fake accepted."""
    import httpx

    kept: list[dict[str, Any]] = []
    with httpx.Client(base_url=base_url, timeout=120) as client:
        offset = 0
        while True:
            answer = client.get(
                "/__fake/accepted", params={"offset": str(offset), "limit": str(page)}
            )
            answer.raise_for_status()
            messages = answer.json()
            kept.extend(
                {
                    "messageId": message["messageId"],
                    "receivedAt": message["receivedAt"],
                    "request_seq": message["request_seq"],
                    "position": message["position"],
                }
                for message in messages
            )
            if len(messages) < page:
                return kept
            offset += page


@dataclass
class Verdict:
    problems: list[str] = field(default_factory=list)

    def check(self, condition: bool, problem: str) -> None:
        if not condition:
            self.problems.append(problem)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(
    database_url: str, fake_url: str, expected_rows: int, after_id: int = 0
) -> tuple[Verdict, list[Any], dict[str, dict[str, Any]]]:
    """Every row delivered, each messageId accepted once, nothing discarded, per-key order kept
    (rows after `after_id`: those before are history, delivered before the run).

    Returns the verdict, the outbox rows and the fake's accepted messages by messageId.
    """
    verdict = Verdict()
    rows = asyncio.run(
        query(
            database_url,
            "SELECT id, message_id, ordering_key, event, occurred_at, received_at, status, late "
            f"FROM outbox WHERE id > {int(after_id)} ORDER BY id",
        )
    )
    statuses = Counter(row.status for row in rows)
    verdict.check(len(rows) == expected_rows, f"{len(rows)} outbox rows, expected {expected_rows}")
    verdict.check(statuses["delivered"] == len(rows), f"not every row delivered: {dict(statuses)}")
    late = sum(1 for row in rows if row.late)
    verdict.check(late == 0, f"{late} rows flagged late")
    import httpx

    answer = httpx.get(f"{fake_url}/__fake/stats", timeout=120)
    answer.raise_for_status()
    stats = answer.json()
    verdict.check(stats["discarded"] == 0, f"the fake discarded {stats['discarded']} messages")
    verdict.check(stats["duplicates"] == 0, f"the fake saw {stats['duplicates']} duplicates")
    accepted_list = fetch_accepted(fake_url)
    accepted = {message["messageId"]: message for message in accepted_list}
    verdict.check(len(accepted) == len(accepted_list), "a messageId was accepted more than once")
    missing = [row.message_id for row in rows if row.message_id not in accepted]
    verdict.check(not missing, f"{len(missing)} messageIds never accepted")
    extra = len(accepted) - (len(rows) - len(missing))
    verdict.check(extra == 0, f"{extra} accepted messageIds not in the outbox")
    # Per key: the fake accepted the events in the relay's delivery order.
    by_key: dict[str, list[Any]] = {}
    for row in rows:
        by_key.setdefault(row.ordering_key, []).append(row)
    out_of_order = 0
    for key_rows in by_key.values():
        key_rows.sort(key=_lifecycle_order)
        positions = [
            (accepted[row.message_id]["request_seq"], accepted[row.message_id]["position"])
            for row in key_rows
            if row.message_id in accepted
        ]
        out_of_order += sum(1 for a, b in itertools.pairwise(positions) if a >= b)
    verdict.check(out_of_order == 0, f"{out_of_order} events accepted before an earlier one")
    return verdict, rows, accepted


# ---------------------------------------------------------------------------------------------
# throughput


@dataclass
class DrainRun:
    rows: int
    number: int
    delivered: int = 0
    requests: int = 0
    window_seconds: float = 0.0
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    max_rss_kib: int = 0
    fake_cpu_seconds: float = 0.0
    ok: bool = False

    @property
    def rate(self) -> float:
        return self.delivered / self.window_seconds if self.window_seconds else 0.0

    @property
    def cpu_per_thousand(self) -> float:
        return 1000 * self.cpu_seconds / self.delivered if self.delivered else float("nan")

    def line(self) -> str:
        return (
            f"  rows {self.rows:>7,} run {self.number}: {self.rate:7,.0f} events/s"
            f" ({self.delivered:,} in {self.window_seconds:5.1f} s, {self.requests:,} requests;"
            f" process wall {self.wall_seconds:5.1f} s)"
            f"  CPU {self.cpu_per_thousand:5.3f} s/1,000 events"
            f" ({100 * self.cpu_seconds / max(self.wall_seconds, 1e-9):3.0f}% of a core)"
            f"  peak RSS {self.max_rss_kib / 1024:5.1f} MiB"
            f"  fake CPU {100 * self.fake_cpu_seconds / max(self.wall_seconds, 1e-9):3.0f}%"
            f"  {'ok' if self.ok else 'FAILED'}"
        )


def drain_once(
    databases: Databases,
    template: str,
    rows: int,
    number: int,
    workdir: Path,
    cpus: tuple[set[int], set[int]],
    extra_env: dict[str, str],
    after_id: int = 0,
) -> DrainRun:
    run = DrainRun(rows=rows, number=number)
    name = f"run_{rows}_{number}"
    database_url = databases.copy(template, name)
    drainer_cpus, fake_cpus = cpus
    fake, fake_url = start_fake(workdir, fake_cpus, name=f"fake-{name}")
    try:
        env = relay_env(
            database_url,
            segment_write_key=WRITE_KEY,
            segment_base_url=fake_url,
            segment_events_per_second="0",
            segment_requests_per_second="0",
            settle_seconds="0",
            **extra_env,
        )
        fake_cpu_before = cpu_seconds(fake.process.pid)
        drainer = Child(
            f"drain-{name}",
            [sys.executable, "-m", "relay.cli", "drain", "--once"],
            env,
            workdir,
            drainer_cpus,
        )
        code = drainer.wait(within=max(300.0, rows / 200))
        if code is None:
            drainer.stop()
            print(f"  the drainer did not finish in time; log: {drainer.log_path}")
            return run
        run.fake_cpu_seconds = cpu_seconds(fake.process.pid) - fake_cpu_before
        assert drainer.rusage is not None
        assert drainer.ended is not None
        run.wall_seconds = drainer.ended - drainer.started
        run.cpu_seconds = drainer.rusage.ru_utime + drainer.rusage.ru_stime
        run.max_rss_kib = drainer.peak_rss_kib
        summary = _summary(drainer.log_path)
        if code != 0 or summary is None:
            print(f"  drain exited {code}; log: {drainer.log_path}")
            return run
        run.delivered = int(summary["delivered"])
        window = asyncio.run(
            query(
                database_url,
                "SELECT min(started_at), max(finished_at), count(*), "
                "coalesce(sum(event_count), 0) FROM delivery_requests "
                "WHERE outcome = 'delivered'",
            )
        )[0]
        run.window_seconds = (utc_datetime(window[1]) - utc_datetime(window[0])).total_seconds()
        run.requests = int(window[2])
        verdict, _, _ = verify(database_url, fake_url, rows, after_id)
        verdict.check(summary.get("dead", 0) == 0, f"{summary.get('dead')} rows went dead")
        verdict.check(run.delivered == rows, f"summary says {run.delivered} delivered of {rows}")
        verdict.check(int(window[3]) == rows, f"delivery_requests carried {window[3]} events")
        for problem in verdict.problems:
            print(f"  CHECK FAILED: {problem}")
        run.ok = verdict.ok
        return run
    finally:
        fake.stop()
        databases.drop(name)


# `aircall-relay drain` (long-running) started with its imports done and then held until this
# script writes a line to its stdin, so that several drainers begin claiming together.
GATED_DRAIN = (
    "import sys; from relay.cli import main; print('bench-drainer-ready', flush=True); "
    "sys.stdin.readline(); sys.exit(main(sys.argv[1:]))"
)


@dataclass
class PoolRun:
    """One drain of the backlog by several long-running drainers; CPU over `span_seconds`
    (from the go to the moment every row was seen delivered)."""

    rows: int
    number: int
    drainers: int
    delivered: int = 0
    requests: int = 0
    window_seconds: float = 0.0
    span_seconds: float = 0.0
    drainers_cpu: float = 0.0
    fake_cpu: float = 0.0
    pg_backends_cpu: float = 0.0
    pg_server_cpu: float = 0.0
    pg_measured: bool = False
    script_cpu: float = 0.0
    busy_cpu: float = 0.0  # the whole machine
    max_rss_kib: int = 0
    rows_read: int | None = None  # outbox rows read by PostgreSQL (index and sequential scans)
    ok: bool = False

    @property
    def rate(self) -> float:
        return self.delivered / self.window_seconds if self.window_seconds else 0.0

    @property
    def rows_read_per_event(self) -> float:
        if self.rows_read is None or not self.delivered:
            return float("nan")
        return self.rows_read / self.delivered

    @property
    def other_cpu(self) -> float:
        """CPU of everything else on the machine meanwhile (other people's work)."""
        ours = self.drainers_cpu + self.fake_cpu + self.script_cpu
        ours += self.pg_backends_cpu + self.pg_server_cpu
        return max(0.0, self.busy_cpu - ours)

    @property
    def disturbed(self) -> bool:
        """Other processes took more than a fifth of a core during the drain."""
        return self.other_cpu > 0.2 * self.span_seconds

    def share(self, cpu_seconds: float) -> float:
        """Percent of one core over the span."""
        return 100 * cpu_seconds / self.span_seconds if self.span_seconds else float("nan")

    def per_thousand(self, cpu_seconds: float) -> float:
        return 1000 * cpu_seconds / self.delivered if self.delivered else float("nan")

    def line(self) -> str:
        pg = (
            f"PostgreSQL {self.share(self.pg_backends_cpu):3.0f}% backends"
            f" ({self.per_thousand(self.pg_backends_cpu):5.3f} s/1,000)"
            f" + {self.share(self.pg_server_cpu):2.0f}% server"
            if self.pg_measured
            else "PostgreSQL not measured"
        )
        return (
            f"  rows {self.rows:>7,} run {self.number}, {self.drainers} drainer(s):"
            f" {self.rate:7,.0f} events/s ({self.delivered:,} in {self.window_seconds:5.1f} s,"
            f" {self.requests:,} requests)"
            f" | CPU, % of a core: drainers {self.share(self.drainers_cpu):3.0f}%"
            f" ({self.per_thousand(self.drainers_cpu):5.3f} s/1,000 events), {pg},"
            f" fake {self.share(self.fake_cpu):2.0f}%, script {self.share(self.script_cpu):2.0f}%,"
            f" others {self.share(self.other_cpu):2.0f}%; machine"
            f" {self.share(self.busy_cpu):3.0f}% of {100 * (os.cpu_count() or 1)}%"
            + (
                f" | outbox rows read {self.rows_read_per_event:4.0f} per event"
                if self.rows_read is not None
                else ""
            )
            + f" | peak RSS {self.max_rss_kib / 1024:5.1f} MiB"
            f"  {'ok' if self.ok else 'FAILED'}" + ("  DISTURBED" if self.disturbed else "")
        )


def drain_with_pool(
    databases: Databases,
    template: str,
    rows: int,
    number: int,
    drainers: int,
    workdir: Path,
    extra_env: dict[str, str],
    after_id: int = 0,
) -> PoolRun:
    """Drain a copy of the backlog with `drainers` long-running `aircall-relay drain` processes,
    stopped with SIGTERM once every row is delivered (`--once` does not suit several: a drainer
    whose claim finds every key held by the others would take that for the end)."""
    run = PoolRun(rows=rows, number=number, drainers=drainers)
    name = f"run_{rows}_{number}_n{drainers}"
    database_url = databases.copy(template, name)
    if databases.server_url is not None:  # start from a clean checkpoint, not the copy's WAL
        with contextlib.suppress(Exception):  # needs a superuser or pg_checkpoint
            asyncio.run(databases._admin("CHECKPOINT"))
    fake, fake_url = start_fake(workdir, set(), name=f"fake-{name}")
    children: list[Child] = []
    try:
        env = relay_env(
            database_url,
            segment_write_key=WRITE_KEY,
            segment_base_url=fake_url,
            segment_events_per_second="0",
            segment_requests_per_second="0",
            settle_seconds="0",
            **extra_env,
        )
        if _setting_exists("drainer_metrics_port"):  # one port per machine: none for these
            env["RELAY_DRAINER_METRICS_PORT"] = "off"
        for index in range(drainers):
            children.append(
                Child(
                    f"drain-{name}-{index + 1}",
                    [sys.executable, "-c", GATED_DRAIN, "drain"],
                    env,
                    workdir,
                    set(),
                    stdin=True,
                )
            )
        for child in children:
            child.wait_for_line(re.compile(r"^bench-drainer-ready$"), within=60)
        monitor = PoolMonitor(database_url, make_url(database_url).database or "")
        finished = asyncio.run(monitor.run(children, fake, rows, within=max(300.0, rows / 100)))
        run.span_seconds = monitor.span_seconds
        run.drainers_cpu = monitor.drainers_cpu
        run.fake_cpu = monitor.fake_cpu
        run.script_cpu = monitor.script_cpu
        run.busy_cpu = monitor.busy_cpu
        run.pg_measured = monitor.pg.available
        pg = monitor.pg.seconds()
        run.pg_backends_cpu, run.pg_server_cpu = pg["backends"], pg["server"]
        run.max_rss_kib = max(peak_rss_kib(child.process.pid) for child in children)
        for child in children:
            if _alive(child):
                child.process.send_signal(signal.SIGTERM)
        codes = [child.wait(within=30) for child in children]
        if not finished:
            print(f"  not every row was delivered in time; logs: {workdir}/drain-{name}-*.log")
            return run
        summaries = [_stopped_summary(child.log_path) for child in children]
        if databases.server_url is not None:  # the backends flushed their counts as they exited
            run.rows_read = _outbox_rows_read(database_url)
        window = asyncio.run(
            query(
                database_url,
                "SELECT min(started_at), max(finished_at), count(*), "
                "coalesce(sum(event_count), 0) FROM delivery_requests "
                "WHERE outcome = 'delivered'",
            )
        )[0]
        run.window_seconds = (utc_datetime(window[1]) - utc_datetime(window[0])).total_seconds()
        run.requests = int(window[2])
        run.delivered = sum(int(summary.get("delivered", 0)) for summary in summaries)
        verdict, _, _ = verify(database_url, fake_url, rows, after_id)
        verdict.check(codes == [0] * drainers, f"drainers exited with {codes}")
        verdict.check(all(summaries), "a drainer logged no drainer_stopped summary")
        dead = sum(int(summary.get("dead", 0)) for summary in summaries)
        verdict.check(dead == 0, f"{dead} rows went dead")
        verdict.check(run.delivered == rows, f"drainers say {run.delivered} delivered, not {rows}")
        verdict.check(int(window[3]) == rows, f"delivery_requests carried {window[3]} events")
        for problem in verdict.problems:
            print(f"  CHECK FAILED: {problem}")
        run.ok = verdict.ok
        return run
    finally:
        for child in children:
            child.stop()
        fake.stop()
        databases.drop(name)


class PoolMonitor:
    """Lets the gated drainers go, waits until no row is pending or in flight, and measures the
    CPU of every party meanwhile (drainers, fake, PostgreSQL, this script, the machine)."""

    def __init__(self, database_url: str, database: str) -> None:
        self.database_url = database_url
        self.pg = PostgresCpu({database})
        self.span_seconds = self.drainers_cpu = self.fake_cpu = 0.0
        self.script_cpu = self.busy_cpu = 0.0

    async def run(self, children: list[Child], fake: Child, rows: int, within: float) -> bool:
        # One index entry read, not the remaining rows: it must not weigh on the figures.
        sql = "SELECT EXISTS (SELECT 1 FROM outbox WHERE status IN ('pending', 'delivering'))"
        postgres = self.database_url.startswith("postgresql")
        connection: Any = None
        if postgres:
            connection = await pg_connect(self.database_url)
            self.pg.excluded.add(int(await connection.fetchval("SELECT pg_backend_pid()")))
            self.pg.start()
        else:
            connection = sqlite3.connect(str(make_url(self.database_url).database))

        def remaining() -> Any:
            if postgres:
                return connection.fetchval(sql)
            return connection.execute(sql).fetchone()[0]

        pids = [child.process.pid for child in children]
        drainers_before = sum(cpu_seconds(pid) for pid in pids)
        fake_before = cpu_seconds(fake.process.pid)
        busy_before, script_before = busy_cpu_seconds(), time.process_time()
        started = time.monotonic()
        for child in children:
            assert child.process.stdin is not None
            child.process.stdin.write(b"go\n")
            child.process.stdin.close()
        finished = False
        try:
            while time.monotonic() - started < within:
                await asyncio.sleep(0.2)
                if postgres:
                    self.pg.sample()
                left = await remaining() if postgres else remaining()
                if not left:
                    finished = True
                    break
                if not all(_alive(child) for child in children):
                    print("  a drainer exited before the end")
                    break
        finally:
            self.span_seconds = time.monotonic() - started
            self.drainers_cpu = sum(cpu_seconds(pid) for pid in pids) - drainers_before
            self.fake_cpu = cpu_seconds(fake.process.pid) - fake_before
            if postgres:
                self.pg.sample()
            self.busy_cpu = busy_cpu_seconds() - busy_before
            self.script_cpu = time.process_time() - script_before
            if postgres:
                await connection.close()
            else:
                connection.close()
        return finished and rows > 0


def _outbox_rows_read(database_url: str) -> int | None:
    """Rows of `outbox` that PostgreSQL read in this database so far: through its indexes
    (entries read) and by sequential scans (the database is a fresh copy: from zero)."""

    async def read() -> int:
        connection = await pg_connect(database_url)
        try:
            indexes = await connection.fetchval(
                "SELECT coalesce(sum(idx_tup_read), 0) FROM pg_stat_user_indexes "
                "WHERE relname = 'outbox'"
            )
            scans = await connection.fetchval(
                "SELECT coalesce(sum(seq_tup_read), 0) FROM pg_stat_user_tables "
                "WHERE relname = 'outbox'"
            )
            return int(indexes) + int(scans)
        finally:
            await connection.close()

    with contextlib.suppress(Exception):
        return asyncio.run(read())
    return None


def _setting_exists(name: str) -> bool:
    from relay.settings import SPECS

    return any(spec.name == name for spec in SPECS)


def _alive(child: Child) -> bool:
    """Whether the child still runs, without reaping it (its exit status stays for `wait`)."""
    if child.process.returncode is not None:
        return False
    try:
        found = os.waitid(os.P_PID, child.process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return found is None


def _stopped_summary(log_path: Path) -> dict[str, Any]:
    """The counts a long-running drainer logs when it stops (`drainer_stopped`), {} if none."""
    for line in reversed(log_path.read_text().splitlines()):
        with contextlib.suppress(ValueError):
            parsed = json.loads(line)
            if isinstance(parsed, dict) and parsed.get("event") == "drainer_stopped":
                return parsed
    return {}


def _summary(log_path: Path) -> dict[str, Any] | None:
    """The JSON summary `drain --once` prints last (log lines are JSON too, with an `event`)."""
    for line in reversed(log_path.read_text().splitlines()):
        with contextlib.suppress(ValueError):
            parsed = json.loads(line)
            if isinstance(parsed, dict) and "delivered" in parsed and "event" not in parsed:
                return parsed
    return None


def build_backlog(workload: Workload, rows: int) -> list[IncomingEvent]:
    """`rows` events, one entity starting every second, all received at least an hour ago."""
    planned = workload.plan(rows, entity_spacing=1.0)
    span = planned[-1].at
    now = time.time()
    epoch = now - span - 3600  # Aircall timestamps: the past
    received_base = datetime.now(UTC) - timedelta(seconds=span + 3600)
    return [
        incoming(
            workload.body(event, epoch, None),
            received_base + timedelta(seconds=event.at + 0.5),
        )
        for event in planned
    ]


def command_throughput(args: argparse.Namespace) -> int:
    sizes = [int(part.replace("_", "")) for part in args.rows.split(",") if part.strip()]
    workdir = Path(tempfile.mkdtemp(prefix="relay-bench-drainer-", dir=args.dir))
    databases = Databases(workdir, args.database_url)
    pools = _counts(args.drainers) if args.drainers else []
    # Several drainers share every core with the database and the fake: nothing is pinned.
    cpus = _cpu_split(args.no_pin or bool(pools))
    extra_env = dict(_parse_env(item) for item in args.env)
    print(f"machine: {machine()}")
    print(
        f"database: {databases.kind}"
        + (f" (scratch files in {workdir})" if args.database_url is None else "")
        + (
            f"; drainers: {', '.join(map(str, pools))} long-running aircall-relay drain "
            "process(es), stopped with SIGTERM once every row is delivered"
            if pools
            else "; drainer: aircall-relay drain --once"
        )
        + f", limits off, settle 0, batch size "
        f"{extra_env.get('segment_batch_size', '100')}, concurrency "
        f"{extra_env.get('segment_concurrency', '4')}"
    )
    print(
        "pinning: "
        + (
            f"drainer on CPU {sorted(cpus[0])}, fake Segment and this script on CPU "
            f"{sorted(cpus[1])}"
            if cpus[0]
            else "none"
        )
    )
    workload = Workload(args.examples)
    results: dict[int, list[DrainRun]] = {}
    pool_results: dict[tuple[int, int], list[PoolRun]] = {}
    healthy = True
    try:
        for rows in sizes:
            started = time.monotonic()
            template = f"template_{rows}"
            database_url = databases.create(template)
            migrate(database_url)
            history = rows if args.history < 0 and args.database_url else max(args.history, 0)
            backlog = build_backlog(workload, history + rows)
            after_id = asyncio.run(fill(database_url, backlog, delivered=history))
            backlog = backlog[history:]
            kinds = Counter(item.resource for item in backlog)
            keys = len({item.ordering_key for item in backlog})
            payload_bytes = sum(
                len(json.dumps(item.payload, separators=(",", ":"))) for item in backlog
            )
            del backlog
            print(
                f"\nbacklog of {rows:,} rows ({dict(kinds)}; {keys:,} ordering keys; payloads "
                f"{payload_bytes / rows:,.0f} bytes on average)"
                + (f", after {history:,} rows of history (delivered)" if history else "")
                + f", filled in {time.monotonic() - started:.0f} s"
            )
            for number in range(1, args.runs + 1):
                if pools:  # each run drains one copy per drainer count, one after the other
                    for drainers in pools:
                        for attempt in range(args.retries + 1):
                            wait_for_quiet(args.quiet_wait)
                            try:
                                pool_run = drain_with_pool(
                                    databases,
                                    template,
                                    rows,
                                    number,
                                    drainers,
                                    workdir,
                                    extra_env,
                                    after_id,
                                )
                            except Exception as error:  # e.g. someone restarted the server
                                print(f"  run failed: {type(error).__name__}: {error}"[:300])
                                pool_run = None
                                if attempt < args.retries:
                                    print("  (measured again)")
                                    time.sleep(5)
                                    continue
                                break
                            print(pool_run.line(), flush=True)
                            if pool_run.ok and pool_run.disturbed and attempt < args.retries:
                                print("  (disturbed by other processes: measured again)")
                                continue
                            break
                        if pool_run is None:
                            print("  (no figure for this run: the database failed each time)")
                            continue
                        pool_results.setdefault((rows, drainers), []).append(pool_run)
                        healthy = healthy and pool_run.ok
                    continue
                run = drain_once(
                    databases, template, rows, number, workdir, cpus, extra_env, after_id
                )
                print(run.line(), flush=True)
                results.setdefault(rows, []).append(run)
                healthy = healthy and run.ok
            databases.drop(template)
        if pools:
            _print_pool_medians(pool_results, pools, args.runs, databases.kind)
            return _finish(workdir, args.keep, healthy)
        print(f"\nmedians of {args.runs} run(s) ({databases.kind}):")
        for rows, runs in results.items():
            print(
                f"  {rows:>7,} rows: {statistics.median(r.rate for r in runs):7,.0f} events/s"
                f"  CPU {statistics.median(r.cpu_per_thousand for r in runs):5.3f} s/1,000 events"
                f"  peak RSS {statistics.median(r.max_rss_kib for r in runs) / 1024:5.1f} MiB"
                f"  process wall {statistics.median(r.wall_seconds for r in runs):5.1f} s"
            )
    finally:
        databases.cleanup()
    return _finish(workdir, args.keep, healthy)


def _finish(workdir: Path, keep: bool, healthy: bool) -> int:
    if keep or not healthy:
        print(f"kept {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    print("all checks passed" if healthy else "SOME CHECKS FAILED")
    return 0 if healthy else 1


def _counts(value: str) -> list[int]:
    counts = [int(part) for part in value.split(",") if part.strip()]
    if not counts or min(counts) < 1:
        raise SystemExit(f"--drainers {value!r}: expected counts of at least 1, e.g. 1,2,4")
    return counts


def _print_pool_medians(
    results: dict[tuple[int, int], list[PoolRun]], pools: list[int], runs: int, kind: str
) -> None:
    """Medians per backlog size and drainer count, and each count's rate against the first
    count's in the same run (the median of those per-run ratios)."""
    print(f"\nmedians of {runs} run(s) ({kind}), CPU in % of one core over each drain:")
    for (rows, drainers), items in results.items():

        def median(values: Iterator[float]) -> float:
            return statistics.median(list(values))

        ratios = []
        for item in items:
            first = next(
                (r for r in results.get((rows, pools[0]), []) if r.number == item.number), None
            )
            if first is not None and first.rate:
                ratios.append(item.rate / first.rate)
        pg = (
            f"  PostgreSQL {median(r.share(r.pg_backends_cpu) for r in items):3.0f}%"
            f" ({median(r.per_thousand(r.pg_backends_cpu) for r in items):5.3f} s/1,000)"
            f" + server {median(r.share(r.pg_server_cpu) for r in items):2.0f}%"
            if all(r.pg_measured for r in items)
            else ""
        )
        if all(r.rows_read is not None for r in items):
            pg += f", outbox rows read {median(r.rows_read_per_event for r in items):4.0f}/event"
        print(
            f"  {rows:>7,} rows, {drainers} drainer(s): "
            f"{median(r.rate for r in items):7,.0f} events/s"
            + (
                f" (x{statistics.median(ratios):.2f} of {pools[0]}; per run "
                + ", ".join(f"{ratio:.2f}" for ratio in ratios)
                + ")"
                if ratios and drainers != pools[0]
                else ""
            )
            + f"  drainers {median(r.share(r.drainers_cpu) for r in items):3.0f}%"
            f" ({median(r.per_thousand(r.drainers_cpu) for r in items):5.3f} s/1,000 events)"
            + pg
            + f"  fake {median(r.share(r.fake_cpu) for r in items):2.0f}%"
            f"  others {median(r.share(r.other_cpu) for r in items):2.0f}%"
            f"  machine {median(r.share(r.busy_cpu) for r in items):3.0f}%"
        )


def _cpu_split(no_pin: bool) -> tuple[set[int], set[int]]:
    """(the relay's CPUs, the fake's and this script's CPUs); this process moves to the latter."""
    cpus = sorted(os.sched_getaffinity(0))
    if no_pin or len(cpus) < 2:
        return set(), set()
    relay_cpus, other_cpus = {cpus[0]}, set(cpus[1:])
    os.sched_setaffinity(0, other_cpus)
    return relay_cpus, other_cpus


def _parse_env(item: str) -> tuple[str, str]:
    name, separator, value = item.partition("=")
    if not separator:
        raise SystemExit(f"--env {item!r}: expected NAME=VALUE (a setting name, e.g. poll_seconds)")
    return name.lower().removeprefix("relay_"), value


# ---------------------------------------------------------------------------------------------
# latency


class Poster:
    """Webhooks posted at a fixed rate (open loop) over a few keep-alive connections."""

    def __init__(self, port: int, rate: float, seconds: float, connections: int) -> None:
        self.port = port
        self.rate = rate
        self.total = int(rate * seconds)
        self.connections = connections
        self.statuses: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()
        self.lateness: list[float] = []  # how late each request was sent vs its schedule

    async def run(self, bodies: Sequence[bytes]) -> None:
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        started = time.perf_counter()

        async def dispatcher() -> None:
            for number, body in enumerate(bodies[: self.total]):
                due = started + number / self.rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                queue.put_nowait((due, body))
            for _ in range(self.connections):
                queue.put_nowait(None)

        async def sender() -> None:
            reader: asyncio.StreamReader | None = None
            writer: asyncio.StreamWriter | None = None
            while (item := await queue.get()) is not None:
                due, body = item
                self.lateness.append(time.perf_counter() - due)
                try:
                    if writer is None:
                        reader, writer = await asyncio.open_connection(HOST, self.port)
                    assert reader is not None
                    writer.write(self._request(body))
                    head = await reader.readuntil(b"\r\n\r\n")
                    self.statuses[int(head[9:12])] += 1
                    lower = head.lower()
                    start = lower.find(b"content-length:")
                    end = lower.find(b"\r\n", start)
                    await reader.readexactly(int(head[start + 15 : end]))
                    if b"connection: close" in lower:
                        writer.close()
                        reader = writer = None
                except (OSError, ValueError, asyncio.IncompleteReadError) as error:
                    self.errors[type(error).__name__] += 1
                    if writer is not None:
                        writer.close()
                    reader = writer = None
            if writer is not None:
                writer.close()

        tasks = [asyncio.ensure_future(dispatcher())]
        tasks += [asyncio.ensure_future(sender()) for _ in range(self.connections)]
        _, pending = await asyncio.wait(tasks, timeout=self.total / self.rate + 60)
        for task in pending:
            task.cancel()
        if pending:
            self.errors["timeout"] += len(pending)
            await asyncio.wait(pending)

    def _request(self, body: bytes) -> bytes:
        head = (
            f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body


def command_latency(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="relay-bench-drainer-", dir=args.dir))
    databases = Databases(workdir, args.database_url)
    relay_cpus, other_cpus = _cpu_split(args.no_pin)
    extra_env = dict(_parse_env(item) for item in args.env)
    settle = float(extra_env.get("settle_seconds", "5"))
    print(f"machine: {machine()}")
    print(
        f"database: {databases.kind}; relay: aircall-relay serve + aircall-relay drain, default "
        f"settings{' except ' + str(extra_env) if extra_env else ''} (settle {settle:g} s, "
        f"500 events/s, 20 requests/s, concurrency 4, poll 0.25 s)"
    )
    print(
        "pinning: "
        + (
            f"receiver and drainer on CPU {sorted(relay_cpus)}, fake Segment and the load "
            f"generator on CPU {sorted(other_cpus)}"
            if relay_cpus
            else "none"
        )
    )
    # Calls' life cycles compressed 10x, so that calls overlap at this rate like real ones.
    workload = Workload(args.examples, time_scale=0.1)
    total = int(args.rate * args.seconds)
    planned = workload.plan(total, entity_spacing=workload.events_per_entity / args.rate)
    epoch = time.time()
    bodies = [
        json.dumps(workload.body(event, epoch, TOKEN), separators=(",", ":")).encode()
        for event in planned
    ]
    healthy = True
    children: list[Child] = []
    try:
        database_url = databases.create("latency")
        migrate(database_url)
        fake, fake_url = start_fake(workdir, other_cpus)
        children.append(fake)
        env = relay_env(
            database_url,
            aircall_tokens=f"bench:{TOKEN}",
            segment_write_key=WRITE_KEY,
            segment_base_url=fake_url,
            **extra_env,
        )
        server = Child(
            "serve",
            [sys.executable, "-m", "relay.cli", "serve", "--port", "0"],
            env,
            workdir,
            relay_cpus,
        )
        children.append(server)
        listening = server.wait_for_line(re.compile(r'^\{.*"listening".*\}$')).group(0)
        port = int(json.loads(listening)["port"])
        drainer = Child(
            "drain", [sys.executable, "-m", "relay.cli", "drain"], env, workdir, relay_cpus
        )
        children.append(drainer)
        drainer.wait_for_line(re.compile(r'"drainer_started"'))
        poster = Poster(port, args.rate, args.seconds, args.connections)
        started = time.monotonic()
        drainer_cpu_before = cpu_seconds(drainer.process.pid)
        server_cpu_before = cpu_seconds(server.process.pid)
        asyncio.run(poster.run(bodies))
        posted_seconds = time.monotonic() - started
        drainer_cpu = cpu_seconds(drainer.process.pid) - drainer_cpu_before
        server_cpu = cpu_seconds(server.process.pid) - server_cpu_before
        answered = poster.statuses[200]
        print(
            f"\nposted {total:,} webhooks in {posted_seconds:.1f} s ({answered:,} answered 200"
            + (
                f", others {dict(poster.statuses - Counter({200: answered}))}"
                if answered != total
                else ""
            )
            + (f", errors {dict(poster.errors)}" if poster.errors else "")
            + f"); sending lateness p99 {1000 * percentile(poster.lateness, 0.99):.1f} ms"
        )
        print(
            f"CPU while posting: receiver {100 * server_cpu / posted_seconds:.0f}% of a core, "
            f"drainer {100 * drainer_cpu / posted_seconds:.0f}%"
        )
        deadline = time.monotonic() + settle + 120
        delivered = 0
        while time.monotonic() < deadline:
            delivered = asyncio.run(
                query(database_url, "SELECT count(*) FROM outbox WHERE status = 'delivered'")
            )[0][0]
            if delivered >= answered:
                break
            time.sleep(0.5)
        verdict, rows, accepted = verify(database_url, fake_url, answered)
        requests, events = asyncio.run(
            query(
                database_url,
                "SELECT count(*), coalesce(sum(event_count), 0) FROM delivery_requests",
            )
        )[0]
        print(
            f"requests to Segment: {requests:,} ({events / max(requests, 1):.1f} events each on "
            "average)"
        )
        verdict.check(answered == total, f"{total - answered} webhooks not answered 200")
        latencies = [
            (
                _parse_time(accepted[row.message_id]["receivedAt"]) - utc_datetime(row.received_at)
            ).total_seconds()
            for row in rows
            if row.message_id in accepted
        ]
        goal = settle + 1.0
        p99 = percentile(latencies, 0.99)
        print(f"\nreceipt to acceptance at {args.rate:g} webhooks/s ({len(latencies):,} events):")
        print(
            f"  p50 {percentile(latencies, 0.5):.3f} s  p90 {percentile(latencies, 0.9):.3f} s"
            f"  p99 {p99:.3f} s  max {max(latencies, default=float('nan')):.3f} s"
            f"  min {min(latencies, default=float('nan')):.3f} s"
        )
        print(f"  goal p99 <= settle + 1 s = {goal:g} s: {'met' if p99 <= goal else 'NOT MET'}")
        for problem in verdict.problems:
            print(f"  CHECK FAILED: {problem}")
        healthy = verdict.ok
    finally:
        for child in reversed(children):
            child.stop()
        databases.cleanup()
    if args.keep or not healthy:
        print(f"kept {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    print("all checks passed" if healthy else "SOME CHECKS FAILED")
    return 0 if healthy else 1


def _parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# ---------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def common(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--database-url",
            help="a PostgreSQL server on which to create scratch databases (default: SQLite "
            "files in a temporary directory)",
        )
        command.add_argument(
            "--examples", type=Path, default=DEFAULT_EXAMPLES, help="sample payloads"
        )
        command.add_argument("--dir", type=Path, help="parent of the temporary directory")
        command.add_argument("--keep", action="store_true", help="keep the temporary directory")
        command.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
        command.add_argument(
            "--env",
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help="an extra relay setting for the relay processes (repeatable), e.g. "
            "segment_batch_size=200",
        )

    throughput = commands.add_parser("throughput", help="drain a pre-filled backlog")
    common(throughput)
    throughput.add_argument(
        "--rows", default="100000", help="backlog size, or sizes separated by commas"
    )
    throughput.add_argument("--runs", type=int, default=3, help="runs per backlog size")
    throughput.add_argument(
        "--history",
        type=int,
        default=-1,
        help="rows already delivered before the backlog, as in an outbox that has been in use "
        "(PostgreSQL's statistics then see both states); -1: as many as the backlog on "
        "PostgreSQL, none on SQLite",
    )
    throughput.add_argument(
        "--retries",
        type=int,
        default=2,
        help="with --drainers: measure a drain again, up to this many times, when other "
        "processes took more than a fifth of a core during it",
    )
    throughput.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="with --drainers: before each drain, wait up to this many seconds for a quiet "
        "second on the machine (other processes under a fifth of a core)",
    )
    throughput.add_argument(
        "--drainers",
        metavar="N[,N...]",
        help="drain with N long-running `aircall-relay drain` processes at once (stopped with "
        "SIGTERM once every row is delivered), for each N given, nothing pinned; each run drains "
        "one copy of the backlog per N (default: one `drain --once`, pinned)",
    )
    throughput.set_defaults(handler=command_throughput)

    latency = commands.add_parser("latency", help="receipt-to-acceptance latency at a fixed rate")
    common(latency)
    latency.add_argument("--rate", type=float, default=200.0, help="webhooks per second")
    latency.add_argument("--seconds", type=float, default=60.0, help="how long to post")
    latency.add_argument("--connections", type=int, default=8, help="keep-alive connections")
    latency.set_defaults(handler=command_latency)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handler: Any = args.handler
    return int(handler(args))


if __name__ == "__main__":
    sys.exit(main())
