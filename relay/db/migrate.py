"""Schema migrations: Alembic driven from code, so `aircall-relay migrate` needs no ini file.

These functions are synchronous (Alembic's env runs its own event loop); call them from a thread
when an event loop is already running.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from alembic import command
from alembic.config import Config
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


def upgrade_to_head(database_url: str) -> None:
    command.upgrade(alembic_config(database_url), "head")


def downgrade_to(database_url: str, revision: str) -> None:
    command.downgrade(alembic_config(database_url), revision)
