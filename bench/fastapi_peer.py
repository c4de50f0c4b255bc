"""The naive alternative the receiver is measured against: FastAPI on uvicorn, aiosqlite.

What a Python team would write instead of the relay's receiver, as issue 14 describes it: one
route that reads the JSON body, checks the token (401 when it is missing or wrong), INSERTs the
webhook into a SQLite table and COMMITs, then answers 200. One aiosqlite connection opened at
start, WAL, `synchronous=FULL`, so a 200 means the row is on disk, as with the relay. No dedup key,
no envelope checks, no metrics, no log line per webhook: it does less than the relay per request.

Note that with one shared connection, concurrent requests' INSERTs join the transaction that is
open on it, and the first COMMIT commits them all (the later ones find nothing to commit): the
naive code gets a group commit of sorts for free. Every 200 is still answered after a COMMIT that
holds its row (aiosqlite runs a connection's calls in order on one thread).

Variants (`--variant`): `uvloop` (uvloop, httptools, no access log: the fastest uvicorn set-up)
and `h11` (asyncio, h11, uvicorn's access log on, as uvicorn runs without its extras).

It is started by bench/ingest_vs_fastapi.py, which needs the bench-only extra:

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python bench/fastapi_peer.py --database /tmp/peer.sqlite3 --token SECRET --port 0

It prints one JSON line `{"event": "listening", "port": N}` once it accepts connections.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import json
import socket
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiosqlite
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

WEBHOOK_PATH = "/aircall/webhook"

SCHEMA = """
CREATE TABLE IF NOT EXISTS webhooks (
    id INTEGER PRIMARY KEY,
    event TEXT,
    payload TEXT NOT NULL,
    received_at REAL NOT NULL
)
"""


def create_app(database: str, token: str) -> FastAPI:
    expected = token.encode()
    state: dict[str, aiosqlite.Connection] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = await aiosqlite.connect(database)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")
        await db.execute(SCHEMA)
        await db.commit()
        state["db"] = db
        try:
            yield
        finally:
            await db.close()

    app = FastAPI(lifespan=lifespan)

    @app.post(WEBHOOK_PATH)
    async def webhook(request: Request) -> Any:
        body = await request.json()
        given = body.get("token") if isinstance(body, dict) else None
        if not isinstance(given, str) or not hmac.compare_digest(given.encode(), expected):
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        db = state["db"]
        await db.execute(
            "INSERT INTO webhooks (event, payload, received_at) VALUES (?, ?, ?)",
            (body.get("event"), json.dumps(body), time.time()),
        )
        await db.commit()
        return {"status": "stored"}

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    parser.add_argument("--database", required=True, help="SQLite file (created)")
    parser.add_argument("--token", required=True, help="the token webhooks must carry")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--variant", choices=("uvloop", "h11"), default="uvloop")
    args = parser.parse_args(argv)

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(1024)
    fast = args.variant == "uvloop"
    config = uvicorn.Config(
        create_app(args.database, args.token),
        loop="uvloop" if fast else "asyncio",
        http="httptools" if fast else "h11",
        access_log=not fast,
        log_level="warning" if fast else "info",
        lifespan="on",
        backlog=1024,
    )
    server = uvicorn.Server(config)

    # Announce the port once uvicorn has started (its startup ran the lifespan: table ready).
    original_startup = server.startup

    async def startup(sockets: list[socket.socket] | None = None) -> None:
        await original_startup(sockets=sockets)
        print(json.dumps({"event": "listening", "port": sock.getsockname()[1]}), flush=True)

    server.startup = startup  # type: ignore[method-assign]
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
