"""The fake Segment on the wire (relay/testing/fake_segment_server.py): every fault kind before
and after acceptance, the scripted queue and seeded chaos, keep-alive, stopping, the `/__fake/...`
control API, and `aircall-relay fake-segment` as a real process, the only command besides `demo`
that loads relay.testing.
"""

from __future__ import annotations

import json
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay.cli import build_parser
from relay.db.migrate import upgrade_to_head
from relay.testing import ChaosEntry, FakeSegment, Fault
from relay.testing.fake_segment_faults import AcceptMode, DisconnectPhase
from relay.testing.fake_segment_server import chaos_table

WRITE_KEY = "write-key-0123456789abcdef012345"


def batch_body(*message_ids: str, key: str = WRITE_KEY) -> dict[str, Any]:
    messages = [
        {"type": "track", "event": "call.created", "userId": "u", "messageId": message_id}
        for message_id in message_ids
    ]
    return {"batch": messages, "writeKey": key}


@pytest.fixture
def fake() -> Iterator[FakeSegment]:
    with FakeSegment() as server:
        yield server


@pytest.fixture
def client(fake: FakeSegment) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.base_url, timeout=5) as http:
        yield http


def raw_exchange(fake: FakeSegment) -> tuple[str, bytes]:
    """Send one request on a fresh socket and say how the server ended it: FIN, RST or TIMEOUT,
    with the bytes received before that."""
    body = json.dumps(batch_body("m-1")).encode()
    request = (
        b"POST /v1/batch HTTP/1.1\r\nHost: fake\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body
    received: list[bytes] = []
    try:
        with socket.create_connection(("127.0.0.1", fake.port), timeout=2) as connection:
            connection.sendall(request)
            while data := connection.recv(65536):
                received.append(data)
            return "FIN", b"".join(received)
    except ConnectionResetError:
        return "RST", b"".join(received)
    except TimeoutError:
        return "TIMEOUT", b"".join(received)


# status and bad_success: an answer, and the connection stays usable


def test_status_fault_before_accept_records_nothing_and_keeps_the_connection(
    fake: FakeSegment, client: httpx.Client
) -> None:
    fake.inject(Fault.status(500))
    first = client.post("/v1/batch", json=batch_body("a"))
    assert (first.status_code, first.text) == (500, "Internal Server Error")
    assert client.post("/v1/batch", json=batch_body("a")).status_code == 200
    assert [message["request_seq"] for message in fake.accepted()] == [2]
    assert (fake.requests()[0]["status"], fake.requests()[0]["fault"]["kind"]) == (500, "status")
    assert fake.connections_opened() == 1


def test_status_fault_after_accept_records_then_fails(
    fake: FakeSegment, client: httpx.Client
) -> None:
    fake.inject(Fault.status(503, headers={"Retry-After": "2"}, accept="after_accept"))
    response = client.post("/v1/batch", json=batch_body("a", "b"))
    assert (response.status_code, response.headers["retry-after"]) == (503, "2")
    assert client.post("/v1/batch", json=batch_body("a", "b")).status_code == 200
    assert len(fake.accepted()) == 2
    assert [fake.duplicate_count(message_id) for message_id in ("a", "b")] == [1, 1]


def test_rate_limited_fault_carries_both_retry_headers(
    fake: FakeSegment, client: httpx.Client
) -> None:
    fake.inject(Fault.rate_limited(2))
    response = client.post("/v1/batch", json=batch_body("a"))
    assert (response.status_code, response.text) == (429, "Too Many Requests")
    assert response.headers["retry-after"] == response.headers["x-ratelimit-reset"] == "2"


def test_status_fault_with_its_own_body_and_connection_close(
    fake: FakeSegment, client: httpx.Client
) -> None:
    fake.inject(Fault.status(413, body="<h1>too big</h1>", headers={"Content-Type": "text/html"}))
    fake.inject(Fault.status(503, headers={"Connection": "close"}))
    response = client.post("/v1/batch", json=batch_body("a"))
    assert (response.status_code, response.text) == (413, "<h1>too big</h1>")
    assert response.headers["content-type"] == "text/html"
    assert client.post("/v1/batch", json=batch_body("a")).status_code == 503
    assert client.post("/v1/batch", json=batch_body("a")).status_code == 200
    assert fake.connections_opened() == 2


@pytest.mark.parametrize(("body", "code"), [("", 200), ("{", 200), ("", 202), ("", 204)])
@pytest.mark.parametrize("accept", ["before_accept", "after_accept"])
def test_bad_success(
    fake: FakeSegment, client: httpx.Client, body: str, code: int, accept: AcceptMode
) -> None:
    fake.inject(Fault.bad_success(body, code=code, accept=accept))
    response = client.post("/v1/batch", json=batch_body("a"))
    assert (response.status_code, response.text) == (code, body)
    assert len(fake.accepted()) == (1 if accept == "after_accept" else 0)
    assert client.post("/v1/batch", json=batch_body("b")).status_code == 200
    assert fake.connections_opened() == 1


# latency and hang


def test_latency_delays_then_answers_normally(fake: FakeSegment, client: httpx.Client) -> None:
    fake.inject(Fault.latency(150))
    started = time.monotonic()
    assert client.post("/v1/batch", json=batch_body("a")).status_code == 200
    assert time.monotonic() - started >= 0.14
    assert len(fake.accepted()) == 1


def test_latency_before_accept_past_the_client_timeout_records_nothing(
    fake: FakeSegment,
) -> None:
    fake.inject(Fault.latency(2000))
    with (
        httpx.Client(base_url=fake.base_url, timeout=0.1) as http,
        pytest.raises(httpx.ReadTimeout),
    ):
        http.post("/v1/batch", json=batch_body("a"))
    fake.wait_for(lambda state: len(state.requests()) == 1, timeout=2)
    (entry,) = fake.requests()
    assert (entry["status"], entry["flags"]) == (None, ["client_disconnected"])
    assert fake.accepted() == []


def test_latency_after_accept_records_although_the_client_gave_up(fake: FakeSegment) -> None:
    fake.inject(Fault.latency(500, accept="after_accept"))
    with httpx.Client(base_url=fake.base_url, timeout=0.1) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/batch", json=batch_body("a"))
        assert http.post("/v1/batch", json=batch_body("a")).status_code == 200
    assert len(fake.accepted()) == 1
    assert fake.duplicate_count("a") == 1


def test_latency_jitter_is_drawn_from_the_seed() -> None:
    fault = Fault.latency(10, jitter_ms=100)
    delays = [[FakeSegment(seed=5).delay_seconds(fault) for _ in range(5)] for _ in range(2)]
    assert delays[0] == delays[1]
    assert all(0.01 <= delay <= 0.11 for delay in delays[0])


@pytest.mark.parametrize(("accept", "accepted"), [("before_accept", 0), ("after_accept", 1)])
def test_hang_sends_nothing(fake: FakeSegment, accept: AcceptMode, accepted: int) -> None:
    fake.inject(Fault.hang(accept=accept))
    with (
        httpx.Client(base_url=fake.base_url, timeout=0.1) as http,
        pytest.raises(httpx.ReadTimeout),
    ):
        http.post("/v1/batch", json=batch_body("a"))
    assert len(fake.accepted()) == accepted
    assert fake.requests()[0]["status"] is None


def test_hang_with_a_duration_then_closes(fake: FakeSegment, client: httpx.Client) -> None:
    fake.inject(Fault.hang(100))
    started = time.monotonic()
    with pytest.raises(httpx.RemoteProtocolError):
        client.post("/v1/batch", json=batch_body("a"))
    assert time.monotonic() - started >= 0.09


# reset and close


@pytest.mark.parametrize("kind", ["reset", "close"])
@pytest.mark.parametrize(
    ("phase", "accept"),
    [
        ("after_headers_read", "before_accept"),
        ("after_body_read", "before_accept"),
        ("mid_response", "before_accept"),
        ("after_body_read", "after_accept"),
        ("mid_response", "after_accept"),
    ],
)
def test_disconnect_faults_on_the_wire(
    fake: FakeSegment, kind: str, phase: DisconnectPhase, accept: AcceptMode
) -> None:
    fault = (
        Fault.reset(phase, accept=accept) if kind == "reset" else Fault.close(phase, accept=accept)
    )
    fake.inject(fault)
    ending, received = raw_exchange(fake)
    assert ending == ("RST" if kind == "reset" else "FIN")
    partial = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    assert received == (partial if phase == "mid_response" else b"")
    assert len(fake.accepted()) == (1 if accept == "after_accept" else 0)
    (entry,) = fake.requests()
    assert (entry["status"], entry["fault"]["kind"], entry["fault"]["phase"]) == (None, kind, phase)


def test_after_accept_reset_makes_a_retry_a_duplicate(
    fake: FakeSegment, client: httpx.Client
) -> None:
    fake.inject(Fault.reset(accept="after_accept"))
    with pytest.raises(httpx.ReadError):
        client.post("/v1/batch", json=batch_body("a", "b"))
    assert client.post("/v1/batch", json=batch_body("a", "b")).status_code == 200
    assert [message["messageId"] for message in fake.accepted()] == ["a", "b"]
    assert [duplicate["messageId"] for duplicate in fake.duplicates()] == ["a", "b"]
    assert fake.connections_opened() == 2


# The scripted queue and chaos


def test_scripted_faults_apply_in_order_for_their_number_of_requests(
    fake: FakeSegment, client: httpx.Client
) -> None:
    fake.inject(Fault.status(500), times=2)
    fake.inject(Fault.status(502))
    fake.set_chaos([ChaosEntry(Fault.status(504), 1.0)])
    statuses = [client.post("/v1/batch", json=batch_body("a")).status_code for _ in range(4)]
    assert statuses == [500, 500, 502, 504]  # chaos only when no scripted fault is left
    fake.set_chaos([])
    fake.inject(Fault.status(503), times=None)
    statuses = [client.post("/v1/batch", json=batch_body("a")).status_code for _ in range(3)]
    fake.reset()
    assert [*statuses, client.post("/v1/batch", json=batch_body("a")).status_code] == [503] * 3 + [
        200
    ]
    with pytest.raises(ValueError, match="times"):
        fake.inject(Fault.status(500), times=0)


def _outcomes(seed: int, count: int = 40) -> list[int | str]:
    table = [
        ChaosEntry(Fault.status(500), 0.2),
        ChaosEntry(Fault.rate_limited(1), 0.1),
        ChaosEntry(Fault.reset(), 0.1),
    ]
    outcomes: list[int | str] = []
    with FakeSegment(chaos=table, seed=seed) as fake, httpx.Client(base_url=fake.base_url) as http:
        fake.reset()  # the table of the options stays
        for index in range(count):
            try:
                outcomes.append(http.post("/v1/batch", json=batch_body(f"m-{index}")).status_code)
            except httpx.ReadError:
                outcomes.append("reset")
        accepted = {message["messageId"] for message in fake.accepted()}
    assert accepted == {f"m-{i}" for i, outcome in enumerate(outcomes) if outcome == 200}
    return outcomes


def test_seeded_chaos_is_reproducible() -> None:
    first = _outcomes(seed=11)
    assert first == _outcomes(seed=11)
    assert first != _outcomes(seed=12)
    assert {500, 429, "reset", 200} <= set(first)


# Connections


def test_keep_alive_connections_are_counted(fake: FakeSegment) -> None:
    with httpx.Client(base_url=fake.base_url) as http:
        for index in range(5):
            assert http.post("/v1/batch", json=batch_body(f"m-{index}")).status_code == 200
    assert fake.connections_opened() == 1
    with httpx.Client(base_url=fake.base_url, headers={"Connection": "close"}) as http:
        http.post("/v1/batch", json=batch_body("y"))
        http.post("/v1/batch", json=batch_body("z"))
    assert fake.connections_opened() == 3


def test_lifecycle_and_stop_drops_hanging_connections() -> None:
    fake = FakeSegment(max_batch_events=10)
    with pytest.raises(RuntimeError, match="not started"):
        _ = fake.base_url
    fake.start()
    assert fake.base_url == f"http://127.0.0.1:{fake.port}"
    with pytest.raises(RuntimeError, match="already started"):
        fake.start()
    fake.inject(Fault.hang(), times=None)
    with socket.create_connection(("127.0.0.1", fake.port), timeout=5) as connection:
        body = json.dumps(batch_body("a")).encode()
        head = b"POST /v1/batch HTTP/1.1\r\nHost: fake\r\nContent-Length: %d\r\n\r\n" % len(body)
        connection.sendall(head + body)
        fake.wait_for(lambda state: len(state.requests()) == 1, timeout=2)
        fake.stop()  # does not wait for the hang, which has no end
        assert connection.recv(1024) == b""  # dropped
    fake.stop()  # a second stop is harmless
    with pytest.raises(httpx.ConnectError):
        httpx.post(f"{fake.base_url}/v1/batch", json=batch_body("b"))
    assert len(fake.requests()) == 1


# The /__fake control API


def test_control_api_serves_the_records(fake: FakeSegment, client: httpx.Client) -> None:
    body = batch_body("a", "a", "b", "c")
    body["batch"][2]["userId"] = None
    client.post("/v1/batch", json=body)
    for name in ("accepted", "discarded", "duplicates"):
        assert client.get(f"/__fake/{name}").json() == json.loads(json.dumps(getattr(fake, name)()))
    assert client.get("/__fake/stats").json() == fake.stats()
    [entry] = client.get("/__fake/requests").json()
    assert entry["decoded_body"] == body
    assert client.get("/__fake/requests", params={"bodies": "0"}).json()[0]["decoded_body"] is None
    page = client.get("/__fake/accepted", params={"offset": 1, "limit": 1}).json()
    assert [message["messageId"] for message in page] == ["c"]
    assert client.get("/__fake/accepted", params={"limit": "x"}).status_code == 400
    assert client.get("/__fake/nothing").status_code == 404
    assert client.post("/__fake/reset").json() == {"ok": True}
    assert fake.stats()["requests"] == 0


# The command line


def _read_line(process: subprocess.Popen[str], timeout: float) -> str:
    assert process.stdout is not None
    readable, _, _ = select.select([process.stdout], [], [], timeout)
    if not readable:
        raise TimeoutError("the fake Segment process printed nothing")
    return process.stdout.readline()


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_the_command_serves_and_exits_0_on_signal(stop_signal: signal.Signals) -> None:
    command = [sys.executable, "-m", "relay.cli", "fake-segment", "--write-key", "known-key"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = _read_line(process, timeout=15)
        assert line.startswith("fake-segment listening on http://127.0.0.1:")
        base_url = line.rsplit(" ", 1)[1].strip()
        with httpx.Client(base_url=base_url) as http:
            assert http.post("/v1/batch", json=batch_body("a", key="known-key")).status_code == 200
            assert http.post("/v1/batch", json=batch_body("b", key="other-key")).status_code == 200
            assert [item["messageId"] for item in http.get("/__fake/accepted").json()] == ["a"]
            [discard] = http.get("/__fake/discarded").json()
            assert discard["reason"] == "unknown_source"
        process.send_signal(stop_signal)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stdout is not None
        assert process.stderr is not None
        process.stdout.close()
        process.stderr.close()


def test_the_command_chaos_option() -> None:
    args = build_parser().parse_args(["fake-segment", "--chaos", "0.3", "--seed", "9"])
    assert (args.chaos, args.seed, args.write_keys, args.keep_request_bodies) == (0.3, 9, [], True)
    table = chaos_table(args.chaos)
    assert [entry.fault.kind for entry in table] == ["status", "status", "reset"]
    assert sum(entry.probability for entry in table) == pytest.approx(0.3)
    assert chaos_table(0.0) == []
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fake-segment", "--chaos", "2"])


def test_a_drain_process_does_not_load_the_fake(fake: FakeSegment, tmp_path: Path) -> None:
    database_url = f"sqlite+aiosqlite:///{tmp_path}/outbox.sqlite3"
    upgrade_to_head(database_url)
    env = {
        "PATH": "/usr/bin:/bin",
        "RELAY_DATABASE_URL": database_url,
        "RELAY_SEGMENT_WRITE_KEY": WRITE_KEY,
        "RELAY_SEGMENT_BASE_URL": fake.base_url,
    }
    drained = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "relay.cli", "drain", "--once"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert drained.returncode == 0, drained.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in drained.stderr.splitlines()]
    assert "relay.drainer.loop" in imported  # -X importtime listed what the drain loaded
    assert not [name for name in imported if name.startswith("relay.testing")]
