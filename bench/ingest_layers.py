"""Where a webhook's CPU goes in the receiver: the floor each layer sets, and a profile by layer.

Throughput on a shared machine moves with other people's work; the CPU a server spends per
request moves much less. This script measures that, in µs of the server's CPU (user + system,
from /proc) per answered request, for servers that stack the receiver's layers one by one, each
pinned to CPU 0 and driven closed loop from the other CPUs by bench/receiver.py's load generator
(64 keep-alive connections, distinct Aircall webhooks), in alternated rounds:

- `asgi`: Hypercorn serving a bare ASGI function that reads the body and answers 401 with a small
  JSON body: the floor Hypercorn and h11 set, with nothing of Quart or the relay;
- `quart`: Hypercorn serving a Quart app whose one route reads the body and answers 401: the
  floor of Quart on Hypercorn;
- `relay-401`: `aircall-relay serve`, wrong token (parsed, token checked, counted, logged, 401);
- `relay-200`: the same server, right token (stored, answered after the commit).

`--loops asyncio,uvloop` runs the first two on both event loops. `--relay-root DIR` adds
`base-401`/`base-200`: another checkout's relay (e.g. `git archive <commit> | tar -x -C DIR`), to
compare a change against what it changes, alternated in the same rounds.

`--profile` then samples the relay's event-loop thread with py-spy (bench-only extra) during one
401 run and one stored run, and splits its CPU per request into layers: each sample goes to the
innermost frame of the relay's own code on its stack (log line, metrics, token check, JSON and
envelope, hand-off to the writer, the handler's own lines, its before_request hook), else to
Quart (Quart, Werkzeug, Flask), else Hypercorn and h11, else the event loop and sockets
(asyncio). Samples of other threads are the SQLite writer's.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python bench/ingest_layers.py --rounds 3 --seconds 4 --loops asyncio,uvloop --profile
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    describe,
    machine,
    measure,
    migrate,
    relay_env,
    request_bytes,
)

HERE = Path(__file__).resolve()
REFUSAL = b'{"detail":"token unknown","error":"unauthorized"}'


# ---------------------------------------------------------------------------------------------
# The bare servers (run by this script itself: `ingest_layers.py serve-asgi|serve-quart`)


async def bare_asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(REFUSAL))]
    await send({"type": "http.response.start", "status": 401, "headers": headers})
    await send({"type": "http.response.body", "body": REFUSAL})


def quart_app() -> Any:
    from quart import Quart, Response, request

    app = Quart("bench")

    @app.post("/aircall/webhook")
    async def webhook() -> Response:
        await request.get_data(cache=False, as_text=False, parse_form_data=False)
        return Response(REFUSAL, status=401, content_type="application/json")

    return app


def serve(kind: str, loop: str) -> None:
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    if kind.startswith("uvicorn"):
        serve_uvicorn(kind, sock)
        return
    config = Config()  # as relay/receiver/serve.py sets it up
    config.bind = [f"fd://{sock.detach()}"]
    config.accesslog = None
    config.keep_alive_timeout = 75
    app = bare_asgi if kind == "asgi" else quart_app()
    print(json.dumps({"event": "listening", "port": port}), flush=True)
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(hypercorn_serve(app, config))  # type: ignore[arg-type]


def serve_uvicorn(kind: str, sock: socket.socket) -> None:
    """`uvicorn-asgi`: the bare ASGI function; `uvicorn-relay`: the relay's own app (settings
    from the environment, as a Hypercorn worker builds it), on uvicorn with uvloop and
    httptools, as the FastAPI peer runs: what another ASGI server would change."""
    import uvicorn

    from relay.compose import receiver_app_from_environment

    app: Any = bare_asgi if kind == "uvicorn-asgi" else receiver_app_from_environment()
    config = uvicorn.Config(
        app, loop="uvloop", http="httptools", access_log=False, log_level="warning"
    )
    server = uvicorn.Server(config)
    startup = server.startup

    async def announce(sockets: list[socket.socket] | None = None) -> None:
        await startup(sockets=sockets)
        print(json.dumps({"event": "listening", "port": sock.getsockname()[1]}), flush=True)

    server.startup = announce  # type: ignore[method-assign]
    server.run(sockets=[sock])


# ---------------------------------------------------------------------------------------------
# Profile by layer (py-spy samples of the relay's threads)

RELAY_LAYERS: list[tuple[str, str]] = [  # (pattern in a frame, layer), innermost frame first
    ("structlog/", "structured log line"),
    ("relay/logs.py", "structured log line"),
    ("prometheus_client/", "metrics"),
    ("relay/receiver/metrics.py", "metrics"),
    ("relay/settings/tokens.py", "token check"),
    ("relay/aircall.py", "JSON parse, envelope, dedup key"),
    ("relay/json_text.py", "JSON parse, envelope, dedup key"),
    ("relay/receiver/batcher.py", "hand-off to the writer (batcher, row)"),
    ("relay/db/", "hand-off to the writer (batcher, row)"),
    ("relay/receiver/fast", "the relay's webhook route (request, response)"),
    ("relay/receiver/app.py", "the relay's webhook route (request, response)"),
]
FRAMEWORK_LAYERS: list[tuple[str, str]] = [
    ("quart/", "Quart (request context, routing, Request/Response)"),
    ("werkzeug/", "Quart (request context, routing, Request/Response)"),
    ("flask/", "Quart (request context, routing, Request/Response)"),
    ("blinker/", "Quart (request context, routing, Request/Response)"),
    ("hypercorn/", "Hypercorn and h11 (HTTP parsing, protocol, tasks)"),
    ("h11/", "Hypercorn and h11 (HTTP parsing, protocol, tasks)"),
]
FRAME = re.compile(r"^(?P<function>.*) \((?P<path>.*):\d+\)$")


def layer_of(frames: list[str]) -> str:
    """The layer a sample's CPU belongs to; `frames` outermost first."""
    parsed = [FRAME.match(frame) for frame in reversed(frames)]
    where = [
        (m.group("function"), m.group("path")) if m else ("", frame)
        for m, frame in zip(parsed, reversed(frames), strict=True)
    ]
    for depth, (function, path) in enumerate(where):
        if function == "metrics_port_serves_only_metrics":
            return "the relay's before_request hook"
        for pattern, layer in RELAY_LAYERS:
            if pattern in path:
                if layer.startswith("the relay's webhook route") and any(
                    "quart/" in p or "werkzeug/" in p for _, p in where[:depth]
                ):
                    return "Quart (called by the route: body read, request attributes, Response)"
                return layer
    for _, path in where:
        for pattern, layer in FRAMEWORK_LAYERS:
            if pattern in path:
                return layer
    return "event loop and sockets (asyncio)"


def read_profile(path: Path) -> tuple[Counter[str], int]:
    """(samples by layer of the main thread, samples of other threads) from py-spy's raw
    output recorded with --threads (each stack's first frame names its thread)."""
    layers: Counter[str] = Counter()
    others = 0
    main_thread: str | None = None
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        thread = frames[0]
        if main_thread is None and any("hypercorn" in f or "asyncio" in f for f in frames):
            main_thread = thread
        if thread != main_thread and not any("asyncio/" in f or "uvloop" in f for f in frames):
            others += int(count)
            continue
        layers[layer_of(frames[1:])] += int(count)
    return layers, others


# ---------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--warmup", type=float, default=1.5, help="seconds of warm-up per server")
    parser.add_argument("--loops", default="asyncio", help="event loops of the bare servers")
    parser.add_argument("--no-bare", action="store_true", help="only the relay(s)")
    parser.add_argument("--relay-root", type=Path, help="another checkout's relay, alternated")
    parser.add_argument(
        "--uvicorn",
        action="store_true",
        help="also the bare ASGI function and the relay's app on uvicorn (uvloop, httptools)",
    )
    parser.add_argument("--profile", action="store_true", help="py-spy profile of the relay")
    parser.add_argument("--rate", type=int, default=1000, help="py-spy samples per second")
    parser.add_argument("--examples", type=Path, default=DEFAULT_EXAMPLES)
    return parser.parse_args(argv)


def relay_command(root: Path) -> list[str]:
    """`aircall-relay serve --port 0` from the checkout at `root`."""
    code = f"import sys; sys.path.insert(0, {str(root)!r}); from relay.cli import main; main()"
    return [sys.executable, "-c", code, "serve", "--port", "0"]


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 4 and sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3])
        return 0
    args = parse_args(argv)
    payloads = Payloads(args.examples)
    workdir = Path(tempfile.mkdtemp(prefix="relay-layers-"))
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("needs two CPUs")
    pinned = {cpus[0]}
    os.sched_setaffinity(0, set(cpus[1:]))
    print(f"machine: {machine()}; servers on CPU {cpus[0]}, load on {cpus[1:]}")

    servers: dict[str, Servers] = {}
    kinds: list[tuple[str, str, int]] = []  # (label, server, expected status)
    healthy = True
    try:
        if not args.no_bare:
            for loop in args.loops.split(","):
                for kind in ("asgi", "quart"):
                    name = f"{kind}-{loop}"
                    command = [sys.executable, str(HERE), "serve", kind, loop]
                    servers[name] = Servers(
                        [Server(dict(os.environ), workdir, 1, pinned, name, command=command)]
                    )
                    kinds.append((name, name, 401))
        if args.uvicorn:
            for kind in ("uvicorn-asgi", "uvicorn-relay"):
                env = dict(os.environ)
                if kind == "uvicorn-relay":
                    env = relay_env(f"sqlite:///{workdir / (kind + '.sqlite3')}")
                    env["RELAY_RECEIVER_METRICS_PORT"] = "off"
                    migrate(env)
                command = [sys.executable, str(HERE), "serve", kind, "uvloop"]
                servers[kind] = Servers([Server(env, workdir, 1, pinned, kind, command=command)])
                kinds.append((f"{kind}-401", kind, 401))
                if kind == "uvicorn-relay":
                    kinds.append((f"{kind}-200", kind, 200))
        roots = [("relay", ROOT)]
        if args.relay_root:
            roots.append(("base", args.relay_root.resolve()))
        for name, root in roots:
            url = f"sqlite:///{workdir / (name + '.sqlite3')}"
            env = relay_env(url)
            migrate(env)
            command = relay_command(root)
            server = Server(env, workdir, 1, pinned, name, command=command, metrics=True)
            servers[name] = Servers([server])
            kinds += [(f"{name}-401", name, 401), (f"{name}-200", name, 200)]

        def run(label: str, server: str, expected: int, secs: float) -> RunResult:
            token = TOKEN if expected == 200 else WRONG_TOKEN

            def make(port: int) -> bytes:
                return request_bytes(port, payloads.body(token))

            target = servers[server]
            result = measure(
                target,
                "sqlite:///",
                label,
                expected,
                lambda result: closed_loop(target.ports, args.connections, secs, make, result),
            )
            print(describe(result), flush=True)
            return result

        for label, server, expected in kinds:
            run(label, server, expected, args.warmup)
        results: dict[str, list[RunResult]] = {label: [] for label, _, _ in kinds}
        for number in range(args.rounds):
            order = kinds if number % 2 == 0 else kinds[::-1]
            for label, server, expected in order:
                results[label].append(run(label, server, expected, args.seconds))
        print()
        print(f"server CPU per answered request, medians of {args.rounds} runs:")
        for label, runs in results.items():
            cpu = statistics.median(1e6 * r.server_cpu_seconds / max(1, r.acked) for r in runs)
            loop_cpu = statistics.median(1e6 * r.loop_cpu_seconds / max(1, r.acked) for r in runs)
            rate = statistics.median(r.rate for r in runs)
            print(f"  {label:<12} {cpu:6.0f} us (loop thread {loop_cpu:4.0f})  {rate:6.0f}/s")
            healthy = healthy and not any(r.unexpected or r.errors for r in runs)

        if args.profile:
            for label, server, expected in kinds:
                if server in ("relay", "base"):
                    profile(run, label, server, expected, args, workdir, servers[server])
    finally:
        for group in servers.values():
            group.stop()
    shutil.rmtree(workdir, ignore_errors=True)
    return 0 if healthy else 1


def profile(
    run: Callable[[str, str, int, float], RunResult],
    label: str,
    server: str,
    expected: int,
    args: argparse.Namespace,
    workdir: Path,
    target: Servers,
) -> None:
    output = workdir / f"{label}.pyspy"
    pid = target.servers[0].process.pid
    spy = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "--nonblocking",
            "--threads",
            "--format",
            "raw",
            "--rate",
            str(args.rate),
            "--output",
            str(output),
            "--pid",
            str(pid),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)
    result = run(f"{label} prof", server, expected, args.seconds)
    spy.send_signal(2)
    with contextlib.suppress(subprocess.TimeoutExpired):
        spy.wait(timeout=20)
    if not output.exists():
        print(f"  py-spy wrote no profile for {label}")
        return
    layers, others = read_profile(output)
    total = sum(layers.values())
    loop_us = 1e6 * result.loop_cpu_seconds / max(1, result.acked)
    all_us = 1e6 * result.server_cpu_seconds / max(1, result.acked)
    print()
    print(
        f"{label}: {all_us:.0f} us of CPU per request, {loop_us:.0f} on the event loop's thread "
        f"({total} samples there, {others} on other threads: {all_us - loop_us:.0f} us)"
    )
    for layer, count in layers.most_common():
        print(f"  {layer:<70} {loop_us * count / total:6.1f} us  {100 * count / total:5.1f} %")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
