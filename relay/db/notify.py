"""PostgreSQL's LISTEN/NOTIFY between receivers and drainers: the channel, the NOTIFY a
receiver's commit carries, and the listener that tells a drainer about it.

A receiver's group commit that writes new forwarded rows sends one `NOTIFY` in its transaction
(`notify_statement`, used by `OutboxStore`), so PostgreSQL delivers it only if the commit
succeeds, and once per commit whatever the number of rows; an operator's `outbox requeue` sends
one too, marked `ready:` (its rows need not settle). A drainer listens on a connection of
its own (`OutboxListener`, outside the engine's pool, which would hand it back after each use):
each notification calls the drainer's `on_commit`; the connection is watched (termination
callback, and a `SELECT 1` every `check_seconds` for a server that vanished without closing
it), and opened again with backoff when it drops. The drainer polls meanwhile. SQLite has no
such channel: `listener_for` gives None and its drainers only poll.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import anyio
from sqlalchemy.engine import make_url

from relay.database_url import normalise_database_url
from relay.logs import get_logger

log = get_logger("relay.db.notify")

# The channel a commit of new rows is announced on. `LISTEN aircall_relay_outbox;` in psql shows
# them; the payload is the number of new rows to deliver that the commit holds, prefixed with
# `ready:` when they are deliverable at once (rows an operator requeued, long settled) rather
# than once settled (new rows from a receiver).
READY_PREFIX: Final = "ready:"
CHANNEL: Final = "aircall_relay_outbox"
# How the listener's connection appears in pg_stat_activity.
APPLICATION_NAME: Final = "aircall-relay-listen"

# Options of SQLAlchemy's asyncpg dialect that asyncpg.connect itself does not take.
_DIALECT_ONLY_OPTIONS: Final = (
    "prepared_statement_cache_size",
    "prepared_statement_name_func",
    "async_creator_fn",
)


def notify_statement(new_rows: int, *, ready: bool = False) -> tuple[str, tuple[str, str]]:
    """SQL and parameters of the NOTIFY announcing `new_rows` rows to deliver (PostgreSQL only);
    `ready`: deliverable now, not once settled."""
    payload = f"{READY_PREFIX}{new_rows}" if ready else str(new_rows)
    return "SELECT pg_notify($1, $2)", (CHANNEL, payload)


def listener_for(database_url: str, timeout_seconds: float) -> OutboxListener | None:
    """A listener on the database of `database_url`; None on SQLite, which has no NOTIFY."""
    url = normalise_database_url(database_url)
    if not url.startswith("postgresql"):
        return None
    return OutboxListener(url, timeout_seconds=timeout_seconds)


def connect_arguments(database_url: str) -> dict[str, Any]:
    """`asyncpg.connect` keyword arguments for a URL, read as the engine's dialect reads it (so
    host, port, user, password, database and query options such as `ssl` mean the same)."""
    from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg

    dialect_class: Any = PGDialect_asyncpg  # untyped in SQLAlchemy
    dialect = dialect_class()
    _, arguments = dialect.create_connect_args(make_url(normalise_database_url(database_url)))
    for option in _DIALECT_ONLY_OPTIONS:
        arguments.pop(option, None)
    return dict(arguments)


class OutboxListener:
    """LISTEN on `CHANNEL` on a connection of its own, for one drainer, reconnecting when it
    drops (a PostgreSQL restart, an administrator's `pg_terminate_backend`, a network cut).

    `run` lasts until cancelled: it calls `on_listening(True)` each time the LISTEN is in
    place (at start and after each reconnection: commits made while no one listened were not
    announced), `on_listening(False)` when the connection is lost, and `on_commit` for each
    notification. `listening` says whether notifications can arrive now; while it is False the
    drainer polls at its short interval.
    """

    def __init__(
        self,
        database_url: str,
        timeout_seconds: float,
        check_seconds: float = 30.0,
        retry_base_seconds: float = 0.5,
        retry_cap_seconds: float = 30.0,
        channel: str = CHANNEL,
    ) -> None:
        self._arguments = connect_arguments(database_url)
        self._timeout_seconds = timeout_seconds
        self._check_seconds = check_seconds
        self._retry_base_seconds = retry_base_seconds
        self._retry_cap_seconds = retry_cap_seconds
        self.channel = channel
        self.listening = False
        self.server_pid: int | None = None  # the listening backend's pid, while listening
        self.connections = 0  # connections that reached LISTEN, since start
        self._connection: Any = None

    async def run(
        self, on_commit: Callable[[str], None], on_listening: Callable[[bool], None]
    ) -> None:
        try:
            await self._run(on_commit, on_listening)
        finally:
            self.listening = False
            with anyio.CancelScope(shield=True):
                await self._close()

    async def _run(
        self, on_commit: Callable[[str], None], on_listening: Callable[[bool], None]
    ) -> None:
        failures = 0  # consecutive attempts that did not reach LISTEN
        while True:
            lost = anyio.Event()
            try:
                await self._listen(on_commit, lost)
            except Exception as error:
                failures += 1
                delay = min(self._retry_base_seconds * 2 ** (failures - 1), self._retry_cap_seconds)
                await self._close()
                log.warning(
                    "listener_connect_failed",
                    channel=self.channel,
                    error=f"{type(error).__name__}: {error}"[:300],
                    retry_in_s=delay,
                    detail="the drainer polls meanwhile",
                )
                await anyio.sleep(delay)
                continue
            failures = 0
            self.listening = True
            self.connections += 1
            log.info(
                "listening",
                channel=self.channel,
                server_pid=self.server_pid,
                reconnected=self.connections > 1,
            )
            try:
                on_listening(True)
                error_text = await self._watch(lost)
            finally:
                self.listening = False
                self.server_pid = None
                with anyio.CancelScope(shield=True):
                    await self._close()
            on_listening(False)
            delay = self._retry_base_seconds
            log.warning(
                "listener_lost",
                channel=self.channel,
                error=error_text,
                retry_in_s=delay,
                detail="the drainer polls until it listens again",
            )
            await anyio.sleep(delay)

    async def _listen(self, on_commit: Callable[[str], None], lost: anyio.Event) -> None:
        import asyncpg

        with anyio.fail_after(self._timeout_seconds * 2):
            connection = await asyncpg.connect(
                **self._arguments,
                timeout=self._timeout_seconds,
                server_settings={"application_name": APPLICATION_NAME},
            )
            self._connection = connection
            connection.add_termination_listener(lambda _connection: lost.set())
            await connection.add_listener(
                self.channel, lambda _connection, _pid, _channel, payload: on_commit(payload)
            )
        self.server_pid = connection.get_server_pid()

    async def _watch(self, lost: anyio.Event) -> str:
        """Until the connection is lost; what was seen of the loss."""
        while True:
            with anyio.move_on_after(self._check_seconds):
                await lost.wait()
            if lost.is_set():
                return "connection closed"
            try:
                with anyio.fail_after(self._timeout_seconds):
                    await self._connection.fetchval("SELECT 1")
            except Exception as error:
                return f"{type(error).__name__}: {error}"[:300]

    async def _close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None or connection.is_closed():
            return
        try:
            with anyio.fail_after(self._timeout_seconds):
                await connection.close()
        except Exception:  # the server is gone: drop the socket
            connection.terminate()

    async def close(self) -> None:
        """Close the connection now (idempotent); `run`, if still running, opens it again."""
        await self._close()
