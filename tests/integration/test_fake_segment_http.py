"""The fake Segment server on the wire: every fault kind before and after acceptance, scripted
fault matching, seeded chaos, keep-alive accounting, the `/__fake/...` control API through
`FakeSegmentClient`, and the command line run as a real process and stopped with a signal.
"""

from __future__ import annotations

import argparse
import json
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from relay.testing import (
    ChaosEntry,
    FakeSegment,
    FakeSegmentClient,
    FakeSegmentOptions,
    Fault,
    ManualClock,
    SourceConfig,
    serve_forever,
)
from relay.testing.fake_segment_cli import add_cli_arguments, options_from_cli
from relay.testing.fake_segment_faults import AcceptMode, FaultKind

WRITE_KEY = "write-key-0123456789abcdef012345"


def track(message_id: str = "m-1", **fields: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "event": "call.created",
        "userId": "user-1",
        "messageId": message_id,
        **fields,
    }


def batch_body(*message_ids: str, key: str = WRITE_KEY) -> dict[str, Any]:
    return {"batch": [track(message_id) for message_id in message_ids], "writeKey": key}


@pytest.fixture
def fake() -> Iterator[FakeSegment]:
    with FakeSegment(clock=ManualClock()) as server:
        yield server


@pytest.fixture
def client(fake: FakeSegment) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.base_url, timeout=5) as http:
        yield http


def raw_exchange(fake: FakeSegment, body: bytes | None = None) -> tuple[str, bytes]:
    """Send one request on a fresh socket and say how the server ended it: FIN, RST or TIMEOUT,
    with the bytes received before that."""
    if body is None:
        body = json.dumps(batch_body("m-1")).encode()
    request = (
        b"POST /v1/batch HTTP/1.1\r\nHost: fake\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body
    received: list[bytes] = []
    try:
        # On loopback an on_accept RST can arrive before connect() even returns.
        with socket.create_connection(("127.0.0.1", fake.port), timeout=2) as connection:
            connection.sendall(request)
            while True:
                data = connection.recv(65536)
                if not data:
                    return "FIN", b"".join(received)
                received.append(data)
    except (ConnectionResetError, BrokenPipeError):
        return "RST", b"".join(received)
    except TimeoutError:
        return "TIMEOUT", b"".join(received)


# status


def test_status_fault_before_accept_records_nothing_and_keeps_the_connection(
    fake: FakeSegment, client: httpx.Client
) -> None:
    fake.inject(Fault.status(500))
    first = client.post("/v1/batch", json=batch_body("a"))
    assert (first.status_code, first.text) == (500, "Internal Server Error")
    assert client.post("/v1/batch", json=batch_body("a")).status_code == 200
    assert [message["request_seq"] for message in fake.accepted()] == [2]
    entry = fake.requests()[0]
    assert (entry["status"], entry["fault"]["kind"]) == (500, "status")
    assert fake.connections_opened() == 1


def test_status_fault_default_body_follows_the_error_style() -> None:
    with (
        FakeSegment(error_body_style="json") as fake,
        httpx.Client(base_url=fake.base_url) as http,
    ):
        fake.inject(Fault.status(503))
        response = http.post("/v1/batch", json=batch_body("a"))
        assert response.status_code == 503
        assert response.json() == {
            "success": False,
            "code": "injected_fault",
            "message": "Service Unavailable",
        }


def test_status_fault_after_accept_records_then_fails(
    fake: FakeSegment, client: httpx.Client
) -> None:
    fake.inject(Fault.status(503, headers={"Retry-After": "2"}, accept="after_accept"))
    response = client.post("/v1/batch", json=batch_body("a", "b"))
    assert response.status_code == 503
    assert response.headers["retry-after"] == "2"
    assert len(fake.accepted()) == 2
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


def test_status_fault_with_its_own_body_and_content_type(
    fake: FakeSegment, client: httpx.Client
) -> None:
    fake.inject(Fault.status(413, body="<h1>too big</h1>", content_type="text/html"))
    response = client.post("/v1/batch", json=batch_body("a"))
    assert (response.status_code, response.text) == (413, "<h1>too big</h1>")
    assert response.headers["content-type"] == "text/html"


def test_status_fault_with_connection_close_ends_the_connection(
    fake: FakeSegment, client: httpx.Client
) -> None:
    fake.inject(Fault.status(503, headers={"Connection": "close"}))
    assert client.post("/v1/batch", json=batch_body("a")).status_code == 503
    assert client.post("/v1/batch", json=batch_body("a")).status_code == 200
    assert fake.connections_opened() == 2


# latency


@pytest.mark.parametrize("phase", ["before_read", "before_response"])
def test_latency_delays_then_answers_normally(
    fake: FakeSegment, client: httpx.Client, phase: str
) -> None:
    fake.inject(Fault.latency(150, phase=phase))
    started = time.monotonic()
    response = client.post("/v1/batch", json=batch_body("a"))
    assert time.monotonic() - started >= 0.14
    assert response.status_code == 200
    assert len(fake.accepted()) == 1
    assert fake.requests()[0]["fault"]["kind"] == "latency"


def test_latency_before_accept_past_the_client_timeout_records_nothing(
    fake: FakeSegment,
) -> None:
    fake.inject(Fault.latency(2000))
    with (
        httpx.Client(base_url=fake.base_url, timeout=0.1) as http,
        pytest.raises(httpx.ReadTimeout),
    ):
        http.post("/v1/batch", json=batch_body("a"))
    fake.wait_for(lambda inspector: len(inspector.requests()) == 1, timeout=2)
    entry = fake.requests()[0]
    assert entry["status"] is None
    assert "client_disconnected" in entry["flags"]
    assert fake.accepted() == []


def test_latency_after_accept_records_although_the_client_gave_up(fake: FakeSegment) -> None:
    fake.inject(Fault.latency(500, accept="after_accept"))
    with httpx.Client(base_url=fake.base_url, timeout=0.1) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/batch", json=batch_body("a"))
        assert len(fake.accepted()) == 1
        assert http.post("/v1/batch", json=batch_body("a")).status_code == 200
    assert len(fake.accepted()) == 1
    assert fake.duplicate_count("a") == 1


def test_latency_jitter_is_drawn_from_the_seed() -> None:
    delays = []
    for _ in range(2):
        with FakeSegment(seed=5) as fake:
            fault = Fault.latency(10, jitter_ms=100)
            delays.append([fake.fault_delay_seconds(fault) for _ in range(5)])
    assert delays[0] == delays[1]
    assert all(0.01 <= delay <= 0.11 for delay in delays[0])


# hang


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
        ("on_accept", "before_accept"),
        ("after_headers_read", "before_accept"),
        ("after_body_read", "before_accept"),
        ("mid_response", "before_accept"),
        ("after_body_read", "after_accept"),
        ("mid_response", "after_accept"),
    ],
)
def test_disconnect_faults_on_the_wire(
    fake: FakeSegment, kind: FaultKind, phase: str, accept: AcceptMode
) -> None:
    fault = Fault(kind, phase=phase, accept=accept)
    fake.inject(fault)
    ending, received = raw_exchange(fake)
    assert ending == ("RST" if kind == "reset" else "FIN")
    if phase == "mid_response":
        assert received == b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    else:
        assert received == b""
    assert len(fake.accepted()) == (1 if accept == "after_accept" else 0)
    (entry,) = fake.requests()
    assert entry["seq"] == 1
    assert entry["fault"] == fault.to_json()
    assert entry["status"] is None
    if phase == "on_accept":
        assert entry["method"] is None
    else:
        assert entry["path"] == "/v1/batch"


def test_partial_bytes_of_a_mid_response_disconnect(fake: FakeSegment) -> None:
    fake.inject(Fault.close(phase="mid_response", partial_bytes=12))
    assert raw_exchange(fake) == ("FIN", b"HTTP/1.1 200")


def test_after_accept_reset_makes_a_retry_a_duplicate(
    fake: FakeSegment, client: httpx.Client
) -> None:
    fake.inject(Fault.reset(accept="after_accept"))
    with pytest.raises(httpx.TransportError):
        client.post("/v1/batch", json=batch_body("a", "b"))
    assert client.post("/v1/batch", json=batch_body("a", "b")).status_code == 200
    assert [message["messageId"] for message in fake.accepted()] == ["a", "b"]
    assert [duplicate["messageId"] for duplicate in fake.duplicates()] == ["a", "b"]
    assert fake.connections_opened() == 2


@pytest.mark.parametrize("kind", ["reset", "close"])
def test_on_accept_faults_wait_for_a_new_connection(
    fake: FakeSegment, client: httpx.Client, kind: FaultKind
) -> None:
    assert client.post("/v1/batch", json=batch_body("a")).status_code == 200
    fake.inject(Fault(kind, phase="on_accept"))
    # The open keep-alive connection is not a new one.
    assert client.post("/v1/batch", json=batch_body("b")).status_code == 200
    assert fake.stats()["pending_faults"] == 1
    with httpx.Client(base_url=fake.base_url) as other, pytest.raises(httpx.TransportError):
        other.post("/v1/batch", json=batch_body("c"))
    assert [message["messageId"] for message in fake.accepted()] == ["a", "b"]


# bad_success and slow_body


@pytest.mark.parametrize(
    ("body", "code"), [("", 200), ("OK", 200), ("{", 200), ("", 202), ("", 204)]
)
@pytest.mark.parametrize("accept", ["before_accept", "after_accept"])
def test_bad_success(
    fake: FakeSegment, client: httpx.Client, body: str, code: int, accept: AcceptMode
) -> None:
    fake.inject(Fault.bad_success(body, code=code, accept=accept))
    response = client.post("/v1/batch", json=batch_body("a"))
    assert (response.status_code, response.text) == (code, body)
    assert len(fake.accepted()) == (1 if accept == "after_accept" else 0)
    # The connection stays usable.
    assert client.post("/v1/batch", json=batch_body("b")).status_code == 200
    assert fake.connections_opened() == 1


@pytest.mark.parametrize(("accept", "accepted"), [("before_accept", 0), ("after_accept", 1)])
def test_slow_body_trickles_the_response(
    fake: FakeSegment, client: httpx.Client, accept: AcceptMode, accepted: int
) -> None:
    fake.inject(Fault.slow_body(100, accept=accept))
    started = time.monotonic()
    response = client.post("/v1/batch", json=batch_body("a"))
    # 17 bytes at 100 B/s.
    assert time.monotonic() - started >= 0.15
    assert response.json() == {"success": True}
    assert len(fake.accepted()) == accepted


# Scripted fault matching


def test_scripted_fault_applies_to_the_nth_matching_request_times_times(
    fake: FakeSegment, client: httpx.Client
) -> None:
    fake.inject(Fault.status(500), path="/v1/batch", nth=2, times=2)
    statuses = [client.post("/v1/track", json={**track("t"), "writeKey": "k"}).status_code]
    statuses += [client.post("/v1/batch", json=batch_body(f"m-{i}")).status_code for i in range(4)]
    assert statuses == [200, 200, 500, 500, 200]
    assert fake.pending_faults() == []


def test_scripted_fault_path_glob_ignores_control_traffic(
    fake: FakeSegment, client: httpx.Client
) -> None:
    fake.inject(Fault.status(503), path="/V1/*", times=None)
    assert client.post("/v1/track", json={**track("t"), "writeKey": "k"}).status_code == 503
    assert client.post("/v1/batch/", json=batch_body("a")).status_code == 503
    assert client.get("/internal/health").status_code == 200
    assert client.post("/v2/batch", json=batch_body("a")).status_code == 404
    assert fake.pending_faults()[0]["applied"] == 2


@pytest.mark.parametrize("where", ["body", "basic"])
def test_scripted_fault_write_key_filter(
    fake: FakeSegment, client: httpx.Client, where: str
) -> None:
    fake.inject(Fault.status(500), write_key="eu-key", times=None)

    def send(key: str) -> int:
        if where == "body":
            return client.post("/v1/batch", json=batch_body("a", key=key)).status_code
        return client.post("/v1/batch", json={"batch": [track("a")]}, auth=(key, "")).status_code

    assert [send("us-key"), send("eu-key"), send("us-key")] == [200, 500, 200]


def test_scripted_faults_come_before_chaos(client: httpx.Client, fake: FakeSegment) -> None:
    fake.set_chaos([ChaosEntry(Fault.status(500), 1.0)], seed=1)
    fake.inject(Fault.status(503))
    statuses = [client.post("/v1/batch", json=batch_body("a")).status_code for _ in range(3)]
    assert statuses == [503, 500, 500]
    fake.set_chaos([])
    assert client.post("/v1/batch", json=batch_body("a")).status_code == 200


# Chaos


def _outcomes(seed: int, count: int = 40) -> list[int | str]:
    table = [
        ChaosEntry(Fault.status(500), 0.2),
        ChaosEntry(Fault.rate_limited(1), 0.1),
        ChaosEntry(Fault.reset(), 0.1),
    ]
    outcomes: list[int | str] = []
    with (
        FakeSegment(chaos=table, chaos_seed=seed) as fake,
        httpx.Client(base_url=fake.base_url) as http,
    ):
        for index in range(count):
            try:
                outcomes.append(http.post("/v1/batch", json=batch_body(f"m-{index}")).status_code)
            except httpx.TransportError:
                outcomes.append("reset")
        accepted = {message["messageId"] for message in fake.accepted()}
    assert accepted == {f"m-{i}" for i, outcome in enumerate(outcomes) if outcome == 200}
    return outcomes


def test_seeded_chaos_is_reproducible() -> None:
    first = _outcomes(seed=11)
    assert first == _outcomes(seed=11)
    assert first != _outcomes(seed=12)
    assert {500, 429, "reset", 200} <= set(first)


def test_chaos_from_the_options_survives_reset() -> None:
    with (
        FakeSegment(chaos=[ChaosEntry(Fault.status(500), 1.0, write_key="flaky")]) as fake,
        httpx.Client(base_url=fake.base_url) as http,
    ):
        fake.reset()
        assert http.post("/v1/batch", json=batch_body("a", key="flaky")).status_code == 500
        assert http.post("/v1/batch", json=batch_body("a", key="steady")).status_code == 200
        assert fake.chaos()["table"][0]["write_key"] == "flaky"


# Keep-alive and protocol details


def test_keep_alive_connections_are_counted(fake: FakeSegment) -> None:
    with httpx.Client(base_url=fake.base_url) as http:
        for index in range(5):
            assert http.post("/v1/batch", json=batch_body(f"m-{index}")).status_code == 200
    assert fake.connections_opened() == 1
    assert len({entry["connection_id"] for entry in fake.requests()}) == 1
    with httpx.Client(base_url=fake.base_url) as http:
        http.post("/v1/batch", json=batch_body("x"))
    with httpx.Client(base_url=fake.base_url, headers={"Connection": "close"}) as http:
        http.post("/v1/batch", json=batch_body("y"))
        http.post("/v1/batch", json=batch_body("z"))
    assert fake.connections_opened() == 4


def test_control_and_health_traffic_is_not_counted(fake: FakeSegment) -> None:
    with FakeSegmentClient(fake.base_url) as control:
        control.stats()
        control.accepted()
    with socket.create_connection(("127.0.0.1", fake.port)):
        pass  # a port probe
    fake.wait_for(lambda inspector: inspector.stats()["connections_accepted"] >= 2, timeout=2)
    assert fake.connections_opened() == 0


def test_expect_100_continue(fake: FakeSegment) -> None:
    body = json.dumps(batch_body("a")).encode()
    with socket.create_connection(("127.0.0.1", fake.port), timeout=2) as connection:
        connection.sendall(
            b"POST /v1/batch HTTP/1.1\r\nHost: fake\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        assert connection.recv(1024).startswith(b"HTTP/1.1 100 ")
        connection.sendall(body)
        assert connection.recv(1024).startswith(b"HTTP/1.1 200 ")
    assert len(fake.accepted()) == 1


def test_malformed_http_gets_a_400(fake: FakeSegment) -> None:
    with socket.create_connection(("127.0.0.1", fake.port), timeout=2) as connection:
        connection.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        assert connection.recv(1024).startswith(b"HTTP/1.1 400 Bad Request")
    assert fake.requests() == []


def test_head_requests_get_no_body(fake: FakeSegment, client: httpx.Client) -> None:
    assert client.head("/internal/health").status_code == 200
    response = client.head("/v1/batch")
    assert (response.status_code, response.content) == (405, b"")
    assert client.post("/v1/batch", json=batch_body("a")).status_code == 200
    assert fake.connections_opened() == 1


def test_chunked_request_body(fake: FakeSegment, client: httpx.Client) -> None:
    body = json.dumps(batch_body("a")).encode()
    response = client.post(
        "/v1/batch",
        content=iter([body[:10], body[10:]]),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 200
    assert fake.requests()[0]["raw_size"] == len(body)


def test_lifecycle_and_options() -> None:
    fake = FakeSegment(FakeSegmentOptions(region="eu"), max_batch_events=10)
    assert (fake.options.region, fake.options.max_batch_events) == ("eu", 10)
    with pytest.raises(RuntimeError, match="not started"):
        _ = fake.base_url
    with fake:
        assert fake.base_url == f"http://127.0.0.1:{fake.port}"
        with pytest.raises(RuntimeError, match="already started"):
            fake.start()
    fake.stop()  # a second stop is harmless
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{fake.base_url}/internal/health")


def test_stop_drops_hanging_connections_quickly() -> None:
    fake = FakeSegment().start()
    fake.inject(Fault.hang(), times=None)
    with socket.create_connection(("127.0.0.1", fake.port), timeout=5) as connection:
        body = json.dumps(batch_body("a")).encode()
        connection.sendall(
            b"POST /v1/batch HTTP/1.1\r\nHost: fake\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body
        )
        fake.wait_for(lambda inspector: len(inspector.requests()) == 1, timeout=2)
        started = time.monotonic()
        fake.stop()
        assert time.monotonic() - started < 2
    assert len(fake.requests()) == 1


# The /__fake control API


def test_control_api_mirrors_the_in_process_api(fake: FakeSegment, client: httpx.Client) -> None:
    client.post(
        "/v1/batch",
        json={"batch": [track("a"), track("a"), track("b", userId=None)], "writeKey": "k"},
    )
    with FakeSegmentClient(fake.base_url) as control:
        assert control.accepted() == fake.accepted()
        assert control.requests() == fake.requests()
        assert control.requests(include_bodies=False) == fake.requests(include_bodies=False)
        assert control.discarded() == fake.discarded()
        assert control.duplicates() == fake.duplicates()
        assert control.stats() == fake.stats()
        assert control.duplicate_count("a") == 1
        assert [message["messageId"] for message in control.events("call.created")] == ["a"]
        assert control.events(user_id="nobody") == []
        assert control.connections_opened() == 1
        assert control.now() == fake.now()
        control.advance(3600)
        assert control.now() == fake.now()
        control.wait_for(count=1, timeout=1)
        with pytest.raises(AssertionError, match="no_user_anon_id"):
            control.assert_no_discards()

        control.clear_dedup()
        client.post("/v1/batch", json=batch_body("a"))
        assert len(control.accepted()) == 2

        control.inject(Fault.status(502), path="/v1/batch", nth=1, times=1)
        assert control.pending_faults()[0]["code"] == 502
        assert client.post("/v1/batch", json=batch_body("c")).status_code == 502
        control.inject({"kind": "status", "code": 504}, times=2)
        assert [client.post("/v1/batch", json=batch_body("c")).status_code for _ in range(3)] == [
            504,
            504,
            200,
        ]

        control.set_chaos([{"probability": 1.0, "fault": {"kind": "status", "code": 500}}], seed=3)
        assert control.chaos()["seed"] == 3
        assert client.post("/v1/batch", json=batch_body("d")).status_code == 500
        control.set_chaos([])

        control.reset()
        assert control.stats()["requests"] == 0
        assert fake.accepted() == []


def test_control_api_refuses_bad_input(fake: FakeSegment) -> None:
    with FakeSegmentClient(fake.base_url) as control:
        with pytest.raises(ValueError, match="unknown fault kind"):
            control._post("inject", {"kind": "explode"})
        with pytest.raises(ValueError, match="seconds"):
            control._post("advance", {"seconds": "soon"})
        with pytest.raises(ValueError, match="add up to"):
            control._post(
                "chaos",
                {"table": [{"probability": 0.9, "fault": {"kind": "reset"}}] * 2},
            )
    with httpx.Client(base_url=fake.base_url) as http:
        assert http.get("/__fake/nothing").status_code == 404
        assert http.post("/__fake/stats").status_code == 405
        assert http.get("/__fake/duplicate_count").status_code == 400
        assert http.post("/__fake/advance", content=b"[1]").status_code == 400


def test_control_lists_page_with_offset_and_limit(fake: FakeSegment, client: httpx.Client) -> None:
    client.post("/v1/batch", json=batch_body(*[f"m-{i}" for i in range(5)]))
    response = client.get("/__fake/accepted", params={"offset": 1, "limit": 2})
    assert [message["messageId"] for message in response.json()] == ["m-1", "m-2"]
    assert len(client.get("/__fake/accepted", params={"offset": 4}).json()) == 1
    assert client.get("/__fake/accepted", params={"limit": "x"}).status_code == 400


# Serving in the foreground and the command line


def test_serve_forever_stops_on_its_stop_event() -> None:
    ready: list[str] = []
    stop = threading.Event()
    server = threading.Thread(
        target=serve_forever,
        kwargs={"ready_callback": ready.append, "stop_event": stop, "announce": False},
    )
    server.start()
    try:
        deadline = time.monotonic() + 5
        while not ready and time.monotonic() < deadline:
            time.sleep(0.01)
        (base_url,) = ready
        with httpx.Client(base_url=base_url) as http:
            assert http.post("/v1/batch", json=batch_body("a")).status_code == 200
        with FakeSegmentClient(base_url) as control:
            assert len(control.accepted()) == 1
    finally:
        stop.set()
        server.join(5)
    assert not server.is_alive()


def test_cli_options() -> None:
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    args = parser.parse_args(
        [
            "--write-key",
            "k1",
            "--write-key",
            "k2",
            "--region",
            "eu",
            "--error-body-style",
            "json",
            "--rate-limit-rps",
            "5",
            "--chaos",
            "0.3",
            "--seed",
            "9",
            "--dedup-window-seconds",
            "60",
        ]
    )
    options = options_from_cli(args)
    assert options.write_keys == {"k1": SourceConfig(region="eu"), "k2": SourceConfig(region="eu")}
    assert (options.region, options.error_body_style) == ("eu", "json")
    assert options.rate_limit is not None
    assert (options.rate_limit.rps, options.rate_limit.capacity) == (5, 5)
    assert [entry.fault.kind for entry in options.chaos] == ["status", "status", "reset"]
    assert sum(entry.probability for entry in options.chaos) == pytest.approx(0.3)
    assert options.chaos_seed == 9
    assert options.dedup_window.total_seconds() == 60
    defaults = options_from_cli(parser.parse_args([]))
    assert (defaults.write_keys, defaults.chaos, defaults.rate_limit) == ({}, [], None)
    with pytest.raises(SystemExit):
        parser.parse_args(["--chaos", "2"])


def _read_line(process: subprocess.Popen[str], timeout: float) -> str:
    assert process.stdout is not None
    readable, _, _ = select.select([process.stdout], [], [], timeout)
    if not readable:
        raise TimeoutError("the fake Segment process printed nothing")
    return process.stdout.readline()


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_cli_process_serves_and_exits_0_on_signal(stop_signal: signal.Signals) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "relay.testing.fake_segment_cli",
            "--port",
            "0",
            "--write-key",
            "known-key",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = _read_line(process, timeout=15)
        assert line.startswith("fake-segment listening on http://127.0.0.1:")
        base_url = line.rsplit(" ", 1)[1].strip()
        with httpx.Client(base_url=base_url) as http:
            assert http.post("/v1/batch", json=batch_body("a", key="known-key")).status_code == 200
            assert http.post("/v1/batch", json=batch_body("b", key="other-key")).status_code == 200
        with FakeSegmentClient(base_url) as control:
            assert [message["messageId"] for message in control.accepted()] == ["a"]
            assert [item["reason"] for item in control.discarded()] == ["unknown_source"]
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
