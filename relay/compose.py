"""The composition root: the only place that builds engines, stores, apps and the drainer from
settings, for the commands (relay/cli.py, relay/demo.py) and Hypercorn's worker processes.

Below the commands and above everything it builds (docs/architecture.md, The layers): the
receiver, the drainer and the database layer get values from here, never the settings module's
loading.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import CollectorRegistry

from relay.aircall_api import AircallApi
from relay.db.delivery import DeliveryStore
from relay.db.engine import create_engine
from relay.db.inspect import OutboxInspector
from relay.db.migrate import head_revision
from relay.db.notify import listener_for
from relay.db.store import OutboxStore
from relay.drainer.config import DrainerConfig
from relay.drainer.loop import Drainer, utc_now
from relay.drainer.metrics import DrainerMetrics
from relay.drainer.metrics_server import MetricsServer
from relay.drainer.retention import RetentionPolicy, run_retention
from relay.drainer.sender import SegmentSender
from relay.drainer.webhook_probe import WebhookProbe
from relay.logs import configure_logging, get_logger
from relay.segment import MappingOptions
from relay.settings import Settings, load_settings

if TYPE_CHECKING:
    from quart import Quart

# The receiver's modules (Quart, Hypercorn) are imported by the functions that build or serve
# it, so that `drain`, `migrate` and `outbox` start without them.

log = get_logger("relay.compose")


def setup_logging(settings: Settings) -> None:
    configure_logging(settings.log_format, settings.log_level, secrets=settings.secrets())


def setup_logging_to_stderr(settings: Settings) -> None:
    """For a command whose output is on stdout (a table, JSON, a report): its logs, warnings
    and above, go to stderr."""
    configure_logging(settings.log_format, "warning", settings.secrets(), stream=sys.stderr)


def build_store(settings: Settings) -> OutboxStore:
    return OutboxStore(create_engine(settings.database_url, settings.database_timeout_seconds))


def build_receiver_app(
    settings: Settings, extra_metrics: Sequence[CollectorRegistry] = ()
) -> Quart:
    from relay.receiver.app import create_app

    settings.require_tokens()
    store = build_store(settings)
    for event in settings.unknown_forward_events():
        log.warning("forward_event_unknown", event=event, setting="RELAY_FORWARD_EVENTS")
    return create_app(
        settings,
        store,
        head_revision(),
        on_shutdown=store.engine.dispose,
        extra_metrics=extra_metrics,
    )


def build_drainer(
    settings: Settings, require_write_key: bool, metrics: DrainerMetrics | None = None
) -> Drainer:
    """The drainer; without a write key it runs paused (for `run`) or is refused (for `drain`)."""
    if require_write_key:
        settings.require_write_key()
    engine = create_engine(settings.database_url, settings.database_timeout_seconds)
    config = DrainerConfig.from_settings(settings)
    sender = (
        None
        if settings.segment_write_key is None
        else SegmentSender(
            settings.segment_base_url,
            settings.segment_write_key.reveal(),
            timeout_seconds=settings.segment_timeout_seconds,
            max_connections=settings.segment_concurrency,
        )
    )
    return Drainer(
        DeliveryStore(engine),
        sender,
        config,
        MappingOptions(
            drop_paths=settings.pii_drop_paths,
            hash_paths=settings.pii_hash_paths,
            hash_key=None
            if settings.pii_hash_key is None
            else settings.pii_hash_key.reveal().encode(),
        ),
        metrics=metrics,
        # PostgreSQL: LISTEN for the receivers' commits (None on SQLite, which only polls).
        notifications=listener_for(settings.database_url, settings.database_timeout_seconds),
    )


def serve_drainer_metrics(settings: Settings, drainer: Drainer) -> MetricsServer | None:
    """The drainer's `/metrics` on its own port (None when `RELAY_DRAINER_METRICS_PORT=off`);
    a port in use is a SettingsError naming the setting (exit 2)."""
    if settings.drainer_metrics_port is None:
        return None
    server = MetricsServer(
        drainer.metrics.registry, settings.drainer_metrics_host, settings.drainer_metrics_port
    )
    log.info(
        "metrics_listening",
        url=server.url,
        host=server.host,
        port=server.port,
    )
    return server


def retention_task(settings: Settings, drainer: Drainer) -> Callable[[], Coroutine[Any, Any, None]]:
    """The retention purge, on the drainer's database (a no-op when retention is off)."""
    policy = RetentionPolicy.from_settings(settings)
    inspector = OutboxInspector(drainer.store.engine)
    return functools.partial(run_retention, inspector, policy, utc_now)


def aircall_probe_task(
    settings: Settings, drainer: Drainer
) -> Callable[[], Coroutine[Any, Any, None]]:
    """The drainer's probe of Aircall's webhooks (relay/drainer/webhook_probe.py); when it is off
    (RELAY_AIRCALL_PROBE_SECONDS=0, or a setting it needs is not set) the task says why, once,
    and returns."""
    off = None
    if settings.aircall_probe_seconds == 0:
        off = "RELAY_AIRCALL_PROBE_SECONDS is 0"
    elif not settings.aircall_api_configured():
        missing = [
            name
            for name, value in (
                ("RELAY_AIRCALL_API_ID", settings.aircall_api_id),
                ("RELAY_AIRCALL_API_TOKEN", settings.aircall_api_token),
            )
            if value is None
        ]
        off = f"{' and '.join(missing)} not set"
    elif not settings.aircall_tokens:
        off = "RELAY_AIRCALL_TOKENS is not set: no webhook to look for"

    async def probe() -> None:
        if off is not None:
            log.info("aircall_probe_off", reason=off)
            return
        try:
            async with AircallApi.from_settings(settings) as api:
                log.info(
                    "aircall_probe_started",
                    aircall_api_url=api.base_url,
                    every_s=settings.aircall_probe_seconds,
                    labels=[token.label for token in settings.aircall_tokens],
                )
                await WebhookProbe(
                    api,
                    settings.aircall_tokens,
                    settings.forward_events,
                    drainer.metrics,
                    settings.aircall_probe_seconds,
                ).run_forever()
        except Exception as error:  # a bug of the probe's own: delivery goes on without it
            log.error("aircall_probe_stopped", error=f"{type(error).__name__}: {error}"[:500])

    return probe


async def close_drainer(drainer: Drainer) -> None:
    if isinstance(drainer.sender, SegmentSender):
        await drainer.sender.close()
    if drainer.notifications is not None:
        await drainer.notifications.close()
    await drainer.store.engine.dispose()


def receiver_app_from_environment() -> Quart:
    """Factory for Hypercorn's worker processes (settings from the inherited environment)."""
    settings = load_settings()
    setup_logging(settings)
    return build_receiver_app(settings)


# The factory Hypercorn's spawned workers call to build their own app from the environment.
WORKER_APPLICATION_PATH: Final[str] = f"{__name__}:{receiver_app_from_environment.__qualname__}()"
