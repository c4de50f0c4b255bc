"""The receiver beside a naive FastAPI receiver: durable webhooks/s and p99 on SQLite.

Issue 14: on the single-VM default (SQLite) the relay should store at least 1.5 times as many
webhooks per second as what a Python team would write instead, with a p99 no higher. The peer is
bench/fastapi_peer.py (FastAPI on uvicorn, aiosqlite, one INSERT + COMMIT per webhook, WAL,
`synchronous=FULL`; `--variants uvloop,h11` adds uvicorn's asyncio/h11 set-up with its access
log). Both answer 200 only once the webhook's row is committed.

Both servers run at once, each with a SQLite file of its own in a temporary directory, each pinned
to CPU 0; this script, the load generator (bench/receiver.py's: raw HTTP/1.1 keep-alive
connections on asyncio, every body a distinct Aircall webhook built from the sample payloads), runs
on the other CPUs. Each round drives every server in turn, closed loop, for `--seconds`, the order
alternating from round to round (relay first, then the peers first), so that a slow spell of a
shared machine falls on both. The ratio is the median of the rounds' ratios (relay stored/s over
the peer's); p99s are medians of the rounds' p99s. `--refused` adds a round of 401s per server
(wrong token: the same requests, no database) for their CPU per refused webhook. Each line shows
the server's CPU per request and the CPU other processes took meanwhile (DISTURBED over a fifth of
a core: then the round is measured again, up to `--retries` times).

At the end each server's table must hold exactly one row per 200 it answered.

Needs the bench-only extra (FastAPI, uvicorn, uvloop, httptools), never a dependency of the relay:

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python bench/ingest_vs_fastapi.py                       # 5 rounds of 5 s, 64 conns
    .venv/bin/python bench/ingest_vs_fastapi.py --rounds 9 --seconds 10 \
        --variants uvloop,h11 --refused

Exit status: 0 when every response had the expected status and the row counts match, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ingest_layers import HERE as LAYERS
from ingest_layers import relay_command
from proc_cpu import wait_for_quiet
from receiver import (
    DEFAULT_EXAMPLES,
    ROOT,
    TOKEN,
    WRONG_TOKEN,
    Payloads,
    RunResult,
    Server,
    Servers,
    closed_loop,
    count_rows,
    describe,
    machine,
    measure,
    migrate,
    ms,
    relay_env,
    request_bytes,
)

PEER = Path(__file__).resolve().parent / "fastapi_peer.py"


class Contender:
    """One server under test: its label, process, database, and the runs measured."""

    def __init__(self, label: str, servers: Servers, database_url: str) -> None:
        self.label = label
        self.servers = servers
        self.database_url = database_url
        self.stored: list[RunResult] = []
        self.refused: list[RunResult] = []
        self.acked = 0  # every 200, warm-up and disturbed runs included

    def rows(self) -> int:
        if self.label.startswith("relay"):
            return count_rows(self.database_url)[0]
        path = self.database_url.removeprefix("sqlite:///")
        with sqlite3.connect(path) as connection:
            return int(connection.execute("SELECT count(*) FROM webhooks").fetchone()[0])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds (each server once each)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each run")
    parser.add_argument("--connections", type=int, default=64, help="concurrent connections")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per server")
    parser.add_argument(
        "--variants",
        default="uvloop",
        help="peer variants, comma-separated: uvloop (uvloop + httptools, no access log), "
        "h11 (asyncio + h11, access log)",
    )
    parser.add_argument(
        "--refused", action="store_true", help="also a 401 run per server per round"
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="measure a round again, up to this many times, when other processes took more "
        "than a fifth of a core during one of its runs",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        help="before each run, wait up to this many seconds for a quiet second on the machine",
    )
    parser.add_argument(
        "--relay-root",
        type=Path,
        help="also another checkout's relay (`relay-base`), e.g. the code before a change",
    )
    parser.add_argument(
        "--relay-uvicorn",
        action="store_true",
        help="also the relay's app served by uvicorn (uvloop, httptools) instead of Hypercorn "
        "(`relay-uvicorn`, bench/ingest_layers.py): what another ASGI server would change",
    )
    parser.add_argument("--examples", type=Path, default=DEFAULT_EXAMPLES, help="sample payloads")
    parser.add_argument("--dir", type=Path, help="parent of the temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    payloads = Payloads(args.examples)
    workdir = Path(tempfile.mkdtemp(prefix="relay-vs-fastapi-", dir=args.dir))
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("needs two CPUs: the servers on one, the load generator on the others")
    server_cpus = {cpus[0]}
    os.sched_setaffinity(0, set(cpus[1:]))
    print(f"machine: {machine()}")
    print(
        f"servers pinned to CPU {cpus[0]}, load generator on {cpus[1:]}; {args.connections} "
        f"connections, {args.rounds} rounds of {args.seconds:g} s per server, SQLite in {workdir}"
    )

    relay_url = f"sqlite:///{workdir / 'relay.sqlite3'}"
    env = relay_env(relay_url)
    migrate(env)
    contenders: list[Contender] = []
    healthy = True
    try:
        contenders.append(
            Contender("relay", Servers([Server(env, workdir, 1, server_cpus, "relay")]), relay_url)
        )
        others: list[tuple[str, list[str], dict[str, str]]] = []
        if args.relay_root:
            others.append(("relay-base", relay_command(args.relay_root.resolve()), {}))
        if args.relay_uvicorn:
            command = [sys.executable, str(LAYERS), "serve", "uvicorn-relay", "uvloop"]
            others.append(("relay-uvicorn", command, {"RELAY_RECEIVER_METRICS_PORT": "off"}))
        for label, command, extra in others:
            url = f"sqlite:///{workdir / (label + '.sqlite3')}"
            other_env = {**relay_env(url), **extra}
            migrate(other_env)
            server = Server(
                other_env, workdir, 1, server_cpus, label, command=command, metrics=not extra
            )
            contenders.append(Contender(label, Servers([server]), url))
        for variant in args.variants.split(","):
            label = f"fastapi-{variant}"
            database = workdir / f"{label}.sqlite3"
            command = [sys.executable, str(PEER), "--database", str(database)]
            command += ["--token", TOKEN, "--variant", variant]
            server = Server(dict(os.environ), workdir, 1, server_cpus, label, command=command)
            contenders.append(Contender(label, Servers([server]), f"sqlite:///{database}"))

        def run(contender: Contender, label: str, expected: int, secs: float) -> RunResult:
            token = TOKEN if expected == 200 else WRONG_TOKEN

            def make(port: int) -> bytes:
                return request_bytes(port, payloads.body(token))

            if args.quiet_wait > 0:
                wait_for_quiet(args.quiet_wait)
            servers = contender.servers
            result = measure(
                servers,
                contender.database_url,
                f"{contender.label[:14]} {label}",
                expected,
                lambda result: closed_loop(servers.ports, args.connections, secs, make, result),
            )
            if expected == 200:
                contender.acked += result.acked
            print(describe(result), flush=True)
            return result

        for contender in contenders:
            if args.warmup > 0:
                run(contender, "warm", 200, args.warmup)
                if args.refused:
                    run(contender, "warm401", 401, args.warmup)
        everything: list[RunResult] = []
        for number in range(1, args.rounds + 1):
            order = contenders if number % 2 else [*contenders[1:], contenders[0]]
            for attempt in range(args.retries + 1):
                stored: dict[str, RunResult] = {}
                refused: dict[str, RunResult] = {}
                for contender in order:
                    stored[contender.label] = run(contender, f"{number}", 200, args.seconds)
                    if args.refused:
                        refused[contender.label] = run(
                            contender, f"{number} 401", 401, args.seconds
                        )
                runs = [*stored.values(), *refused.values()]
                everything += runs
                if attempt < args.retries and any(r.disturbed for r in runs):
                    print("  (round disturbed by other processes: measured again)")
                    time.sleep(args.seconds)
                    continue
                break
            for contender in contenders:
                contender.stored.append(stored[contender.label])
                if args.refused:
                    contender.refused.append(refused[contender.label])
        healthy = not any(r.unexpected or r.errors for r in everything)
        report(contenders)
    finally:
        for contender in contenders:
            contender.servers.stop()

    print()
    for contender in contenders:
        rows = contender.rows()
        verdict = "ok" if rows == contender.acked else "MISMATCH"
        print(f"{contender.label}: {rows} rows for {contender.acked} answers 200 ({verdict})")
        healthy = healthy and rows == contender.acked
    if args.keep or not healthy:
        print(f"kept {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if healthy else 1


def report(contenders: list[Contender]) -> None:
    def cpu_us(runs: list[RunResult]) -> float:
        return statistics.median(1e6 * r.server_cpu_seconds / max(1, r.acked) for r in runs)

    print()
    print(f"medians of {len(contenders[0].stored)} rounds (durable = answered 200 after commit):")
    for contender in contenders:
        runs = contender.stored
        line = (
            f"  {contender.label:<15} {statistics.median(r.rate for r in runs):7.0f} durable/s"
            f"  p50 {ms(statistics.median(r.percentile(0.5) for r in runs))} ms"
            f"  p99 {ms(statistics.median(r.percentile(0.99) for r in runs))} ms"
            f"  server CPU {cpu_us(runs):5.0f} us/webhook"
        )
        if contender.refused:
            line += f", {cpu_us(contender.refused):5.0f} us per 401"
        print(line)
    relay = contenders[0]
    for peer in contenders[1:]:
        if peer.label.startswith("relay"):
            continue
        ratios = [a.rate / b.rate for a, b in zip(relay.stored, peer.stored, strict=True)]
        p99s = [
            a.percentile(0.99) / b.percentile(0.99)
            for a, b in zip(relay.stored, peer.stored, strict=True)
        ]
        print(
            f"  relay / {peer.label}: {statistics.median(ratios):.2f}x durable/s (rounds: "
            + ", ".join(f"{ratio:.2f}" for ratio in ratios)
            + f"); p99 relay/peer {statistics.median(p99s):.2f}"
        )
    peers = [c for c in contenders if not c.label.startswith("relay")]
    for other in contenders[1:]:
        if other.label.startswith("relay"):
            for peer in peers:
                ratios = [a.rate / b.rate for a, b in zip(other.stored, peer.stored, strict=True)]
                print(f"  {other.label} / {peer.label}: {statistics.median(ratios):.2f}x durable/s")
    disturbed = sum(r.disturbed for c in contenders for r in c.stored + c.refused)
    if disturbed:
        print(f"  {disturbed} runs kept were disturbed by other processes")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
