"""Database URLs as the relay writes them: the async driver chosen for a plain URL.

The lowest layer (docs/architecture.md, The layers): the settings parse `RELAY_DATABASE_URL`
with it, and the database layer opens whatever URL it is given with it, so neither imports the
other.
"""

from __future__ import annotations


def normalise_database_url(url: str) -> str:
    """Pick the async driver for a plain URL: sqlite -> aiosqlite, postgresql -> asyncpg."""
    for plain, driver in (
        ("sqlite://", "sqlite+aiosqlite://"),
        ("postgresql://", "postgresql+asyncpg://"),
        ("postgres://", "postgresql+asyncpg://"),
    ):
        if url.startswith(plain):
            return driver + url[len(plain) :]
    return url
