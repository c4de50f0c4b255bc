"""The fake Segment on the wire: HTTP/1.1 with keep-alive, from the standard library's threaded
`http.server` (one thread per connection), serving `POST /v1/batch` through `FakeSegmentState`,
carrying out the faults on the socket itself (an RST through `SO_LINGER (1, 0)`, a FIN, a hang,
a partial response), and serving the `/__fake/...` control API for a test or a person in
another process:

- `GET /__fake/requests`, `/__fake/accepted`, `/__fake/discarded`, `/__fake/duplicates`: the
  records as JSON lists, paged with `offset` and `limit` (`bodies=0` leaves the request bodies
  out); `GET /__fake/stats`: the counts. `POST /__fake/reset`: forget everything.

`FakeSegment` serves from background threads, for tests; `run_from_cli` serves until SIGTERM or
SIGINT, for `aircall-relay fake-segment`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import select
import socket
import socketserver
import struct
import sys
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import parse_qsl, urlsplit

from relay.testing.fake_segment import FakeSegmentState
from relay.testing.fake_segment_faults import (
    SUCCESS,
    ChaosEntry,
    Fault,
    Response,
    error_response,
    reason_phrase,
)
from relay.testing.fake_segment_rules import BATCH_PATH, FakeSegmentOptions, SourceConfig, analyze
from relay.testing.serve_fake import serve_until_signalled

CONTROL_PREFIX: Final = "/__fake/"
_POLL_SECONDS: Final = 0.05


def wire_bytes(response: Response) -> bytes:
    """The response as sent: status line, headers with our own `Content-Length`, body."""
    lines = [f"HTTP/1.1 {response.status} {reason_phrase(response.status)}"]
    lines += [
        f"{name}: {value}" for name, value in response.headers if name.lower() != "content-length"
    ]
    if response.status >= 200 and response.status not in (204, 304):
        lines.append(f"Content-Length: {len(response.body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + response.body


def _json(payload: object, status: int = 200) -> Response:
    body = json.dumps(payload, separators=(",", ":"), default=str).encode()
    return Response(status, (("Content-Type", "application/json"),), body)


def control_response(state: FakeSegmentState, name: str, query: Mapping[str, str]) -> Response:
    """Answer `GET /__fake/<name>`."""
    lists = {
        "requests": lambda: state.requests(include_bodies=query.get("bodies") != "0"),
        "accepted": state.accepted,
        "discarded": state.discarded,
        "duplicates": state.duplicates,
    }
    if name == "stats":
        return _json(state.stats())
    if name not in lists:
        return _json({"error": f"no control endpoint {CONTROL_PREFIX}{name}"}, 404)
    try:
        offset, limit = (
            int(query.get(key) or default) for key, default in (("offset", 0), ("limit", -1))
        )
    except ValueError:
        return _json({"error": "offset and limit must be integers"}, 400)
    items = lists[name]()[max(0, offset) :]
    return _json(items if limit < 0 else items[:limit])


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], state: FakeSegmentState) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.state = state
        self.stopping = threading.Event()
        self.open_sockets: set[socket.socket] = set()
        self.lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer's own looks the host's name up, which can wait on DNS; nothing uses it.
        socketserver.TCPServer.server_bind(self)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that went away (or a connection dropped by `stop`) is no error of the fake.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.open_sockets.add(self.connection)
        self.server.state.connection_opened()

    def finish(self) -> None:
        with self.server.lock:
            self.server.open_sockets.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the records are the fake's output, not stderr."""

    def _path(self) -> tuple[str, dict[str, str]]:
        parts = urlsplit(self.path)
        path = parts.path.lower()
        return (path[:-1] if len(path) > 1 and path.endswith("/") else path), dict(
            parse_qsl(parts.query)
        )

    def _read_body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, response: Response | None) -> None:
        if response is None:
            raise RuntimeError("the fake Segment's state gave no response to send")
        self.wfile.write(wire_bytes(response))
        if any(
            name.lower() == "connection" and value.lower() == "close"
            for name, value in response.headers
        ):
            self.close_connection = True

    def do_GET(self) -> None:
        path, query = self._path()
        if path.startswith(CONTROL_PREFIX):
            self._send(control_response(self.server.state, path[len(CONTROL_PREFIX) :], query))
        else:
            self._send(error_response(405 if path == BATCH_PATH else 404))

    def do_POST(self) -> None:
        path, _ = self._path()
        if path == BATCH_PATH:
            self._serve_batch()
            return
        self._read_body()
        if path == f"{CONTROL_PREFIX}reset":
            self.server.state.reset()
            self._send(_json({"ok": True}))
        else:
            self._send(error_response(404))

    def _serve_batch(self) -> None:
        state = self.server.state
        fault = state.take_fault()
        if fault is not None and fault.phase == "after_headers_read":
            state.handle(None, fault)
            self._disconnect(fault)
            return
        analysis = analyze(
            {name.lower(): value for name, value in self.headers.items()},
            self._read_body(),
            state.options,
        )
        if fault is None:
            self._send(state.handle(analysis)[0])
            return
        delay = state.delay_seconds(fault) if fault.kind == "latency" else 0.0
        if fault.kind == "latency" and fault.accept == "before_accept":
            if self._client_leaves_within(delay):
                # The client gave up before the fake accepted anything: nothing is recorded.
                state.handle(None, fault, flags=("client_disconnected",))
                self.close_connection = True
                return
            delay = 0.0
        sent, answer = state.handle(analysis, fault)
        if fault.kind in ("status", "bad_success", "latency"):
            self.server.stopping.wait(delay)
            self._send(sent)
        elif fault.kind == "hang":
            self._client_leaves_within(None if fault.ms is None else fault.ms / 1000)
            self.close_connection = True
        else:
            if fault.phase == "mid_response":  # the status line and the first header
                whole = wire_bytes(answer or SUCCESS)
                self.wfile.write(whole[: whole.index(b"\r\n", whole.index(b"\r\n") + 2) + 2])
            self._disconnect(fault)

    def _client_leaves_within(self, seconds: float | None) -> bool:
        """Wait up to `seconds` (None: for ever); True as soon as the client closes its side.
        What it sends meanwhile is dropped: this connection carries nothing more."""
        deadline = None if seconds is None else time.monotonic() + seconds
        poller = select.poll()
        poller.register(self.connection, select.POLLIN)
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not poller.poll(None if remaining is None else remaining * 1000):
                return False
            try:
                if not self.connection.recv(65536):
                    return True
            except OSError:
                return True

    def _disconnect(self, fault: Fault) -> None:
        self.close_connection = True
        if fault.kind == "reset":
            # Linger on with a zero timeout: closing sends an RST instead of a FIN. The socket
            # really closes when `finish` closes its file.
            linger = struct.pack("ii", 1, 0)
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            self.connection.close()


class FakeSegment(FakeSegmentState):
    """The fake Segment API on loopback, served from background threads, so that sync and async
    tests alike can use it and read its records at any time.

        with FakeSegment(write_keys={"key": SourceConfig()}) as fake:
            httpx.post(f"{fake.base_url}/v1/batch", json={...}, auth=("key", ""))
            fake.wait_for(count=1)
            fake.assert_no_discards()

    Options come as a `FakeSegmentOptions`, or as keyword overrides of it.
    """

    def __init__(
        self,
        options: FakeSegmentOptions | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        **overrides: Any,
    ) -> None:
        super().__init__(options, **overrides)
        self._address = (host, port)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._base_url: str | None = None

    @property
    def base_url(self) -> str:
        """`http://127.0.0.1:PORT`: senders append `/v1/...` themselves."""
        if self._base_url is None:
            raise RuntimeError("the fake Segment server is not started")
        return self._base_url

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])

    def start(self) -> Self:
        if self._server is not None:
            raise RuntimeError("this FakeSegment was already started")
        self._server = _Server(self._address, self)
        host, port = self._server.socket.getsockname()[:2]
        self._base_url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            args=(_POLL_SECONDS,),
            name=f"fake-segment-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and drop the open connections; the records stay readable."""
        server, thread = self._server, self._thread
        if server is None or thread is None or server.stopping.is_set():
            return
        server.stopping.set()
        server.shutdown()
        server.server_close()
        with server.lock:
            for connection in server.open_sockets:
                with contextlib.suppress(OSError):  # the client already closed it
                    connection.shutdown(socket.SHUT_RDWR)
        thread.join()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def chaos_table(failure_rate: float) -> list[ChaosEntry]:
    """`failure_rate` of the requests fail, a third each with 500, 429 (retry after 1 s) and a
    reset (`aircall-relay fake-segment --chaos`)."""
    if failure_rate <= 0:
        return []
    faults = (Fault.status(500), Fault.rate_limited(1), Fault.reset())
    return [ChaosEntry(fault, failure_rate / 3) for fault in faults]


def run_from_cli(args: argparse.Namespace) -> int:
    """`aircall-relay fake-segment`: serve until SIGTERM or SIGINT, then exit 0 (1 when the
    address cannot be bound). Prints `fake-segment listening on http://HOST:PORT` when ready."""
    options = FakeSegmentOptions(
        write_keys={key: SourceConfig() for key in args.write_keys},
        chaos=chaos_table(args.chaos),
        seed=args.seed,
        keep_request_bodies=args.keep_request_bodies,
    )
    fake = FakeSegment(options, host=args.host, port=args.port)
    return serve_until_signalled(fake, "fake-segment", args.host, args.port)
