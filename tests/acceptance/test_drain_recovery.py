"""`aircall-relay drain` and `run` on a SQLite file that stops taking writes for a while (its
files made read-only, its disk full) claim, deliver and take webhooks again as soon as the
files can be written, without a restart, and the fake Segment gets every event once (issue 10,
fault 2, for the drainer; `test_serve_recovery.py` has the receiver alone).

SQLite shares one mapping of the database's `-shm` file among the connections of a process
while one of them is open, and a connection opened while the file could not be written maps it
read-only (relay/db/engine.py). So a process recovers only if none of its connections opened
during the read-only period lives on. A process that was running when the files became
read-only keeps the connections it has (a file opened for writing stays so after a `chmod`) and
goes on, until it opens a new one: the running drainer here does so after a write lock held past
its busy timeout (an operator's long transaction) failed a claim.

The relay runs as `nobody` when the tests run as root (`service_user`), so that the files'
permissions bind it. This process keeps a connection of its own open throughout
(`wal_kept_open`), as the receiver's process would: the `-wal` and `-shm` files then stay, and
stay the service user's, while the relay's processes have none open.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay import aircall
from relay.db.migrate import upgrade_to_head
from relay.testing import FakeSegment, SourceConfig
from tests.acceptance.processes import (
    NOBODY,
    RelayProcess,
    chmod_all,
    service_user,
    statuses,
    wait_until,
)
from tests.acceptance.test_drain_process import WRITE_KEY, build_backlog, drainer_env, fill_outbox
from tests.acceptance.test_metrics_process import scrape, value
from tests.support import SAMPLE_TOKEN, Backlog, OutboxDatabase, assert_accepted_exactly, sample

TOKENS = f"main:{SAMPLE_TOKEN}"
WEBHOOK = "/aircall/webhook"
JSON = {"content-type": "application/json"}
READ_ONLY = "attempt to write a readonly database"
LOCKED = "database is locked"
# Far more than the drainer's longest wait between two failed claims (5 s) and the receiver's
# wait bound: what a relay that does not recover runs into.
RECOVERY_TIMEOUT = 30.0


@pytest.fixture
def fake() -> Iterator[FakeSegment]:
    with FakeSegment(write_keys={WRITE_KEY: SourceConfig()}) as server:
        yield server


@contextmanager
def outbox_in(
    directory: Path, options: dict[str, Any], bodies: list[dict[str, Any]]
) -> Iterator[OutboxDatabase]:
    """A migrated outbox in `directory` holding `bodies`, its files (the database, its `-wal`
    and `-shm`) kept open by this process meanwhile (`wal_kept_open`), and the service user's
    when `options` run the relay as `nobody` (`service_user`)."""
    path = directory / "outbox.sqlite3"
    database = OutboxDatabase("sqlite", f"sqlite+aiosqlite:///{path}")
    upgrade_to_head(database.url)
    fill_outbox(database, bodies)
    with wal_kept_open(path):
        names = {file.name for file in directory.iterdir()}
        assert names == {path.name, f"{path.name}-wal", f"{path.name}-shm"}
        if options:
            for file in directory.iterdir():
                os.chown(file, NOBODY, NOBODY)
        yield database


@contextmanager
def wal_kept_open(path: Path) -> Iterator[None]:
    """A connection of this process holding the database's `-wal` and `-shm` files open. The
    last connection to a database to close deletes them, and the next one creates them again:
    without this one, a read by this process (root) could delete them while the relay has none
    open, or create them root's, which the service user could then never write."""
    connection = sqlite3.connect(path)
    try:
        connection.execute("SELECT count(*) FROM outbox").fetchone()
        yield
    finally:
        connection.close()


def wait_for_claims_failing(process: RelayProcess, error: str) -> None:
    """Until the process logs a `claim_failed` with `error`."""

    def failed() -> bool:
        return any(
            record.get("event") == "claim_failed" and error in str(record.get("error"))
            for record in process.records()
        )

    wait_until(
        failed,
        f"a claim failing with {error!r}",
        timeout=RECOVERY_TIMEOUT,
        process=process,
    )


def wait_for_delivery(process: RelayProcess, fake: FakeSegment, events: int) -> None:
    wait_until(
        lambda: len(fake.accepted()) >= events,
        f"{events} events accepted by Segment",
        timeout=RECOVERY_TIMEOUT,
        process=process,
        detail=lambda: f"fake: {fake.stats()}",
    )


def combined(first: Backlog, second: Backlog) -> Backlog:
    return Backlog(first.bodies + second.bodies, {**first.expected, **second.expected})


def stop(process: RelayProcess) -> None:
    process.signal(signal.SIGTERM)
    code = process.wait(30)
    assert code == 0, f"exit {code} after SIGTERM:\n{process.tail()}"


def test_drain_started_while_its_files_are_read_only_delivers_once_they_are_writable(
    fake: FakeSegment,
) -> None:
    backlog = build_backlog(24, first_call=7_100_000_000, seed=1)
    with (
        service_user() as (directory, options),
        outbox_in(directory, options, backlog.bodies) as database,
    ):
        chmod_all(directory, 0o444)
        drainer = RelayProcess("drain", env=drainer_env(database, fake), **options)
        try:
            wait_for_claims_failing(drainer, READ_ONLY)
            assert fake.accepted() == []

            chmod_all(directory, 0o644)  # the database, its -wal and -shm are writable again
            wait_for_delivery(drainer, fake, len(backlog.bodies))
            stop(drainer)
        finally:
            drainer.stop()
        assert statuses(database) == {"delivered": len(backlog.bodies)}
    assert_accepted_exactly(fake, backlog)


def test_drain_that_reconnects_while_its_files_are_read_only_delivers_once_they_are_writable(
    fake: FakeSegment,
) -> None:
    before = build_backlog(12, first_call=7_200_000_000, seed=2)
    during = build_backlog(24, first_call=7_300_000_000, seed=3)
    with (
        service_user() as (directory, options),
        outbox_in(directory, options, before.bodies) as database,
    ):
        drainer = RelayProcess("drain", env=drainer_env(database, fake), **options)
        try:
            wait_for_delivery(drainer, fake, len(before.bodies))
            chmod_all(directory, 0o444)
            # Its connection, opened read-write, writes on; a claim that fails (the write lock
            # held past its busy timeout) makes it open a new one, on read-only files.
            lock = sqlite3.connect(directory / "outbox.sqlite3", isolation_level=None)
            try:
                lock.execute("BEGIN IMMEDIATE")
                wait_for_claims_failing(drainer, LOCKED)
                lock.execute("ROLLBACK")
            finally:
                lock.close()
            wait_for_claims_failing(drainer, READ_ONLY)
            fill_outbox(database, during.bodies)  # as a receiver running meanwhile would
            assert len(fake.accepted()) == len(before.bodies)

            chmod_all(directory, 0o644)
            wait_for_delivery(drainer, fake, len(before.bodies) + len(during.bodies))
            stop(drainer)
        finally:
            drainer.stop()
    assert_accepted_exactly(fake, combined(before, during))


def test_drain_whose_disk_was_full_delivers_once_there_is_room(
    fake: FakeSegment, tmp_path: Path
) -> None:
    """A full disk, made real for the drainer's process alone as in `test_serve_recovery.py`
    (which runs as this process's user, who may change its limits): its file size limit
    (RLIMIT_FSIZE) lowered to one byte, so that no write of its own can extend a file (SQLite
    reports "disk I/O error"), then raised again."""
    before = build_backlog(12, first_call=7_500_000_000, seed=4)
    during = build_backlog(24, first_call=7_600_000_000, seed=5)
    with outbox_in(tmp_path, {}, before.bodies) as database:
        drainer = RelayProcess("drain", env=drainer_env(database, fake))
        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        try:
            wait_for_delivery(drainer, fake, len(before.bodies))
            resource.prlimit(drainer.pid, resource.RLIMIT_FSIZE, (1, hard))
            fill_outbox(database, during.bodies)  # this process has room
            wait_for_claims_failing(drainer, "disk I/O error")
            assert len(fake.accepted()) == len(before.bodies)

            resource.prlimit(drainer.pid, resource.RLIMIT_FSIZE, (hard, hard))  # room again
            wait_for_delivery(drainer, fake, len(before.bodies) + len(during.bodies))
            stop(drainer)
        finally:
            drainer.stop()
    assert_accepted_exactly(fake, combined(before, during))


def post(base: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(base + WEBHOOK, content=json.dumps(body), headers=JSON, timeout=30)


def post_as_aircall(base: str, body: dict[str, Any]) -> httpx.Response:
    """Post `body` again while the answer is 503, as Aircall retries, within the recovery
    timeout; return the last answer."""
    responses: list[httpx.Response] = []

    def answered() -> bool:
        responses.append(post(base, body))
        return responses[-1].status_code != 503

    wait_until(answered, "a webhook answered other than 503", timeout=RECOVERY_TIMEOUT)
    return responses[-1]


def readiness(base: str) -> tuple[int, dict[str, Any]]:
    response = httpx.get(base + "/readyz", timeout=30)
    body: dict[str, Any] = response.json()
    return response.status_code, body


def test_run_started_while_its_files_are_read_only_receives_and_delivers_once_they_are_writable(
    fake: FakeSegment,
) -> None:
    """Receiver and drainer in one process share the mapping of `-shm`: neither may keep a
    connection from the read-only period. The outbox gauges on `/metrics` read meanwhile."""
    first, second = sample("call.created"), sample("call.created")
    first["data"]["id"], second["data"]["id"] = 7_400_000_001, 7_400_000_002
    message_ids = {aircall.validate_envelope(body).message_id for body in (first, second)}
    with (
        service_user() as (directory, options),
        outbox_in(directory, options, []) as database,
    ):
        chmod_all(directory, 0o444)
        env = drainer_env(database, fake, aircall_tokens=TOKENS)
        relay = RelayProcess("run", "--port", "0", env=env, **options)
        try:
            base, metrics = relay.url(), relay.metrics_url()
            assert post(base, first).status_code == 503
            status, body = readiness(base)
            assert status == 503 and "readonly" in body["writes"], body
            wait_for_claims_failing(relay, READ_ONLY)
            assert value(scrape(metrics), "relay_outbox_up") == 1  # reads work meanwhile

            chmod_all(directory, 0o644)
            assert value(scrape(metrics), "relay_outbox_up") == 1  # a read before any write
            assert post_as_aircall(base, first).json()["status"] == "stored"
            assert post(base, second).json()["status"] == "stored"
            wait_for_delivery(relay, fake, 2)
            status, body = readiness(base)
            assert (status, body["status"], body["writes"]) == (200, "ready", "ok"), body
            gauges = scrape(metrics)
            assert value(gauges, "relay_outbox_up") == 1
            assert value(gauges, "relay_outbox_rows", status="pending") == 0
            stop(relay)
        finally:
            relay.stop()
        assert statuses(database) == {"delivered": 2}
    assert sorted(message["messageId"] for message in fake.accepted()) == sorted(message_ids)
