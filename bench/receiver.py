"""Receiver benchmark: acked webhooks per second and latency, stored (200) against refused (401).

The script creates a temporary SQLite outbox (or takes a PostgreSQL URL), migrates it with
`aircall-relay migrate`, starts the real server (`aircall-relay serve --port 0`, Hypercorn) as a
subprocess, and drives it from this process over loopback: raw HTTP/1.1 keep-alive connections on
asyncio streams, each request a distinct, realistic Aircall webhook built from the 26 sample
payloads (call, user, contact and number ids and timestamps varied so that every request is a new
event). On a machine with two or more cores the server is pinned to CPU 0 and the load generator
to the others, so they do not compete for a core.

It alternates closed-loop runs with the right token (each webhook stored, 200 after its commit)
and with a wrong token (401: the same requests, the same parsing, no database), prints each run,
then the medians and the ratio stored / refused (the median of the per-pair ratios). It then
sends webhooks at a fixed rate (half the saturating stored rate, or `--rate`), open loop, and
prints p50/p99 measured from each request's scheduled send time, so that a stall is not hidden by
the load generator waiting for it (no coordinated omission); `--fixed-401` adds the same for
refused requests. Finally it stops the server and checks that the outbox holds exactly one row
per 200.

Each run's line also says where the server's CPU went (µs per request, of which the event loop's
thread; context switches per request), the group commit's figures from /metrics (webhooks per
commit, commit time), and how much CPU other processes took meanwhile: on a shared machine a run
where they took more than a fifth of a core is marked DISTURBED and measured again (`--retries`);
`--quiet-wait S` first waits up to S seconds for a quiet second before each run. On a PostgreSQL
outbox served from this machine, the line also gives the CPU of the backends serving that
database and of the server's background processes (from /proc), which are then not counted as
other processes' CPU.

`--receivers 2` starts two servers (two `aircall-relay serve --port 0`, each with `--workers`),
as behind a load balancer, and spreads the connections over them (connection i to server i mod
2); the figures are their sums, and nothing is pinned.

Usage (from the repository root, with the project's virtualenv):

    .venv/bin/python bench/receiver.py                      # 64 connections, 5 x 10 s pairs
    .venv/bin/python bench/receiver.py --runs 5 --seconds 10 --connections 64 --fixed-401
    .venv/bin/python bench/receiver.py --database-url postgresql://postgres@127.0.0.1/bench_x
    .venv/bin/python bench/receiver.py --rate 800 --runs 0  # only the fixed-rate runs
    .venv/bin/python bench/receiver.py --receivers 2 --quiet-wait 120 \
        --database-url postgresql://postgres@127.0.0.1/bench_x

A PostgreSQL database is migrated and keeps the rows written (each run uses new event ids).

Exit status: 0 when every response had the expected status and the row count matches, 1
otherwise (the figures are printed either way; there is no pass mark on speed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proc_cpu import PostgresCpu, busy_cpu_seconds, wait_for_quiet

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_EXAMPLES = ROOT / "relay" / "testing" / "samples"  # the samples the package ships
TOKEN = "7c2e91a04bd35f6e8a1d0c9b47f2e6a3"  # the sample payloads' token, configured on the server
WRONG_TOKEN = "0" * len(TOKEN)  # same length, so a refused body is the same size
WEBHOOK_PATH = "/aircall/webhook"
HOST = "127.0.0.1"  # the load generator only ever talks to loopback

# Markers put into a sample before it is serialised, replaced per request (they must not occur in
# any sample, and each must occur exactly once in the serialised body).
_ID_MARK = "918273645501"
_TS_MARK = "918273645502"
_TOKEN_MARK = "@@TOKEN@@"
_FIRST_ID = 7_000_000_000  # above any id in the samples
_FIRST_TIMESTAMP = 1_773_100_000  # March 2026, like the samples


# ---------------------------------------------------------------------------------------------
# Payloads


class Payloads:
    """Distinct webhook bodies, built fast from serialised templates of the sample payloads.

    Request n uses sample n mod 26, with `data.id` = a fresh id and `timestamp` advancing, so its
    dedup key (resource, event, timestamp, data) is new. The ids start at a random offset, so a
    second run against the same database (PostgreSQL) sends new events too. A body costs one
    bytes join.
    """

    def __init__(self, examples: Path) -> None:
        files = sorted(examples.glob("*.json"))
        if not files:
            raise SystemExit(f"no sample payloads in {examples} (use --examples DIR)")
        self.templates: list[list[bytes | int]] = []
        for path in files:
            body = json.loads(path.read_text())
            body["token"] = _TOKEN_MARK
            body["timestamp"] = int(_TS_MARK)
            body["data"]["id"] = int(_ID_MARK)
            text = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
            self.templates.append(_split_template(text))
        self.next_number = 0
        self.first_id = _FIRST_ID + random.randrange(2**40) * 1000

    def body(self, token: str) -> bytes:
        """The next distinct body, with `token` in it."""
        number = self.next_number
        self.next_number += 1
        values = (
            str(self.first_id + number).encode(),
            str(_FIRST_TIMESTAMP + number // 7).encode(),
            token.encode(),
        )
        template = self.templates[number % len(self.templates)]
        return b"".join(part if isinstance(part, bytes) else values[part] for part in template)


def _split_template(text: str) -> list[bytes | int]:
    """Literal byte strings and slot numbers (0 id, 1 timestamp, 2 token), in body order."""
    marks = {_ID_MARK: 0, _TS_MARK: 1, f'"{_TOKEN_MARK}"': 2}
    pattern = re.compile("|".join(re.escape(mark) for mark in marks))
    parts: list[bytes | int] = []
    position = 0
    found: list[int] = []
    for match in pattern.finditer(text):
        parts.append(text[position : match.start()].encode())
        slot = marks[match.group()]
        if slot == 2:  # keep the quotes around the token
            parts.extend([b'"', 2, b'"'])
        else:
            parts.append(slot)
        found.append(slot)
        position = match.end()
    parts.append(text[position:].encode())
    if sorted(found) != [0, 1, 2]:
        raise SystemExit("a sample payload collides with the benchmark's markers")
    return parts


def request_bytes(port: int, body: bytes) -> bytes:
    head = (
        f"POST {WEBHOOK_PATH} HTTP/1.1\r\n"
        f"Host: {HOST}:{port}\r\n"
        "User-Agent: relay-bench\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


# ---------------------------------------------------------------------------------------------
# Load generator


@dataclass
class CommitFigures:
    """Group commits during one run, from the difference of two /metrics scrapes."""

    commits: float = 0.0
    webhooks: float = 0.0
    seconds_buckets: dict[float, float] = field(default_factory=dict)  # upper bound -> count

    @classmethod
    def between(cls, before: dict[str, float], after: dict[str, float]) -> CommitFigures:
        def delta(name: str) -> float:
            return after.get(name, 0.0) - before.get(name, 0.0)

        buckets = {}
        for name in after:
            if name.startswith("relay_commit_duration_seconds_bucket{"):
                bound = name.split('le="', 1)[1].split('"', 1)[0]
                buckets[float(bound)] = delta(name)
        return cls(
            commits=delta("relay_commit_batch_size_count"),
            webhooks=delta("relay_commit_batch_size_sum"),
            seconds_buckets=buckets,
        )

    @property
    def mean_batch(self) -> float:
        return self.webhooks / self.commits if self.commits else float("nan")

    def commit_seconds(self, fraction: float) -> float:
        """Upper bound of the histogram bucket holding this fraction of the commits."""
        for bound, count in sorted(self.seconds_buckets.items()):
            if count >= fraction * self.commits:
                return bound
        return float("nan")


@dataclass
class RunResult:
    label: str
    expected_status: int
    seconds: float = 0.0
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # seconds, expected status only
    server_cpu_seconds: float = 0.0
    loop_cpu_seconds: float = 0.0
    server_switches: int = 0
    client_cpu_seconds: float = 0.0
    other_cpu_seconds: float = 0.0  # everything else on the machine: a disturbed run shows here
    postgres_cpu_seconds: tuple[float, float] | None = None  # (outbox's backends, server)
    commits: CommitFigures = field(default_factory=CommitFigures)

    @property
    def acked(self) -> int:
        return self.statuses[self.expected_status]

    @property
    def rate(self) -> float:
        return self.acked / self.seconds if self.seconds else 0.0

    @property
    def unexpected(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != self.expected_status)

    @property
    def disturbed(self) -> bool:
        """Other processes took more than a fifth of a core during the run."""
        return self.other_cpu_seconds > 0.2 * (self.seconds or 1.0)

    def percentile(self, fraction: float) -> float:
        return percentile(self.latencies, fraction)


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (NaN for no values)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1))
    return ordered[rank]


class Connection:
    """One keep-alive HTTP/1.1 connection; reopened when the server closes it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def exchange(self, request: bytes) -> int:
        """Send one request, read its whole response, return the status."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
        assert self.reader is not None
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        start = lower.find(b"content-length:")
        if start < 0:
            raise ValueError("response without content-length")
        end = lower.find(b"\r\n", start)
        await self.reader.readexactly(int(head[start + 15 : end]))
        if b"connection: close" in lower:
            self.close()
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def _record_error(result: RunResult, error: BaseException, connection: Connection) -> None:
    result.errors[type(error).__name__] += 1
    connection.close()


async def closed_loop(
    ports: list[int],
    connections: int,
    seconds: float,
    make_request: Callable[[int], bytes],
    result: RunResult,
) -> None:
    """Each connection sends its next request as soon as the previous answer arrived.
    Connection i goes to `ports[i % len(ports)]` (one server each)."""
    started = time.perf_counter()
    deadline = started + seconds
    last_answer = started

    async def worker(port: int) -> None:
        nonlocal last_answer
        connection = Connection(port)
        clock = time.perf_counter
        try:
            while clock() < deadline:
                request = make_request(port)
                sent = clock()
                try:
                    status = await connection.exchange(request)
                except (OSError, ValueError, asyncio.IncompleteReadError) as error:
                    _record_error(result, error, connection)
                    continue
                answered = clock()
                result.statuses[status] += 1
                if status == result.expected_status:
                    result.latencies.append(answered - sent)
                last_answer = max(last_answer, answered)
        finally:
            connection.close()

    workers = [worker(ports[index % len(ports)]) for index in range(connections)]
    await _bounded(result, seconds, workers)
    result.seconds = last_answer - started


async def open_loop(
    ports: list[int],
    connections: int,
    seconds: float,
    rate: float,
    make_request: Callable[[int], bytes],
    result: RunResult,
) -> None:
    """Requests scheduled at a fixed rate; latency counts from the scheduled time.

    A dispatcher queues each request when its time comes; `connections` senders take them. If
    every connection is busy, a request waits in the queue and that wait is part of its latency.
    """
    queue: asyncio.Queue[float | None] = asyncio.Queue()
    started = time.perf_counter()
    total = int(rate * seconds)

    async def dispatcher() -> None:
        sent = 0
        while sent < total:
            now = time.perf_counter()
            due = min(total, int((now - started) * rate) + 1)
            while sent < due:
                queue.put_nowait(started + sent / rate)
                sent += 1
            next_time = started + sent / rate
            await asyncio.sleep(max(0.0, next_time - time.perf_counter()))
        for _ in range(connections):
            queue.put_nowait(None)

    async def sender(port: int) -> None:
        connection = Connection(port)
        try:
            while (scheduled := await queue.get()) is not None:
                try:
                    status = await connection.exchange(make_request(port))
                except (OSError, ValueError, asyncio.IncompleteReadError) as error:
                    _record_error(result, error, connection)
                    continue
                result.statuses[status] += 1
                if status == result.expected_status:
                    result.latencies.append(time.perf_counter() - scheduled)
        finally:
            connection.close()

    senders = [sender(ports[index % len(ports)]) for index in range(connections)]
    await _bounded(result, seconds, [dispatcher(), *senders])
    result.seconds = time.perf_counter() - started


async def _bounded(result: RunResult, seconds: float, coroutines: list[Any]) -> None:
    """Run the coroutines, cancelling whatever is still running 30 s after the run's end."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    done, pending = await asyncio.wait(tasks, timeout=seconds + 30)
    for task in pending:
        task.cancel()
    if pending:
        result.errors["timeout"] += len(pending)
        await asyncio.wait(pending)
    for task in done:
        if task.exception() is not None:
            result.errors[type(task.exception()).__name__] += 1


# ---------------------------------------------------------------------------------------------
# The server under test


class Server:
    """`aircall-relay serve --port 0` in a subprocess, its log in a file."""

    def __init__(
        self,
        env: dict[str, str],
        workdir: Path,
        workers: int,
        cpus: set[int],
        name: str = "server",
        command: list[str] | None = None,
        metrics: bool | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        """`command`: another server to run instead (bench/ingest_vs_fastapi.py's peer); it
        must log a JSON line with `"listening"` and its `port`, and has /metrics only when
        `metrics` says so (by default only `aircall-relay serve`)."""
        self.log_path = workdir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.start_timeout = start_timeout
        relay = command is None if metrics is None else metrics
        if command is None:
            command = [sys.executable, "-m", "relay.cli", "serve", "--port", "0"]
            if workers > 1:
                command += ["--workers", str(workers)]
        self.process = subprocess.Popen(
            command, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT
        )
        if cpus:  # threads and worker processes started later inherit this
            os.sched_setaffinity(self.process.pid, cpus)
        self.port = self._wait_for_port("listening")
        # Where the server answers /metrics (a port of its own since the receiver has one).
        self.metrics_port = self._wait_for_port("metrics_listening") if relay else None

    def _wait_for_port(self, event: str) -> int:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited:\n{self.log_path.read_text()[-3000:]}")
            for line in self.log_path.read_text().splitlines():
                if f'"{event}"' in line:
                    return int(json.loads(line)["port"])
            time.sleep(0.05)
        self.stop()
        raise SystemExit(f"the server did not log `{event}` within {self.start_timeout:g} s")

    def cpu_seconds(self) -> tuple[float, float]:
        """User + system CPU time of the server and its worker processes: (all threads, the
        processes' main threads, where the event loops run)."""
        total = main = 0.0
        for pid in _process_tree(self.process.pid):
            total += _cpu_seconds(Path(f"/proc/{pid}/stat"))
            main += _cpu_seconds(Path(f"/proc/{pid}/task/{pid}/stat"))
        return total, main

    def context_switches(self) -> int:
        """Context switches so far of every thread of the server and its workers."""
        total = 0
        for pid in _process_tree(self.process.pid):
            for status in Path(f"/proc/{pid}/task").glob("*/status"):
                with contextlib.suppress(OSError):
                    for line in status.read_text().splitlines():
                        if line.endswith("ctxt_switches") or "ctxt_switches:" in line:
                            total += int(line.split(":")[1])
        return total

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


class Servers:
    """Several servers (`--receivers`), measured together: their CPU, context switches and
    group-commit figures are sums."""

    def __init__(self, servers: list[Server]) -> None:
        self.servers = servers

    @property
    def ports(self) -> list[int]:
        return [server.port for server in self.servers]

    @property
    def log_paths(self) -> list[Path]:
        return [server.log_path for server in self.servers]

    def cpu_seconds(self) -> tuple[float, float]:
        figures = [server.cpu_seconds() for server in self.servers]
        return sum(total for total, _ in figures), sum(main for _, main in figures)

    def context_switches(self) -> int:
        return sum(server.context_switches() for server in self.servers)

    def scrape_metrics(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for server in self.servers:
            if server.metrics_port is None:
                continue
            for name, value in scrape_metrics(server.metrics_port).items():
                totals[name] = totals.get(name, 0.0) + value
        return totals

    def stop(self) -> None:
        for server in self.servers:
            if server.process.poll() is None:
                server.process.send_signal(signal.SIGTERM)
        for server in self.servers:
            server.stop()


class PostgresSampler:
    """The CPU of the local PostgreSQL server's processes for the outbox database during a run
    (`proc_cpu.PostgresCpu`), sampled every half second by a thread of its own."""

    def __init__(self, database_url: str) -> None:
        database = database_url.rsplit("/", 1)[-1].split("?", 1)[0]
        self.cpu = PostgresCpu({database}) if database_url.startswith("postgres") else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PostgresSampler:
        if self.cpu is not None:
            self.cpu.start()
            if self.cpu.available:
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        return self

    def _sample(self) -> None:
        assert self.cpu is not None
        while not self._stop.wait(0.5):
            self.cpu.sample()

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.cpu is not None and self.cpu.available:
            self.cpu.sample()

    def seconds(self) -> tuple[float, float] | None:
        """(backends of the outbox database, server processes), None when not measured."""
        if self.cpu is None or not self.cpu.available:
            return None
        figures = self.cpu.seconds()
        return figures["backends"], figures["server"]


def _cpu_seconds(stat: Path) -> float:
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _process_tree(pid: int) -> Iterator[int]:
    yield pid
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                yield from _process_tree(int(child))


def scrape_metrics(port: int) -> dict[str, float]:
    """The group-commit figures from /metrics: batch sizes and commit times (histograms)."""
    import urllib.request

    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    figures: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("relay_commit_batch_size_", "relay_commit_duration_seconds_")):
            name, _, value = line.rpartition(" ")
            figures[name] = float(value)
    return figures


def measure(
    server: Servers, database_url: str, label: str, expected: int, drive: Callable[[RunResult], Any]
) -> RunResult:
    """One run: `drive(result)` (a coroutine function: the load) with the server's CPU, context
    switches, group-commit figures and the CPU other processes took meanwhile."""
    result = RunResult(label, expected)
    metrics_before = server.scrape_metrics()
    cpu_before, client_before = server.cpu_seconds(), time.process_time()
    switches_before = server.context_switches()
    busy_before = busy_cpu_seconds()
    with PostgresSampler(database_url) as postgres:
        asyncio.run(drive(result))
    busy = busy_cpu_seconds() - busy_before
    cpu_after = server.cpu_seconds()
    result.server_cpu_seconds = cpu_after[0] - cpu_before[0]
    result.loop_cpu_seconds = cpu_after[1] - cpu_before[1]
    result.server_switches = server.context_switches() - switches_before
    result.client_cpu_seconds = time.process_time() - client_before
    result.postgres_cpu_seconds = postgres.seconds()
    result.other_cpu_seconds = max(
        0.0,
        busy
        - result.server_cpu_seconds
        - result.client_cpu_seconds
        - sum(result.postgres_cpu_seconds or ()),
    )
    result.commits = CommitFigures.between(metrics_before, server.scrape_metrics())
    return result


# ---------------------------------------------------------------------------------------------
# Database


def relay_env(database_url: str) -> dict[str, str]:
    """The environment of `aircall-relay serve` and `migrate` (this process's, less RELAY_*)."""
    return {
        **{key: value for key, value in os.environ.items() if not key.startswith("RELAY_")},
        "RELAY_AIRCALL_TOKENS": f"bench:{TOKEN}",
        "RELAY_DATABASE_URL": database_url,
        "RELAY_LOG_FORMAT": "json",
        "RELAY_RECEIVER_METRICS_PORT": "0",  # any free port, one per server (logged)
        "PYTHONPATH": str(ROOT),
    }


def migrate(env: dict[str, str]) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "relay.cli", "migrate"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if completed.returncode != 0:
        raise SystemExit(f"migrate failed:\n{completed.stdout}{completed.stderr}")


def count_rows(database_url: str) -> tuple[int, int]:
    """(rows, sum of received_count) in the outbox."""
    sys.path.insert(0, str(ROOT))
    from sqlalchemy import text

    from relay.db.engine import create_engine

    async def query() -> tuple[int, int]:
        engine = create_engine(database_url, timeout_seconds=2.0)
        try:
            async with engine.connect() as connection:
                row = (
                    await connection.execute(
                        text("SELECT count(*), coalesce(sum(received_count), 0) FROM outbox")
                    )
                ).one()
                return int(row[0]), int(row[1])
        finally:
            await engine.dispose()

    return asyncio.run(query())


# ---------------------------------------------------------------------------------------------
# Reporting


def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.1f}"


def describe(result: RunResult) -> str:
    """One run on one line: rate and latency, then where the server's CPU went."""
    wall = result.seconds or 1.0
    per_request = 1e6 / max(1, result.acked)
    line = (
        f"{result.label:<11} {result.rate:6.0f}/s  p50 {ms(result.percentile(0.5))} ms"
        f"  p99 {ms(result.percentile(0.99))} ms"
        f" | server {100 * result.server_cpu_seconds / wall:3.0f}% cpu,"
        f" {result.server_cpu_seconds * per_request:4.0f} us/req"
        f" (loop {result.loop_cpu_seconds * per_request:4.0f}),"
        f" {result.server_switches / max(1, result.acked):4.1f} switches/req"
    )
    if result.commits.commits:
        line += (
            f" | {result.commits.mean_batch:4.1f}/commit,"
            f" commit p99 <= {ms(result.commits.commit_seconds(0.99)).strip()} ms"
        )
    line += f" | client {100 * result.client_cpu_seconds / wall:2.0f}%"
    if result.postgres_cpu_seconds is not None:
        backends, server = result.postgres_cpu_seconds
        line += (
            f" | PostgreSQL {100 * backends / wall:3.0f}% backends"
            f" ({backends * per_request:4.0f} us/req) + {100 * server / wall:2.0f}% server"
        )
    if result.disturbed:
        line += f"  DISTURBED (other processes: {100 * result.other_cpu_seconds / wall:.0f}% cpu)"
    if result.unexpected or result.errors:
        others = {s: n for s, n in result.statuses.items() if s != result.expected_status}
        line += f"  UNEXPECTED statuses {others} errors {dict(result.errors)}"
    return line


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores ({model}), Python {sys.version.split()[0]}"


# ---------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--connections", type=int, default=64, help="concurrent connections")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each run")
    parser.add_argument("--runs", type=int, default=5, help="pairs of runs (stored, 401)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per kind")
    parser.add_argument(
        "--database-url",
        help="outbox database (default: a new SQLite file in a temporary directory); a "
        "PostgreSQL URL is migrated and its outbox grows by the rows written",
    )
    parser.add_argument("--workers", type=int, default=1, help="receiver worker processes")
    parser.add_argument(
        "--receivers",
        type=int,
        default=1,
        help="receiver servers (`aircall-relay serve`, each on a port of its own, each with "
        "--workers); the connections are spread over them; more than one pins nothing",
    )
    parser.add_argument(
        "--rate", type=float, help="fixed-rate run, webhooks/s (default: half the stored rate)"
    )
    parser.add_argument(
        "--fixed-runs", type=int, default=3, help="fixed-rate runs (each --seconds long)"
    )
    parser.add_argument(
        "--fixed-401",
        action="store_true",
        help="also run the fixed rate with refused requests (the no-database cost at that rate)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="measure a run (or stored/401 pair) again, up to this many times, when other "
        "processes took more than a fifth of a core during it",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        help="before each run, wait up to this many seconds for a quiet second on the machine "
        "(other processes under a fifth of a core)",
    )
    parser.add_argument("--examples", type=Path, default=DEFAULT_EXAMPLES, help="sample payloads")
    parser.add_argument("--dir", type=Path, help="parent of the temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--no-pin", action="store_true", help="do not pin server and load generator to CPUs"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    payloads = Payloads(args.examples)
    workdir = Path(tempfile.mkdtemp(prefix="relay-bench-", dir=args.dir))
    database_url = args.database_url or f"sqlite:///{workdir / 'outbox.sqlite3'}"
    env = relay_env(database_url)
    cpus = sorted(os.sched_getaffinity(0))
    server_cpus: set[int] = set()
    if len(cpus) >= 2 and not args.no_pin and args.receivers == 1:
        server_cpus = {cpus[0]}
        os.sched_setaffinity(0, set(cpus[1:]))

    print(f"machine: {machine()}")
    print(
        f"server: {args.receivers} x aircall-relay serve, {args.workers} worker(s) each"
        + (f", pinned to CPU {cpus[0]}" if server_cpus else ", not pinned")
        + f"; database {database_url if args.database_url else 'SQLite in ' + str(workdir)}"
    )
    print(
        f"load: {args.connections} keep-alive connections, {args.runs} x ({args.seconds:g} s "
        f"stored, {args.seconds:g} s refused), distinct payloads from {args.examples}"
    )

    migrate(env)
    rows_before, received_before = count_rows(database_url)
    server = Servers(
        [
            Server(
                env,
                workdir,
                args.workers,
                server_cpus,
                name="server" if args.receivers == 1 else f"server-{number + 1}",
            )
            for number in range(args.receivers)
        ]
    )
    stored_ok = 0  # 200s received, each a distinct event
    healthy = True
    try:

        def stored_request(port: int) -> bytes:
            return request_bytes(port, payloads.body(TOKEN))

        def refused_request(port: int) -> bytes:
            return request_bytes(port, payloads.body(WRONG_TOKEN))

        def run(label: str, expected: int, drive: Callable[[RunResult], Any]) -> RunResult:
            if args.quiet_wait > 0:
                wait_for_quiet(args.quiet_wait)
            return measure(server, database_url, label, expected, drive)

        def closed(
            label: str, expected: int, make: Callable[[int], bytes], secs: float
        ) -> RunResult:
            return run(
                label,
                expected,
                lambda result: closed_loop(server.ports, args.connections, secs, make, result),
            )

        results: list[RunResult] = []
        if args.warmup > 0:
            for label, expected, make in (
                ("warm-up", 200, stored_request),
                ("warm-up", 401, refused_request),
            ):
                warm = closed(label, expected, make, args.warmup)
                results.append(warm)
                print(describe(warm))

        stored_runs: list[RunResult] = []
        refused_runs: list[RunResult] = []
        for number in range(1, args.runs + 1):
            for attempt in range(args.retries + 1):
                stored = closed(f"stored {number}", 200, stored_request, args.seconds)
                print(describe(stored), flush=True)
                refused = closed(f"401 {number}", 401, refused_request, args.seconds)
                print(describe(refused), flush=True)
                if attempt < args.retries and (stored.disturbed or refused.disturbed):
                    results += [stored, refused]  # their rows count, their figures do not
                    print("  (pair disturbed by other processes: measured again)")
                    time.sleep(args.seconds)
                    continue
                break
            stored_runs.append(stored)
            refused_runs.append(refused)
        results += stored_runs + refused_runs

        if stored_runs:
            ratios = [s.rate / r.rate for s, r in zip(stored_runs, refused_runs, strict=True)]
            print()
            print(f"medians of {len(stored_runs)} runs, {args.connections} connections:")
            for label, runs in (("stored", stored_runs), ("401", refused_runs)):
                print(
                    f"  {label:<7} {statistics.median(r.rate for r in runs):8.0f} acked/s"
                    f"  p50 {ms(statistics.median(r.percentile(0.5) for r in runs))} ms"
                    f"  p99 {ms(statistics.median(r.percentile(0.99) for r in runs))} ms"
                )
            commits = sum(r.commits.commits for r in stored_runs)
            if commits:
                webhooks = sum(r.commits.webhooks for r in stored_runs)
                print(f"  group commit while stored: {webhooks / commits:.1f} webhooks/commit")
            print(
                f"  ratio stored/401: {statistics.median(ratios):.3f} (per pair: "
                + ", ".join(f"{ratio:.3f}" for ratio in ratios)
                + ")"
            )
            disturbed = sum(r.disturbed for r in stored_runs + refused_runs)
            if disturbed:
                print(f"  {disturbed} of {2 * len(stored_runs)} runs disturbed by other processes")

        rate = args.rate or (
            statistics.median(r.rate for r in stored_runs) / 2 if stored_runs else 0.0
        )
        if rate > 0 and args.fixed_runs > 0:
            kinds = [("fixed", 200, stored_request)]
            if args.fixed_401:
                kinds.append(("fixed 401", 401, refused_request))
            for kind, expected, make in kinds:
                print()
                print(
                    f"{kind}: {rate:.0f}/s, {args.fixed_runs} x {args.seconds:g} s (open loop, "
                    "latency from each request's scheduled time):"
                )
                fixed_runs: list[RunResult] = []
                for number in range(1, args.fixed_runs + 1):
                    for attempt in range(args.retries + 1):
                        fixed = run(
                            f"{kind} {number}",
                            expected,
                            lambda result, make=make: open_loop(  # type: ignore[misc]
                                server.ports, args.connections, args.seconds, rate, make, result
                            ),
                        )
                        print(describe(fixed), flush=True)
                        if attempt < args.retries and fixed.disturbed:
                            results.append(fixed)
                            print("  (run disturbed by other processes: measured again)")
                            time.sleep(args.seconds)
                            continue
                        break
                    fixed_runs.append(fixed)
                results += fixed_runs
                print(
                    f"  median  {statistics.median(r.rate for r in fixed_runs):8.0f} acked/s"
                    f"  p50 {ms(statistics.median(r.percentile(0.5) for r in fixed_runs))} ms"
                    f"  p99 {ms(statistics.median(r.percentile(0.99) for r in fixed_runs))} ms"
                    f"  (max {ms(max(max(r.latencies, default=0.0) for r in fixed_runs))} ms)"
                )
                disturbed = sum(r.disturbed for r in fixed_runs)
                if disturbed:
                    print(f"  {disturbed} of {len(fixed_runs)} runs disturbed by other processes")

        for result in results:
            if result.unexpected or result.errors:
                healthy = False
            if result.expected_status == 200:
                stored_ok += result.acked
    finally:
        server.stop()

    rows_after, received = count_rows(database_url)
    written = rows_after - rows_before
    print()
    verdict = "ok" if written == stored_ok else "MISMATCH"
    print(f"outbox: {written} new rows for {stored_ok} answers 200 ({verdict})")
    if written != stored_ok or received - received_before != written:
        healthy = False
    if not healthy:
        print("errors or unexpected statuses: see the lines marked UNEXPECTED above")
        print(f"server log(s): {', '.join(map(str, server.log_paths))}")
    if args.keep or not healthy:
        print(f"kept {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
