"""CPU accounting from /proc for the benchmarks: the whole machine, one process, and the local
PostgreSQL server's processes that work for one database.

PostgreSQL names each of its processes in its command line (`postgres: 15/main: postgres mydb
127.0.0.1(45572) idle` for a client backend, `postgres: 15/main: walwriter` for a background
process), so the backends of a database are found without asking the server. The background
processes (postmaster, checkpointer, background writer, WAL writer, autovacuum) work for every
database on the server, other people's included; they are counted apart.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def busy_cpu_seconds() -> float:
    """CPU time spent so far by everything on the machine (all cores, /proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def wait_for_quiet(within: float, threshold: float = 0.2) -> bool:
    """Wait (at most `within` seconds) for a second in which the machine, apart from this
    script, was busy for less than `threshold` of a core; whether one came."""
    deadline = time.monotonic() + within
    while True:
        busy, script = busy_cpu_seconds(), time.process_time()
        time.sleep(1.0)
        if busy_cpu_seconds() - busy - (time.process_time() - script) < threshold:
            return True
        if time.monotonic() >= deadline:
            return False


def _stat_fields(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process so far (all its threads), 0 once it is gone."""
    fields = _stat_fields(pid)
    return 0.0 if fields is None else (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _uptime_ticks() -> float:
    return float(Path("/proc/uptime").read_text().split()[0]) * CLOCK_TICKS


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def _postmasters() -> list[int]:
    """Processes named `postgres` whose parent is not: the local servers' postmasters."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if (entry / "comm").read_text().strip() != "postgres":
                continue
            fields = _stat_fields(int(entry.name))
            if fields is None:
                continue
            parent = Path(f"/proc/{fields[1]}/comm")
            if not parent.exists() or parent.read_text().strip() != "postgres":
                found.append(int(entry.name))
    return found


def _children(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError, ValueError):
            children += [int(child) for child in (task / "children").read_text().split()]
    return children


@dataclass
class _Seen:
    kind: str  # "backends" or "server"
    baseline: float
    last: float


@dataclass
class PostgresCpu:
    """CPU seconds of a local PostgreSQL server's processes since `start()`, sampled from /proc:
    `backends` (client backends connected to one of `databases`) and `server` (the background
    processes). Call `sample()` often enough to see the backends that come and go (a backend
    started after `start()` counts from zero; one that exits counts up to its last sample)."""

    databases: set[str]
    excluded: set[int] = field(default_factory=set)  # e.g. this script's own connection
    _postmasters: list[int] = field(default_factory=list)
    _seen: dict[int, _Seen] = field(default_factory=dict)
    _start_ticks: float = 0.0

    @property
    def available(self) -> bool:
        return bool(self._postmasters)

    def start(self) -> None:
        self._postmasters = _postmasters()
        self._seen.clear()
        self._start_ticks = _uptime_ticks()
        self.sample()

    def sample(self) -> None:
        for postmaster in self._postmasters:
            for pid in [postmaster, *_children(postmaster)]:
                if pid in self.excluded:
                    continue
                fields = _stat_fields(pid)
                if fields is None:
                    continue
                cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
                seen = self._seen.get(pid)
                if seen is not None:
                    seen.last = cpu
                    continue
                kind = self._kind(pid, postmaster)
                if kind is None:
                    continue
                started_later = int(fields[19]) >= self._start_ticks
                self._seen[pid] = _Seen(kind, 0.0 if started_later else cpu, cpu)

    def _kind(self, pid: int, postmaster: int) -> str | None:
        if pid == postmaster:
            return "server"
        # "postgres: <cluster>: <user> <database> <host(port)> <activity>" for a client backend
        words = _title(pid).split(": ", 2)[-1].split()
        if len(words) >= 3 and ("(" in words[2] or words[2] == "[local]"):
            return "backends" if words[1] in self.databases else None
        return "server"

    def seconds(self) -> dict[str, float]:
        """CPU seconds since `start()`: {"backends": ..., "server": ...}."""
        totals = {"backends": 0.0, "server": 0.0}
        for seen in self._seen.values():
            totals[seen.kind] += max(0.0, seen.last - seen.baseline)
        return totals
