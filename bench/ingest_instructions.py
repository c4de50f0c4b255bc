"""Instructions per webhook in the receiver, counted by valgrind's callgrind: a figure that other
work on the machine does not move, to guide and prove each cut of the request path.

Each server (the layers of bench/ingest_layers.py: `asgi` and `quart` on Hypercorn, per event
loop, and the relay itself, from this checkout and, with `--relay-root`, from another) runs under
`valgrind --tool=callgrind`. After a warm-up, the counters are zeroed (`callgrind_control
--zero`), the server is driven closed loop for `--seconds` (bench/receiver.py's load generator,
`--connections` connections, distinct Aircall webhooks), and the counters dumped
(`callgrind_control --dump`): instructions of every thread of the server (the SQLite writer's
included) over the answered requests. Under valgrind a server runs 30 to 100 times slower, so the
rates printed mean nothing; the instruction counts do not depend on them (the group commit's batch
sizes do: they are smaller here, with fewer connections, than at full speed).

    apt-get install -y valgrind
    .venv/bin/python bench/ingest_instructions.py --relay-root /tmp/base --no-bare
    .venv/bin/python bench/ingest_instructions.py --loops asyncio,uvloop
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ingest_layers import HERE as LAYERS
from ingest_layers import relay_command
from receiver import (
    DEFAULT_EXAMPLES,
    ROOT,
    TOKEN,
    WRONG_TOKEN,
    Payloads,
    RunResult,
    Server,
    closed_loop,
    migrate,
    relay_env,
    request_bytes,
)


def callgrind(command: list[str], output: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={output}.%p", *command]


def total_instructions(directory: Path, stem: str) -> int:
    """The `totals:` (or `summary:`) of the newest dump whose name starts with `stem`."""
    dumps = sorted(directory.glob(f"{stem}.*"), key=lambda path: path.stat().st_mtime)
    for line in dumps[-1].read_text(errors="replace").splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise SystemExit(f"no totals in {dumps[-1]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each counted run")
    parser.add_argument("--warmup", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--loops", default="uvloop", help="event loops of the bare servers")
    parser.add_argument("--no-bare", action="store_true", help="only the relay(s)")
    parser.add_argument("--relay-root", type=Path, help="another checkout's relay")
    parser.add_argument("--examples", type=Path, default=DEFAULT_EXAMPLES)
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        raise SystemExit("needs valgrind (apt-get install -y valgrind)")
    payloads = Payloads(args.examples)
    workdir = Path(tempfile.mkdtemp(prefix="relay-instructions-"))

    kinds: list[tuple[str, list[str], dict[str, str], list[int]]] = []
    if not args.no_bare:
        for loop in args.loops.split(","):
            for kind in ("asgi", "quart"):
                command = [sys.executable, str(LAYERS), "serve", kind, loop]
                kinds.append((f"{kind}-{loop}", command, dict(os.environ), [401]))
    roots = [("relay", ROOT)] + ([("base", args.relay_root.resolve())] if args.relay_root else [])
    for name, root in roots:
        env = relay_env(f"sqlite:///{workdir / (name + '.sqlite3')}")
        migrate(env)
        kinds.append((name, relay_command(root), env, [401, 200]))

    figures: list[tuple[str, float, int]] = []
    try:
        for name, command, env, statuses in kinds:
            stem = f"{name}.cg"
            server = Server(
                env,
                workdir,
                1,
                set(),
                name,
                command=callgrind(command, workdir / stem),
                metrics=name in ("relay", "base"),
                start_timeout=600,
            )
            try:
                for status in statuses:
                    token = TOKEN if status == 200 else WRONG_TOKEN

                    def make(port: int, token: str = token) -> bytes:
                        return request_bytes(port, payloads.body(token))

                    for seconds, counted in ((args.warmup, False), (args.seconds, True)):
                        if counted:
                            subprocess.run(
                                ["callgrind_control", "--zero", str(server.process.pid)],
                                check=True,
                                capture_output=True,
                            )
                        result = RunResult(f"{name}-{status}", status)
                        asyncio.run(
                            closed_loop([server.port], args.connections, seconds, make, result)
                        )
                        if result.unexpected or result.errors:
                            raise SystemExit(f"{name}: {result.statuses} {result.errors}")
                    subprocess.run(
                        ["callgrind_control", "--dump", str(server.process.pid)],
                        check=True,
                        capture_output=True,
                    )
                    total = total_instructions(workdir, stem)
                    per = total / max(1, result.acked)
                    figures.append((f"{name}-{status}", per, result.acked))
                    print(
                        f"{name}-{status}: {per / 1000:8.1f} k instructions per request "
                        f"({result.acked} requests)",
                        flush=True,
                    )
            finally:
                server.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    for label, per, acked in figures:
        print(f"  {label:<14} {per / 1000:8.1f} k instructions per request ({acked} requests)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
