"""`aircall-relay demo`: the whole relay on a laptop in a few seconds, nothing to configure.

It starts the fake Segment and the relay (receiver and drainer) on free loopback ports with a
temporary SQLite outbox, posts the sample call's twelve webhooks in a shuffled order plus one
duplicate and one request with a wrong token, waits until everything is delivered, then prints
what Segment received, in order, and what the outbox holds. The temporary folder is removed at
the end; with `--keep` it stays, and the demo prints the commands to look at it, as they can be
run (the `aircall-relay` command by its path when it is not on PATH).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import secrets
import shlex
import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio
import httpx

from relay.aircall import SAMPLE_CALL_EVENTS
from relay.db.migrate import upgrade_to_head
from relay.settings import AircallToken, Secret, Settings
from relay.testing.sample_payloads import sample_payload

DEMO_SETTLE_SECONDS = 2.0


def sample_call(token: str) -> list[dict[str, Any]]:
    """The sample call's life cycle (shipped in relay/testing/samples), in order."""
    return [sample_payload(event, token) for event in SAMPLE_CALL_EVENTS]


def run_demo(seed: int | None = None, keep: bool = False) -> int:
    """Run the demo in a temporary folder, removed at the end unless `keep`."""
    directory = Path(tempfile.mkdtemp(prefix="aircall-relay-demo-"))
    try:
        return _run_in(directory, seed, keep)
    finally:
        if not keep:
            shutil.rmtree(directory, ignore_errors=True)


def _run_in(directory: Path, seed: int | None, keep: bool) -> int:
    from relay.testing import FakeSegment, SourceConfig

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
    if keep:
        _show_commands(directory, database_path)
    else:
        print(
            f"\n{directory} is removed now; run the demo with --keep to keep the outbox and "
            "look at it yourself."
        )
    return 0


async def _drive(settings: Settings, token: str, fake: Any, chance: random.Random) -> list[Any]:
    from relay.compose import build_drainer, build_receiver_app, close_drainer
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
    with contextlib.closing(sqlite3.connect(database_path)) as connection:
        rows = connection.execute(
            "SELECT id, event, status, received_count FROM outbox ORDER BY occurred_at, id"
        ).fetchall()
    print("\nThe outbox (the duplicate is counted, the refused request stored nothing):")
    print(f"  {'id':>3}  {'event':<24} {'status':<10} received_count")
    for row_id, event, status, received_count in rows:
        print(f"  {row_id:>3}  {event:<24} {status:<10} {received_count}")


def _show_commands(directory: Path, database_path: Path) -> None:
    database_url = shlex.quote(f"sqlite:///{database_path}")
    relay = relay_command()
    sql = "SELECT id, event, status, received_count, delivered_at FROM outbox ORDER BY occurred_at"
    print(
        f"\nThe outbox is kept in {directory}. Look at it:\n"
        f"  RELAY_DATABASE_URL={database_url} {relay} outbox stats\n"
        f"  RELAY_DATABASE_URL={database_url} {relay} outbox list\n"
        "or with SQL, if the sqlite3 tool is installed:\n"
        f"  sqlite3 {shlex.quote(str(database_path))} {shlex.quote(sql)}\n"
        f"Remove it when done: rm -r {shlex.quote(str(directory))}"
    )


def relay_command() -> str:
    """How to run `aircall-relay` from a shell, as printed: its name when PATH finds this very
    command, else its path (in a virtualenv's bin folder, which is seldom on PATH), else this
    Python running the module."""
    script = Path(sys.executable).parent / "aircall-relay"
    if not script.is_file():
        return f"{shlex.quote(sys.executable)} -m relay.cli"
    found = shutil.which("aircall-relay")
    if found is not None and Path(found).resolve() == script.resolve():
        return "aircall-relay"
    return shlex.quote(str(script))
