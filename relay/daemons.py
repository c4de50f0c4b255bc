"""The long-running commands, `serve`, `drain` and `run`: their settings, their signals, and how
they start and stop what relay/compose.py builds. Each returns the process's exit code (0 after a
clean stop); relay/cli.py parses the command line and calls them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from dataclasses import asdict

import anyio

from relay.check import require_schema_at_head
from relay.compose import (
    WORKER_APPLICATION_PATH,
    aircall_probe_task,
    build_drainer,
    build_receiver_app,
    close_drainer,
    retention_task,
    serve_drainer_metrics,
    setup_logging,
)
from relay.drainer.ledger import DrainSummary
from relay.drainer.metrics import DrainerMetrics
from relay.logs import get_logger
from relay.settings import CONFIG_FILE_ENV, Settings, load_settings

# The receiver's modules (Quart, Hypercorn) are imported by the commands that serve it, so that
# `drain`, `migrate` and `outbox` start without them (docs/performance.md, "Figures behind the
# code", has what that saves).

log = get_logger("relay.cli")


def build_settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(config_file=getattr(args, "config", None))
    overrides = {
        name: getattr(args, name, None)
        for name in ("host", "port", "workers", "tls_certfile", "tls_keyfile")
    }
    return settings.with_overrides(**overrides)


async def stop_on_signals(stop: anyio.Event, scope: anyio.CancelScope) -> None:
    """The first SIGTERM or SIGINT stops gracefully; a second one stops at once."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            if stop.is_set():
                log.warning("stopping_now", signal=signal.Signals(signum).name)
                scope.cancel()
                return
            log.info("stopping", signal=signal.Signals(signum).name)
            stop.set()


def receiver_settings(args: argparse.Namespace) -> Settings:
    """The settings of a command that takes webhooks (`serve`, `run`), logging set up, checked:
    the TLS files, the tokens, and the schema at head."""
    settings = build_settings(args)
    setup_logging(settings)
    settings.check_tls()
    settings.require_tokens()
    asyncio.run(require_schema_at_head(settings))
    return settings


def serve(args: argparse.Namespace) -> int:
    from relay.receiver.serve import (
        run_event_loop,
        serve_in_process,
        serve_with_workers,
        wait_for_signal,
    )

    settings = receiver_settings(args)
    if settings.workers > 1:
        if settings.config_file:  # the workers read their settings from the environment
            os.environ[CONFIG_FILE_ENV] = settings.config_file
        return serve_with_workers(settings, WORKER_APPLICATION_PATH)
    app = build_receiver_app(settings)
    run_event_loop(serve_in_process(app, settings, wait_for_signal))
    log.info("stopped")
    return 0


def drain(args: argparse.Namespace) -> int:
    settings = build_settings(args)
    setup_logging(settings)
    settings.require_write_key()
    asyncio.run(require_schema_at_head(settings))
    drainer = build_drainer(settings, require_write_key=True)

    async def side_tasks(stop: anyio.Event) -> None:
        """Retention and the Aircall probe, stopped as soon as the drainer is asked to stop:
        not after it, since a purge batch holding SQLite's write lock would keep the drainer's
        own last statements waiting, batch after batch, until the purge is over."""
        async with anyio.create_task_group() as side:
            side.start_soon(retention_task(settings, drainer))
            side.start_soon(aircall_probe_task(settings, drainer))
            await stop.wait()
            side.cancel_scope.cancel()

    async def main() -> DrainSummary:
        stop = anyio.Event()
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(stop_on_signals, stop, group.cancel_scope)
                if not args.once:
                    group.start_soon(side_tasks, stop)
                summary = await drainer.run(stop, once=args.once)
                group.cancel_scope.cancel()
            return summary
        finally:
            await close_drainer(drainer)

    # `--once` exits as soon as it is done: nothing would scrape it.
    metrics_server = None if args.once else serve_drainer_metrics(settings, drainer)
    try:
        summary = anyio.run(main)
    finally:
        if metrics_server is not None:
            metrics_server.close()
    if args.once:
        print(json.dumps(asdict(summary)))
    return 0


def run(args: argparse.Namespace) -> int:
    """Everything in one process, for a laptop: receiver and drainer; one Ctrl-C stops both."""
    from relay.receiver.serve import serve_in_process

    settings = receiver_settings(args)
    # One scrape for both: the receiver's /metrics renders the drainer's registry too (the
    # drainer's own metrics port is not opened).
    drainer_metrics = DrainerMetrics()
    app = build_receiver_app(settings, extra_metrics=[drainer_metrics.registry])
    drainer = build_drainer(settings, require_write_key=False, metrics=drainer_metrics)

    async def main() -> None:
        # Plain asyncio here: Hypercorn manages its own tasks, and the drainer (anyio) runs on
        # the same loop as a task of its own. A drainer that fails stops the receiver too.
        stop = anyio.Event()
        loop = asyncio.get_running_loop()
        # The drainer and retention are stopped through cancel scopes, not `Task.cancel()`,
        # which would abandon their database work under way (`relay.db.engine.not_abandoned`).
        drain_scope = anyio.CancelScope()
        retention_scope = anyio.CancelScope()
        probe_scope = anyio.CancelScope()

        async def drain() -> None:
            with drain_scope:
                await drainer.run(stop)

        async def retain() -> None:
            with retention_scope:
                await retention_task(settings, drainer)()

        async def probe() -> None:
            with probe_scope:
                await aircall_probe_task(settings, drainer)()

        drain_task = asyncio.create_task(drain(), name="drainer")
        drain_task.add_done_callback(lambda _: stop.set())
        retention = asyncio.create_task(retain(), name="retention")
        aircall_probe = asyncio.create_task(probe(), name="aircall-probe")

        def on_signal(signum: int) -> None:
            if stop.is_set():
                log.warning("stopping_now", signal=signal.Signals(signum).name)
                drain_scope.cancel()
            else:
                log.info("stopping", signal=signal.Signals(signum).name)
            stop.set()
            # Retention and the probe stop now (a purge between two batches), not after the
            # drainer: see drain().
            retention_scope.cancel()
            probe_scope.cancel()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        try:
            await serve_in_process(app, settings, stop.wait)
            stop.set()
            drain_scope.deadline = anyio.current_time() + settings.shutdown_grace_seconds + 5
            await drain_task
        finally:
            retention_scope.cancel()
            probe_scope.cancel()
            await retention
            await aircall_probe
            await close_drainer(drainer)

    asyncio.run(main())
    log.info("stopped")
    return 0
