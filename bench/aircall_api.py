"""Aircall Public API client benchmark: how fast `AircallApi.calls` lists a window of calls, with
the rate limit off on both sides, from the fake Aircall in a process of its own
(`aircall-relay fake-aircall --calls N --requests-per-minute 0`, calls built from the `call.ended`
sample, one a minute).

For each run it prints the calls listed, the requests made (50 calls a page; a window over
10,000 calls costs a few more, to split it), the wall time, calls per second, and this process's
CPU seconds per 1,000 calls (the client's share: HTTP, JSON, the checks). It checks that every
call was listed once, in order. Then the medians.

With Aircall's documented limit (60 requests a minute, one a second) the client's own speed does
not matter: listing 10,000 calls takes 200 requests, so 200 s; the figures here are the cost
of the client itself, e.g. for a reconciliation against the fake.

Usage (from the repository root, with the project's virtualenv):

    .venv/bin/python bench/aircall_api.py                    # 10,000 calls, 3 runs
    .venv/bin/python bench/aircall_api.py --calls 25000 --runs 5
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import anyio

from relay.aircall_api import AircallApi

RELAY = str(Path(sys.executable).parent / "aircall-relay")
API_ID, API_TOKEN = "bench-api-id", "bench-api-token-0123456789"


async def list_all(base_url: str, count: int) -> tuple[int, int, float, float]:
    until = datetime.now(UTC)
    since = datetime.fromtimestamp(until.timestamp() - (count + 2) * 60, UTC)
    ids: list[int] = []
    async with AircallApi(base_url, API_ID, API_TOKEN, requests_per_minute=0) as api:
        wall, cpu = time.perf_counter(), time.process_time()
        async for call in api.calls(since, until):
            ids.append(call["id"])
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        requests = api.requests
    if len(ids) != count or ids != sorted(ids) or len(set(ids)) != count:
        raise SystemExit(f"listed {len(ids)} calls ({len(set(ids))} distinct), expected {count}")
    return len(ids), requests, wall, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    fake = subprocess.Popen(
        [
            RELAY,
            "fake-aircall",
            "--api-id",
            API_ID,
            "--api-token",
            API_TOKEN,
            "--requests-per-minute",
            "0",
            "--calls",
            str(args.calls),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert fake.stdout is not None
        line = fake.stdout.readline()
        if "listening on" not in line:
            raise SystemExit(f"the fake did not start: {line!r}")
        base_url = line.split("listening on ", 1)[1].strip()
        rates, cpus = [], []
        for run in range(1, args.runs + 1):
            listed, requests, wall, cpu = anyio.run(list_all, base_url, args.calls)
            rates.append(listed / wall)
            cpus.append(cpu / listed * 1000)
            print(
                f"run {run}: {listed} calls, {requests} requests, {wall:.2f} s, "
                f"{listed / wall:,.0f} calls/s, client CPU {cpu / listed * 1000:.3f} s per 1,000"
            )
        print(
            f"median: {statistics.median(rates):,.0f} calls/s, client CPU "
            f"{statistics.median(cpus):.3f} s per 1,000 calls"
        )
    finally:
        fake.terminate()
        fake.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
