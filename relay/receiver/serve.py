"""Serving the receiver with Hypercorn: the listening socket, TLS, workers and graceful stop.

We bind the socket ourselves (and hand it to Hypercorn as `fd://N`) so that the log says which
port was taken, also when port 0 asked for any free one. With one worker the app runs in this
process and SIGTERM/SIGINT stop it gracefully; with several, Hypercorn's supervisor spawns them
and forwards the signals.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import uvloop
from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config
from hypercorn.run import run as hypercorn_run
from quart import Quart

from relay.logs import get_logger
from relay.receiver.metrics import MULTIPROCESS_METRICS_ENV
from relay.settings import SPECS_BY_NAME, Settings, SettingsError

log = get_logger("relay.receiver")

METRICS_PORT_ENV = SPECS_BY_NAME["receiver_metrics_port"].env

Result = TypeVar("Result")


def run_event_loop(main: Coroutine[Any, Any, Result]) -> Result:
    """Run `serve`'s event loop: uvloop's, which takes less CPU per webhook than asyncio's own
    (docs/performance.md has how much). Hypercorn's workers (`RELAY_WORKERS`) run on it too
    (`worker_class`). `run`, which shares its loop with the drainer, stays on asyncio's."""
    return uvloop.run(main)


def event_loop_name() -> str:
    """`uvloop` or `asyncio`: the event loop running this code, for the `listening` line."""
    return "uvloop" if isinstance(asyncio.get_running_loop(), uvloop.Loop) else "asyncio"


def bind_socket(
    host: str, port: int, reuse_port: bool = False, setting: str = "RELAY_HOST/RELAY_PORT"
) -> socket.socket:
    """A listening socket on host:port; a port that cannot be had is a SettingsError naming
    `setting`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port and hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        # A port taken or not ours to bind is a configuration problem, not a database one.
        raise SettingsError(
            f"{setting}: cannot listen on {host}:{port}: "
            f"{error.strerror or error} (is another process using the port?)"
        ) from None
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def bind_metrics_socket(settings: Settings, reuse_port: bool = False) -> socket.socket | None:
    """The socket of the receiver's `/metrics` (`RELAY_RECEIVER_METRICS_PORT`), or None when
    it is `off`. Its port is logged (`metrics_listening`)."""
    if settings.receiver_metrics_port is None:
        return None
    sock = bind_socket(
        settings.receiver_metrics_host,
        settings.receiver_metrics_port,
        reuse_port=reuse_port,
        setting="RELAY_RECEIVER_METRICS_HOST/RELAY_RECEIVER_METRICS_PORT",
    )
    host, port = sock.getsockname()[:2]
    log.info("metrics_listening", url=f"http://{host}:{port}/metrics", host=host, port=port)
    return sock


def hypercorn_config(
    settings: Settings, sock: socket.socket, metrics_sock: socket.socket | None = None
) -> Config:
    """Hypercorn's configuration; Hypercorn takes over the sockets (and closes them when done).
    The metrics socket speaks plain HTTP even when the webhooks are TLS (an `insecure_bind`,
    which Hypercorn serves only with TLS on; without, every `bind` is plain)."""
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]
    tls = bool(settings.tls_certfile and settings.tls_keyfile)
    if metrics_sock is not None:
        metrics_bind = f"fd://{metrics_sock.detach()}"
        if tls:
            config.insecure_bind = [metrics_bind]
        else:
            config.bind.append(metrics_bind)
    config.graceful_timeout = settings.shutdown_grace_seconds
    config.accesslog = None  # we write one line per webhook ourselves
    # Hypercorn's own messages go through the standard library's logging to the relay's
    # handler (`relay.logs`: redacted, one JSON line each), at its level (warning and above).
    # A path or "-" here would make Hypercorn add a handler of its own, which writes each
    # message a second time, as plain text, unredacted.
    config.errorlog = logging.getLogger("hypercorn.error")
    config.backlog = 1024
    config.keep_alive_timeout = 75  # longer than a typical load balancer's idle timeout
    if tls:
        config.certfile = settings.tls_certfile
        config.keyfile = settings.tls_keyfile
    return config


def _bind(
    settings: Settings, workers: int, event_loop: str
) -> tuple[socket.socket, socket.socket | None]:
    """The webhook socket and the metrics one (None when off), both listening and logged; with
    several workers, both shared by them (`SO_REUSEPORT`)."""
    reuse_port = workers > 1
    sock = bind_socket(settings.host, settings.port, reuse_port=reuse_port)
    try:
        metrics_sock = bind_metrics_socket(settings, reuse_port=reuse_port)
    except SettingsError:
        sock.close()
        raise
    _listening(settings, sock, workers, event_loop)
    return sock, metrics_sock


def _listening(settings: Settings, sock: socket.socket, workers: int, event_loop: str) -> None:
    host, port = sock.getsockname()[:2]
    scheme = "https" if settings.tls_certfile else "http"
    log.info(
        "listening",
        url=f"{scheme}://{host}:{port}{settings.webhook_path}",
        host=host,
        port=port,
        workers=workers,
        event_loop=event_loop,
    )


async def serve_in_process(
    app: Quart,
    settings: Settings,
    shutdown_trigger: Callable[[], Awaitable[None]],
    on_listening: Callable[[int], None] | None = None,
) -> None:
    """Serve `app` in this event loop until `shutdown_trigger` returns, then stop gracefully.

    `on_listening` is called with the port once the socket listens (port 0 picks a free one).
    """
    sock, metrics_sock = _bind(settings, workers=1, event_loop=event_loop_name())
    if on_listening is not None:
        on_listening(sock.getsockname()[1])
    # The app answers /metrics only on this port (the one taken, when 0 asked for any).
    app.extensions["relay"].metrics_port = (
        None if metrics_sock is None else metrics_sock.getsockname()[1]
    )
    config = hypercorn_config(settings, sock, metrics_sock)
    await hypercorn_serve(app, config, shutdown_trigger=shutdown_trigger)


def serve_with_workers(settings: Settings, application_path: str) -> int:
    """Several worker processes, each with its own app built from the environment by the factory
    at `application_path` (`module:factory()`, which Hypercorn imports in each worker).

    Their metrics are shared through prometheus-client's multiprocess mode: each worker keeps
    its counters and histograms in files of a directory made for this run (its path in
    `PROMETHEUS_MULTIPROC_DIR`, which the spawned workers inherit), and whichever worker
    answers `GET /metrics` sums them all (`ReceiverMetrics.render`). The directory goes when
    the server stops; under systemd it lies in the unit's private /tmp."""
    sock, metrics_sock = _bind(settings, settings.workers, event_loop="uvloop")
    if metrics_sock is not None:  # the workers learn the port taken (0: any free one)
        os.environ[METRICS_PORT_ENV] = str(metrics_sock.getsockname()[1])
    config = hypercorn_config(settings, sock, metrics_sock)
    config.workers = settings.workers
    config.worker_class = "uvloop"  # as `run_event_loop` for one worker
    config.application_path = application_path
    metrics_dir = tempfile.mkdtemp(prefix="aircall-relay-metrics-")
    os.environ[MULTIPROCESS_METRICS_ENV] = metrics_dir
    try:
        return hypercorn_run(config)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


async def wait_for_signal() -> None:
    """Return at the first SIGTERM or SIGINT."""
    import signal

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
        log.info("stopping", reason="signal")
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
