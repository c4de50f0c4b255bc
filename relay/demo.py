"""`aircall-relay demo`: the whole relay on a laptop in a few seconds, nothing to configure.

It starts the fake Segment and the relay (receiver and drainer) on free loopback ports with a
temporary SQLite outbox, posts the sample call's twelve webhooks in a shuffled order plus one
duplicate and one request with a wrong token, waits until everything is delivered, then prints
what Segment received, in order, and the SQL to look at the outbox. The outbox file is kept so
that the SQL can be tried.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import random
import secrets
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import anyio
import httpx

from relay.db.migrate import upgrade_to_head
from relay.settings import AircallToken, Secret, Settings

DEMO_SETTLE_SECONDS = 2.0
SAMPLE_EVENTS = (
    "call.created",
    "call.ringing_on_agent",
    "call.agent_declined",
    "call.answered",
    "call.transferred",
    "call.hungup",
    "call.ended",
    "call.tagged",
    "call.commented",
    "call.assigned",
    "call.untagged",
    "call.archived",
)


def sample_call(token: str) -> list[dict[str, Any]]:
    """The sample call's life cycle (shipped in relay/testing/samples), in order."""
    folder = resources.files("relay.testing") / "samples"
    bodies = []
    for event in SAMPLE_EVENTS:
        body = json.loads((folder / f"{event}.json").read_text(encoding="utf-8"))
        body["token"] = token
        bodies.append(body)
    return bodies


def run_demo(keep_directory: Path | None = None, seed: int | None = None) -> int:
    from relay.testing import FakeSegment, SourceConfig

    directory = keep_directory or Path(tempfile.mkdtemp(prefix="aircall-relay-demo-"))
    database_path = directory / "outbox.sqlite3"
    database_url = f"sqlite+aiosqlite:///{database_path}"
    upgrade_to_head(database_url)
    token = secrets.token_hex(16)
    write_key = "demo-" + secrets.token_hex(8)
    with FakeSegment(write_keys={write_key: SourceConfig()}) as fake:
        settings = Settings(
            database_url=database_url,
            aircall_tokens=(AircallToken("demo", Secret(token)),),
            segment_write_key=Secret(write_key),
            segment_base_url=fake.base_url,
            settle_seconds=DEMO_SETTLE_SECONDS,
            poll_seconds=0.1,
            port=0,
            receiver_metrics_port=None,  # a demo has nothing scraping it
            log_format="console",
            log_level="warning",
            shutdown_grace_seconds=5,
        )
        print(f"fake Segment listening on {fake.base_url}")
        print(f"outbox: {database_path}")
        accepted = asyncio.run(_drive(settings, token, fake, random.Random(seed)))
    _report(accepted, database_path)
    return 0


async def _drive(settings: Settings, token: str, fake: Any, chance: random.Random) -> list[Any]:
    from relay.cli import build_drainer, build_receiver_app, close_drainer
    from relay.receiver.serve import serve_in_process

    app = build_receiver_app(settings)
    drainer = build_drainer(settings, require_write_key=True)
    stop = anyio.Event()
    ports: list[int] = []
    listening = anyio.Event()

    def on_listening(port: int) -> None:
        ports.append(port)
        listening.set()

    server = asyncio.create_task(
        serve_in_process(app, settings, stop.wait, on_listening=on_listening)
    )
    draining = asyncio.create_task(drainer.run(stop))
    try:
        await listening.wait()
        url = f"http://127.0.0.1:{ports[0]}{settings.webhook_path}"
        bodies = sample_call(token)
        shuffled = bodies[:]
        chance.shuffle(shuffled)
        print(f"relay listening on {url} (settle window {settings.settle_seconds:g} s)\n")
        print("posting the sample call's 12 webhooks, shuffled, then a duplicate and a bad token:")
        async with httpx.AsyncClient(timeout=10) as client:
            for body in [*shuffled, shuffled[0], {**shuffled[1], "token": "not-the-token"}]:
                response = await client.post(url, json=body)
                status = response.json().get("status") or response.json().get("error")
                print(f"  {body['event']:<24} -> {response.status_code} {status}")
        print("\nwaiting for delivery ...")
        await anyio.to_thread.run_sync(
            functools.partial(fake.wait_for, count=len(bodies), timeout=60)
        )
        return list(fake.accepted())
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(server, draining), timeout=15)
        await close_drainer(drainer)


def _report(accepted: list[dict[str, Any]], database_path: Path) -> None:
    print(f"\nSegment accepted {len(accepted)} track calls, in this order:")
    for position, message in enumerate(accepted, start=1):
        who = message.get("userId") or message.get("anonymousId")
        print(
            f"  {position:>2}. {message['event']:<24} {message['originalTimestamp']}  "
            f"user {who}  {message['messageId'][:20]}..."
        )
    print(
        "\nLook at the outbox (the duplicate is counted, the refused request stored nothing):\n"
        f"  sqlite3 {database_path} \\\n"
        '    "SELECT id, event, status, received_count, delivered_at FROM outbox ORDER BY '
        'occurred_at"\n'
        f'  sqlite3 {database_path} "SELECT * FROM recent_delivery_requests"\n'
        f"  RELAY_DATABASE_URL=sqlite:///{database_path} aircall-relay outbox stats"
    )
