"""The relay at scale on one PostgreSQL database, with real processes: two receivers
(`aircall-relay serve`) and several drainers (`aircall-relay drain`) share the outbox, Aircall's
traffic is posted over HTTP to both receivers, and the fake Segment (in a thread of this process)
injects faults.

- Drainers killed with SIGKILL at random moments and restarted, under faults from Segment:
  every event is accepted once by `messageId` (re-sends carry the same one), none is missing, and
  each call's events are first accepted in the relay's delivery order (Aircall timestamp, then
  life-cycle rank, then receipt id).
- The PostgreSQL server restarted while traffic flows: the receivers answer 503 with
  `Retry-After` while it is down (and nothing else but 200), the poster retries like Aircall, the
  drainers reconnect by themselves, and every webhook answered 200 is delivered once.

The second test stops and starts a PostgreSQL server of its own: a throw-away cluster it creates
in a temporary folder (`initdb`, `pg_ctl`) and removes at the end, whatever the outcome
(`tests/acceptance/postgres_cluster.py`). The machine's server is never touched.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import http.client
import json
import random
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from relay import aircall
from relay.db.migrate import upgrade_to_head
from relay.testing import ChaosEntry, FakeSegment, Fault, SourceConfig
from tests.acceptance.postgres_cluster import ThrowawayCluster
from tests.acceptance.processes import RelayProcess, held_by, relay_env, statuses, wait_until
from tests.support import (
    POSTGRES_ADMIN_URL,
    SAMPLE_TOKEN,
    SECOND_TOKEN,
    OutboxDatabase,
    aircall_call,
    assert_accepted_once,
    assert_first_accepted_in_order,
    assert_resends_are_copies,
    fetch_all_async,
    postgres_unavailable_reason,
    sample,
)

WRITE_KEY = "wk_postgres_scale_P4s9Lm2Vx7"
TOKENS = f"main:{SAMPLE_TOKEN},second:{SECOND_TOKEN}"
WEBHOOK = "/aircall/webhook"
JSON = {"content-type": "application/json"}

EVENTS_PER_CALL = 40
DUPLICATES_PER_CALL = 1
# A call's webhooks are posted by one poster, shuffled, one after the other: they all reach the
# outbox well within the settle window, so the drainers must sort them.
SETTLE_SECONDS = 1.0
LEASE_SECONDS = 2.0
GRACE_SECONDS = 4.0
POSTERS = 8

# Segment misbehaving the whole time: slow answers (some after it accepted the batch, so that a
# kill or a timeout makes a re-send), 5xx before and after acceptance, 429 with Retry-After, and
# connections reset or closed before and after acceptance.
SEGMENT_CHAOS = [
    ChaosEntry(Fault.latency(150, jitter_ms=600), 0.10),
    ChaosEntry(Fault.latency(150, jitter_ms=600, accept="after_accept"), 0.06),
    ChaosEntry(Fault.status(500), 0.03),
    ChaosEntry(Fault.status(502, accept="after_accept"), 0.03),
    ChaosEntry(Fault.status(503, headers={"Retry-After": "1"}), 0.02),
    ChaosEntry(Fault.rate_limited(1), 0.02),
    ChaosEntry(Fault.reset("after_body_read"), 0.02),
    ChaosEntry(Fault.reset("mid_response", accept="after_accept"), 0.03),
    ChaosEntry(Fault.close("after_body_read", accept="after_accept"), 0.02),
]


@pytest.fixture
def fake() -> Iterator[FakeSegment]:
    with FakeSegment(write_keys={WRITE_KEY: SourceConfig()}, keep_request_bodies=False) as server:
        yield server


def receiver_env(database: OutboxDatabase, **overrides: str) -> dict[str, str]:
    return relay_env(database.url, aircall_tokens=TOKENS, **overrides)


def drainer_env(database: OutboxDatabase, fake: FakeSegment, **overrides: str) -> dict[str, str]:
    settings = {
        "segment_write_key": WRITE_KEY,
        "segment_base_url": fake.base_url,
        "settle_seconds": str(SETTLE_SECONDS),
        "lease_seconds": str(LEASE_SECONDS),
        "poll_seconds": "0.1",
        "retry_base_seconds": "0.05",
        "retry_cap_seconds": "0.5",
        "segment_max_retry_after_seconds": "1",
        "segment_timeout_seconds": "5",
        "segment_events_per_second": "0",
        "segment_requests_per_second": "0",
        "segment_batch_size": "100",
        "shutdown_grace_seconds": str(GRACE_SECONDS),
    }
    settings.update(overrides)
    return relay_env(database.url, **settings)


# --- Aircall's traffic --------------------------------------------------------------------------


FOLLOW_UPS = ("call.tagged", "call.commented", "call.assigned", "call.untagged")


@dataclass(frozen=True)
class Webhook:
    call_id: int
    event: str
    timestamp: int
    message_id: str
    body: bytes  # as Aircall posts it, token included


def call_webhooks(call_id: int, shift_seconds: int) -> list[dict[str, Any]]:
    """EVENTS_PER_CALL webhooks of one call (token removed): its life cycle (with the ties of
    `aircall_call`), then agents tagging, commenting, assigning and untagging it afterwards, two
    of those in each second, so that their order is their receipt order."""
    events = aircall_call(call_id, shift_seconds)
    after = events[-1]["timestamp"] + 30
    for n in range(EVENTS_PER_CALL - len(events)):
        name = FOLLOW_UPS[n % len(FOLLOW_UPS)]
        body = sample(name)
        del body["token"]
        data = body["data"]
        data["id"] = call_id
        body["timestamp"] = after + (n // 2) * 45
        # Each one carries the call's snapshot as of then: a new tag or a new comment.
        if name in ("call.tagged", "call.assigned"):
            tag = {"id": 990_000 + n, "name": f"Follow-up {n}", "tagged_at": body["timestamp"]}
            data["tags"].append(tag)
        else:
            data["comments"].append(
                {"id": 77_000_000 + n, "content": f"Note {n}", "posted_at": body["timestamp"]}
            )
        events.append(body)
    return events


def build_calls(count: int, first_call: int, seed: int) -> list[list[Webhook]]:
    """`count` calls overlapping in time, each call's webhooks in a random order; of each call,
    DUPLICATES_PER_CALL webhooks are sent twice (Aircall delivers at least once), the second
    time under the other token (two Aircall webhooks subscribed to the same events)."""
    rng = random.Random(seed)
    tokens = (SAMPLE_TOKEN, SECOND_TOKEN)
    calls = []
    for n in range(count):
        call_id = first_call + n
        webhooks = []
        for body in call_webhooks(call_id, shift_seconds=n * 37):
            message_id = aircall.validate_envelope(body).message_id
            posted = json.dumps({**body, "token": tokens[n % 2]}).encode()
            webhooks.append(Webhook(call_id, body["event"], body["timestamp"], message_id, posted))
        rng.shuffle(webhooks)
        # The copy right after the original: the next poster sends it to the other receiver at
        # the same moment, so that the two receivers race to store the event.
        for original in rng.sample(webhooks, DUPLICATES_PER_CALL):
            again = original.body.replace(tokens[n % 2].encode(), tokens[(n + 1) % 2].encode())
            webhooks.insert(webhooks.index(original) + 1, dataclasses.replace(original, body=again))
        calls.append(webhooks)
    ids = {webhook.message_id for call in calls for webhook in call}
    assert len(ids) == count * EVENTS_PER_CALL, "the traffic must be distinct events"
    return calls


def message_ids(calls: Sequence[Sequence[Webhook]]) -> set[str]:
    return {webhook.message_id for call in calls for webhook in call}


def delivery_order(
    database: OutboxDatabase, calls: Sequence[Sequence[Webhook]]
) -> dict[int, list[str]]:
    """Each call's messageIds in the relay's delivery order: Aircall timestamp, life-cycle rank,
    receipt id (the outbox's, known only once the receivers have stored them)."""
    receipt = {
        row["message_id"]: int(row["id"])
        for row in database.rows("SELECT id, message_id FROM outbox")
    }
    expected = {}
    for call in calls:
        ordered = sorted(
            {webhook.message_id: webhook for webhook in call}.values(),
            key=lambda w: (w.timestamp, aircall.lifecycle_rank(w.event), receipt[w.message_id]),
        )
        expected[call[0].call_id] = [webhook.message_id for webhook in ordered]
    return expected


# --- posting like Aircall -----------------------------------------------------------------------


@dataclass
class PostLog:
    """What the receivers answered, over all posters."""

    answers: Counter[int] = field(default_factory=Counter)  # every HTTP status seen
    outcomes: Counter[str] = field(default_factory=Counter)  # final 200s: stored, duplicate
    per_receiver: Counter[str] = field(default_factory=Counter)
    transport_errors: Counter[str] = field(default_factory=Counter)
    without_retry_after: int = 0  # 503s without a Retry-After header
    given_up: list[str] = field(default_factory=list)  # messageIds never answered 200
    spans: dict[int, float] = field(default_factory=dict)  # call id: first sent to last answer
    acknowledged: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class Client:
    """A keep-alive HTTP/1.1 connection to one receiver (`http.client`: a fraction of the CPU of
    a full-featured client, which matters with 20,000 webhooks on two cores)."""

    def __init__(self, url: str) -> None:
        self.url = url
        parsed = httpx.URL(url)
        self._address = (parsed.host, parsed.port)
        self._connection: http.client.HTTPConnection | None = None

    def post(self, body: bytes) -> tuple[int, str, bytes]:
        """POST a webhook: the status, the Retry-After header ("" when absent), the body."""
        if self._connection is None:
            self._connection = http.client.HTTPConnection(*self._address, timeout=10)
        try:
            self._connection.request("POST", WEBHOOK, body, JSON)
            response = self._connection.getresponse()
            answer = response.read()
        except BaseException:
            self.close()  # a fresh connection for the next attempt
            raise
        return response.status, response.getheader("Retry-After") or "", answer

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class AircallPoster:
    """Posts calls' webhooks as Aircall does: the webhooks of a call nearly at once, in a random
    order, over several connections (a pool of threads, each with a keep-alive client per
    receiver), alternating between the receivers, with `calls_at_once` calls overlapping.

    Like Aircall it retries a webhook until it gets a 200: after a 503, once the `Retry-After` it
    names is over (up to `retry_cap_seconds`, to keep the test short); after a connection error,
    shortly. Every loop is bounded."""

    def __init__(self, urls: Sequence[str], retry_cap_seconds: float, max_attempts: int = 40):
        self.urls = list(urls)
        self.retry_cap_seconds = retry_cap_seconds
        self.max_attempts = max_attempts
        self.log = PostLog()
        self._local = threading.local()
        self._clients: list[Client] = []

    def post_all(self, calls: Sequence[Sequence[Webhook]], calls_at_once: int = 2) -> PostLog:
        in_flight: deque[tuple[int, list[concurrent.futures.Future[tuple[float, float]]]]]
        in_flight = deque()
        try:
            with concurrent.futures.ThreadPoolExecutor(POSTERS, "aircall") as pool:
                for call in calls:
                    if len(in_flight) == calls_at_once:
                        self._finish(*in_flight.popleft())
                    posts = [pool.submit(self._post, n, webhook) for n, webhook in enumerate(call)]
                    in_flight.append((call[0].call_id, posts))
                while in_flight:
                    self._finish(*in_flight.popleft())
        finally:
            for client in self._clients:
                client.close()
        return self.log

    def _finish(
        self, call_id: int, posts: list[concurrent.futures.Future[tuple[float, float]]]
    ) -> None:
        """Wait for a call's webhooks; note the time from the first sent to the last answered."""
        times = [post.result() for post in posts]
        span = max(end for _, end in times) - min(start for start, _ in times)
        self.log.spans[call_id] = span

    def _client(self, n: int) -> Client:
        clients: list[Client] | None = getattr(self._local, "clients", None)
        if clients is None:
            clients = [Client(url) for url in self.urls]
            self._local.clients = clients
            with self.log.lock:
                self._clients.extend(clients)
        return clients[n % len(clients)]

    def _post(self, n: int, webhook: Webhook) -> tuple[float, float]:
        """Post `webhook` to receiver `n` (modulo their number) until it is answered 200."""
        client, log = self._client(n), self.log
        started = time.monotonic()
        for _ in range(self.max_attempts):
            try:
                status, retry_after, answer = client.post(webhook.body)
            except (OSError, http.client.HTTPException) as error:
                with log.lock:
                    log.transport_errors[type(error).__name__] += 1
                time.sleep(0.2)
                continue
            with log.lock:
                log.answers[status] += 1
                log.per_receiver[client.url] += 1
            if status == 200:
                with log.lock:
                    log.outcomes[json.loads(answer)["status"]] += 1
                    log.acknowledged += 1
                return started, time.monotonic()
            if status != 503:
                break  # anything else is a failure of the test; no point in retrying
            if not retry_after.isdigit():
                with log.lock:
                    log.without_retry_after += 1
            time.sleep(min(float(retry_after or 1), self.retry_cap_seconds))
        with log.lock:
            log.given_up.append(webhook.message_id)
        return started, time.monotonic()


# --- the processes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kill:
    pid: int
    at_seconds: float  # since the traffic began
    exit_code: int
    held: int  # rows it held under lease when it died


class DrainerPool:
    """`count` drainer processes; any one of them can be SIGKILLed and replaced by a new one."""

    def __init__(self, count: int, env: dict[str, str]) -> None:
        self.env = env
        self.running = [RelayProcess("drain", env=env) for _ in range(count)]
        self.everyone = list(self.running)
        for drainer in self.running:
            drainer.wait_for_log("drainer_started")

    def kill_and_restart(
        self,
        rng: random.Random,
        database: OutboxDatabase,
        began: float,
        aim_seconds: float = 0.0,
    ) -> Kill:
        """SIGKILL a drainer chosen at random and start another in its place. With `aim_seconds`,
        wait up to that long for a moment when some drainer holds rows under lease and strike one
        of those, so that the kill hits a drainer at work whatever the machine's speed (on a fast
        machine the drainers keep up with the traffic and are idle most of the time)."""
        index = rng.randrange(len(self.running))
        deadline = time.monotonic() + aim_seconds
        while time.monotonic() < deadline:
            busy = [n for n, d in enumerate(self.running) if held_by(database, d.pid)]
            if busy:
                index = rng.choice(busy)
                break
            time.sleep(0.01)
        victim = self.running[index]
        at = time.monotonic() - began
        code = victim.kill()
        kill = Kill(victim.pid, round(at, 2), code, held_by(database, victim.pid))
        replacement = RelayProcess("drain", env=self.env)
        self.everyone.append(replacement)
        self.running[index] = replacement
        replacement.wait_for_log("drainer_started")
        return kill

    def all_delivered(self, database: OutboxDatabase, total: int) -> bool:
        """Whether the outbox holds `total` rows, all delivered; fails at once if a drainer
        exited."""
        self.assert_alive()
        return statuses(database) == {"delivered": total}

    def assert_alive(self) -> None:
        for drainer in self.running:
            code = drainer.process.poll()
            assert code is None, f"a drainer exited ({code}):\n{drainer.tail()}"

    def stop(self) -> None:
        """SIGTERM to every drainer; each must exit 0 within its grace period."""
        for drainer in self.running:
            drainer.signal(signal.SIGTERM)
        for drainer in self.running:
            code = drainer.wait(GRACE_SECONDS + 15)
            assert code == 0, f"drainer exit {code} after SIGTERM:\n{drainer.tail()}"

    def close(self) -> None:
        for drainer in self.everyone:
            drainer.stop()


def start_receivers(count: int, env: dict[str, str]) -> list[RelayProcess]:
    receivers = [RelayProcess("serve", "--port", "0", env=env) for _ in range(count)]
    for receiver in receivers:
        receiver.port()
    return receivers


def stop_receivers(receivers: Sequence[RelayProcess]) -> None:
    for receiver in receivers:
        if receiver.process.poll() is None:
            receiver.signal(signal.SIGTERM)
    for receiver in receivers:
        code = receiver.wait(GRACE_SECONDS + 15)
        assert code == 0, f"receiver exit {code} after SIGTERM:\n{receiver.tail()}"


class RandomKiller:
    """A thread that SIGKILLs a random drainer at random moments and starts another."""

    def __init__(
        self,
        pool: DrainerPool,
        database: OutboxDatabase,
        rng: random.Random,
        interval: tuple[float, float],
    ) -> None:
        self.pool = pool
        self.database = database
        self.rng = rng
        self.interval = interval
        self.kills: list[Kill] = []
        self.error: BaseException | None = None
        self.began = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="killer", daemon=True)

    def start(self) -> RandomKiller:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.rng.uniform(*self.interval)):
                self.kills.append(
                    self.pool.kill_and_restart(self.rng, self.database, self.began, AIM_SECONDS)
                )
        except BaseException as error:
            self.error = error

    def stop(self) -> None:
        """Stop killing (the kill under way, if any, finishes with its drainer restarted)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(60)
        assert not self._thread.is_alive(), "the killer thread did not stop"

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def enough(self) -> bool:
        """At least MIN_KILLS kills, at least half of them of drainers holding rows."""
        kills = list(self.kills)
        return len(kills) >= MIN_KILLS and sum(1 for k in kills if k.held) >= MIN_KILLS // 2

    def report(self) -> str:
        return "\n".join(str(kill) for kill in self.kills)


def deliveries_by_drainer(
    database: OutboxDatabase, since: datetime = datetime(2000, 1, 1, tzinfo=UTC)
) -> dict[str, int]:
    """Events delivered by each drainer (lease owner `host:pid:random`) in requests sent after
    `since`."""
    rows = database.rows(
        "SELECT drainer, sum(event_count) AS n FROM delivery_requests "
        "WHERE outcome = 'delivered' AND started_at > :since GROUP BY drainer",
        since=since,
    )
    return {row["drainer"]: int(row["n"]) for row in rows}


# --- two receivers, three drainers killed at random --------------------------------------------


CALLS = 500
DRAINERS = 3
MIN_KILLS = 10
KILL_INTERVAL = (1.0, 4.0)
# How long the killer waits for its victim to hold rows before it strikes anyway.
AIM_SECONDS = 3.0


@pytest.mark.postgres
@pytest.mark.slow
def test_two_receivers_three_drainers_sigkilled_at_random_deliver_everything_once_in_order(
    postgres_database: OutboxDatabase, fake: FakeSegment
) -> None:
    database = postgres_database
    calls = build_calls(CALLS, first_call=7_100_000_000, seed=515)
    total = CALLS * EVENTS_PER_CALL
    fake.set_chaos(SEGMENT_CHAOS, seed=11)

    receivers = start_receivers(2, receiver_env(database))
    pool = DrainerPool(DRAINERS, drainer_env(database, fake))
    killer = RandomKiller(pool, database, random.Random(99), KILL_INTERVAL)
    try:
        poster = AircallPoster([receiver.url() for receiver in receivers], retry_cap_seconds=1)
        killer.start()
        log = poster.post_all(calls)
        posted_after = time.monotonic() - killer.began
        wait_until(
            lambda: killer.enough() or killer.error is not None,
            f"{MIN_KILLS} kills, {MIN_KILLS // 2} of drainers holding rows",
            timeout=60,
            detail=killer.report,
        )
        killer.stop()
        killer.check()
        wait_until(
            lambda: pool.all_delivered(database, total),
            f"all {total} rows delivered",
            timeout=120,
            detail=lambda: f"outbox: {statuses(database)}; fake: {fake.stats()}",
        )
        delivered_after = time.monotonic() - killer.began
        pool.assert_alive()
        pool.stop()
        stop_receivers(receivers)
    finally:
        killer.stop()
        pool.close()
        for receiver in receivers:
            receiver.stop()

    report = (
        f"posted in {posted_after:.1f} s, delivered in {delivered_after:.1f} s; "
        f"answers {dict(log.answers)}, outcomes {dict(log.outcomes)}, "
        f"transport errors {dict(log.transport_errors)}, longest call "
        f"{max(log.spans.values()):.2f} s; fake {fake.stats()}\nkills:\n{killer.report()}"
    )
    print(report)
    # Aircall's side: every webhook answered 200 once stored, by both receivers, and its copy
    # as a duplicate (whichever receiver each went to): one row per event.
    assert not log.given_up, f"{len(log.given_up)} webhooks never answered 200\n{report}"
    assert set(log.answers) == {200}, report
    assert not log.transport_errors, report
    copies = CALLS * DUPLICATES_PER_CALL
    assert log.outcomes == {"stored": total, "duplicate": copies}, report
    assert min(log.per_receiver.values()) >= total // 3, log.per_receiver
    assert database.count() == total
    # The kills struck drainers at work.
    assert len(killer.kills) >= MIN_KILLS, report
    assert all(kill.exit_code == -signal.SIGKILL for kill in killer.kills), report
    assert sum(1 for kill in killer.kills if kill.held) >= MIN_KILLS // 2, report
    assert len(deliveries_by_drainer(database)) >= DRAINERS, report
    # Segment's side: each event accepted once; re-sends only of accepted messageIds, as copies.
    order = delivery_order(database, calls)
    assert_accepted_once(fake, message_ids(calls))
    resent = assert_resends_are_copies(fake)
    assert resent, "no re-send at all: the kills and after-accept faults should cause some"
    print(f"{resent} re-sends, by messageId")
    # Each call's events first accepted in the delivery order. The relay sorts a call's webhooks
    # when they reach the outbox within the settle window of each other; one whose webhooks took
    # longer to post (a machine very busy with other work) may rightly have one delivered late,
    # so its order is not checked. Nearly every call must be checked.
    tight = {call_id for call_id, span in log.spans.items() if span < SETTLE_SECONDS}
    assert len(tight) >= 0.9 * CALLS, f"{CALLS - len(tight)} calls posted too slowly\n{report}"
    assert_first_accepted_in_order(fake, {call: order[call] for call in tight})
    print(f"order checked in {len(tight)} of {CALLS} calls")
    late = database.rows("SELECT DISTINCT resource_id FROM outbox WHERE late")
    late_calls = {int(row["resource_id"]) for row in late}
    assert not late_calls & tight, f"calls with events delivered late: {late_calls & tight}"


# --- PostgreSQL restarted under traffic ---------------------------------------------------------


@pytest.fixture
def own_postgres() -> Iterator[ThrowawayCluster]:
    """A PostgreSQL server of this test's own, started, and removed after it."""
    cluster = ThrowawayCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


def machine_server_started() -> datetime | None:
    """When the machine's PostgreSQL (the other tests' server) last started; None without one."""
    if postgres_unavailable_reason() is not None:
        return None
    sql = "SELECT pg_postmaster_start_time() AS started"
    [row] = asyncio.run(fetch_all_async(POSTGRES_ADMIN_URL, sql))
    started: datetime = row["started"]
    return started


def migrated_database(cluster: ThrowawayCluster) -> OutboxDatabase:
    """The cluster's own `postgres` database, migrated: the whole cluster is the test's."""
    upgrade_to_head(cluster.url)
    return OutboxDatabase("postgresql", cluster.url)


RESTART_CALLS = 100
RESTART_AFTER = 0.3  # of the webhooks acknowledged
DOWN_SECONDS = 2.5


@pytest.mark.postgres
@pytest.mark.slow
def test_postgres_restart_under_traffic_gives_503s_then_everything_is_delivered_once(
    own_postgres: ThrowawayCluster, fake: FakeSegment
) -> None:
    cluster = own_postgres
    database = migrated_database(cluster)
    machine_server = machine_server_started()
    calls = build_calls(RESTART_CALLS, first_call=7_200_000_000, seed=516)
    total = RESTART_CALLS * EVENTS_PER_CALL

    # Some requests to Segment are slow, so that the server goes away while some are in flight
    # and their answers cannot be recorded.
    fake.set_chaos([ChaosEntry(Fault.latency(300, jitter_ms=700), 0.3)], seed=12)
    receivers = start_receivers(2, receiver_env(database, database_timeout_seconds="1"))
    pool = DrainerPool(2, drainer_env(database, fake))
    back_at: datetime | None = None
    try:
        poster = AircallPoster([receiver.url() for receiver in receivers], retry_cap_seconds=5)
        with concurrent.futures.ThreadPoolExecutor(1) as background:
            posting = background.submit(poster.post_all, calls)
            try:
                wait_until(
                    lambda: poster.log.acknowledged >= total * RESTART_AFTER or posting.done(),
                    "part of the traffic acknowledged",
                    timeout=60,
                )
                assert not posting.done(), "the traffic was all posted before the restart"
                cluster.stop()
                try:
                    time.sleep(DOWN_SECONDS)
                finally:
                    cluster.start()
                back_at = datetime.now(UTC)
            finally:
                log = posting.result(timeout=300)
        wait_until(
            lambda: pool.all_delivered(database, total),
            f"all {total} rows delivered",
            timeout=120,
            detail=lambda: f"outbox: {statuses(database)}; fake: {fake.stats()}",
        )
        # The drainers lived through it: the same processes reconnected and went on.
        pool.assert_alive()
        pool.stop()
        stop_receivers(receivers)
    finally:
        pool.close()
        for receiver in receivers:
            receiver.stop()

    report = (
        f"answers {dict(log.answers)}, outcomes {dict(log.outcomes)}, "
        f"transport errors {dict(log.transport_errors)}; fake {fake.stats()}; "
        f"deliveries by drainer {deliveries_by_drainer(database)}"
    )
    print(report)
    assert back_at is not None
    assert log.answers[503] > 0, f"no 503 while PostgreSQL was down: {report}"
    assert log.without_retry_after == 0, report
    assert set(log.answers) <= {200, 503}, f"answers other than 200 and 503: {report}"
    assert not log.given_up, f"{len(log.given_up)} webhooks never answered 200\n{report}"
    assert not log.transport_errors, report
    # Every post answered 200 in the end, as stored or duplicate (a write committed just as the
    # server went away is answered 503, and its retry is a duplicate).
    assert log.acknowledged == total + RESTART_CALLS * DUPLICATES_PER_CALL, report
    assert log.outcomes["stored"] <= total, report
    # Nothing lost: every webhook answered 200 is stored once and delivered once by messageId.
    assert database.count() == total
    assert statuses(database) == {"delivered": total}
    assert_accepted_once(fake, message_ids(calls))
    resent = assert_resends_are_copies(fake)
    print(f"{resent} re-sends, by messageId")
    # Both drainers (the same processes as before the restart) delivered after it.
    after = deliveries_by_drainer(database, since=back_at)
    assert {int(owner.split(":")[1]) for owner in after} == {d.pid for d in pool.running}, report
    # Only the test's own server went down: the machine's ran all along.
    assert machine_server_started() == machine_server
