"""Alembic environment: async, on the relay's engine (same SQLite pragmas), batch mode on SQLite.

The URL and the timeout (RELAY_DATABASE_TIMEOUT_SECONDS: connecting, the lock's wait) are
`config.attributes["database_url"]` and `["timeout_seconds"]` when `aircall-relay migrate` calls
us, else the relay's settings when a developer runs `alembic` by hand.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from relay.db.engine import create_engine, writer
from relay.db.tables import metadata

config = context.config


def _database_url() -> str:
    url = config.attributes.get("database_url")
    if url:
        return str(url)
    from relay.settings import load_settings

    return load_settings().database_url


def _timeout_seconds() -> float:
    """`create_engine`'s timeout: the caller's; the settings' when run by hand; else the
    setting's default (a caller that gave a URL and no timeout)."""
    timeout = config.attributes.get("timeout_seconds")
    if timeout is None and not config.attributes.get("database_url"):
        from relay.settings import load_settings

        timeout = load_settings().database_timeout_seconds
    if timeout is None:
        from relay.settings import DEFAULTS

        timeout = DEFAULTS.database_timeout_seconds
    return float(timeout)


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        transaction_per_migration=True,
        # `aircall-relay migrate` hears of each migration applied (relay/db/migrate.py).
        on_version_apply=config.attributes.get("on_version_apply", ()),
    )


def _run(connection: Connection) -> None:
    _configure(connection)
    with context.begin_transaction():
        context.run_migrations()


async def _run_async() -> None:
    # No statement timeout: a migration may rightly scan or copy a large outbox. Waiting for a
    # lock stays bounded (`lock_timeout`), so a migration that meets a running relay fails
    # rather than stall it.
    engine = create_engine(_database_url(), _timeout_seconds(), statement_timeout_seconds=None)
    try:
        async with writer(engine).connect() as connection:
            await connection.run_sync(_run)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(url=_database_url(), target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_async())
