"""Retention: old delivered, skipped and (if asked) dead rows are deleted, once at start and then
every hour, by the drainer process. Each kind has its own setting; 0 keeps rows forever, and dead
rows are kept by default. Pending and in-flight rows are never touched."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import anyio

from relay.db.inspect import OutboxInspector
from relay.logs import get_logger
from relay.settings import Settings, configure, from_setting

log = get_logger("relay.retention")

RETENTION_PERIOD_SECONDS = 3600.0


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    delivered_days: float = from_setting("retention_delivered_days")
    skipped_days: float = from_setting("retention_skipped_days")
    dead_days: float = from_setting("retention_dead_days")

    @classmethod
    def from_settings(cls, settings: Settings) -> RetentionPolicy:
        return configure(cls, settings)

    @property
    def enabled(self) -> bool:
        return any(days > 0 for days in (self.delivered_days, self.skipped_days, self.dead_days))

    def cut_offs(self, now: datetime) -> list[tuple[str, datetime]]:
        return [
            (status, now - timedelta(days=days))
            for status, days in (
                ("delivered", self.delivered_days),
                ("skipped", self.skipped_days),
                ("dead", self.dead_days),
            )
            if days > 0
        ]


async def purge_once(
    inspector: OutboxInspector, policy: RetentionPolicy, now: datetime
) -> dict[str, int]:
    deleted: dict[str, int] = {}
    for status, cut_off in policy.cut_offs(now):
        deleted[status] = await inspector.purge(status, cut_off, dry_run=False)
    if deleted:
        log.info("retention_purge", **{f"{status}_deleted": n for status, n in deleted.items()})
    return deleted


async def run_retention(
    inspector: OutboxInspector,
    policy: RetentionPolicy,
    clock: Callable[[], datetime],
    period_seconds: float = RETENTION_PERIOD_SECONDS,
) -> None:
    """Purge now and every `period_seconds`, until cancelled; a failed purge is retried at the
    next period."""
    if not policy.enabled:
        return
    while True:
        try:
            await purge_once(inspector, policy, clock())
        except Exception as error:
            log.warning("retention_failed", error=f"{type(error).__name__}: {error}"[:300])
        await anyio.sleep(period_seconds)
