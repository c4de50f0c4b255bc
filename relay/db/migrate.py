"""Schema migrations: Alembic driven from code, so `aircall-relay migrate` needs no ini file.

These functions are synchronous (Alembic's env runs its own event loop); call them from a thread
when an event loop is already running.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationInfo
from alembic.script import ScriptDirectory


def migrations_directory() -> Path:
    spec = importlib.util.find_spec("relay_migrations")
    if spec is None or spec.origin is None:  # pragma: no cover - a broken installation
        raise RuntimeError("the relay_migrations package is not installed")
    return Path(spec.origin).parent


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_directory()))
    config.attributes["database_url"] = database_url
    return config


def head_revision() -> str:
    heads = ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads()
    if len(heads) != 1:  # pragma: no cover - guarded by the migrations test
        raise RuntimeError(f"the migrations have {len(heads)} heads, expected one")
    return heads[0]


def known_revisions() -> set[str]:
    """Every revision of this version's migrations: a schema at another one was migrated by a
    newer version of the relay."""
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return {revision.revision for revision in script.walk_revisions()}


@dataclass(frozen=True, slots=True)
class Upgrade:
    """What `upgrade_to_head` did: the revision the database was at (None: no schema yet), the
    revisions applied, in order (none: it was already at head), and the head."""

    previous: str | None
    applied: tuple[str, ...]
    head: str


def upgrade_to_head(database_url: str, timeout_seconds: float | None = None) -> Upgrade:
    """Migrate to the head revision; `timeout_seconds` (RELAY_DATABASE_TIMEOUT_SECONDS) bounds
    connecting and the wait for a lock (None: the engine's own default)."""
    config = alembic_config(database_url)
    if timeout_seconds is not None:
        config.attributes["timeout_seconds"] = timeout_seconds
    steps: list[MigrationInfo] = []

    def applied(*, step: MigrationInfo, **_: Any) -> None:
        steps.append(step)

    # Alembic calls these for each migration it runs (migrations/env.py passes them on).
    config.attributes["on_version_apply"] = (applied,)
    command.upgrade(config, "head")
    head = head_revision()
    if not steps:
        return Upgrade(previous=head, applied=(), head=head)
    down = steps[0].down_revision_ids
    return Upgrade(
        previous=down[0] if down else None,
        applied=tuple(str(step.up_revision_id) for step in steps),
        head=head,
    )


def downgrade_to(database_url: str, revision: str) -> None:
    command.downgrade(alembic_config(database_url), revision)
