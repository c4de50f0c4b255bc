"""The fake Segment server on the wire: HTTP/1.1 with keep-alive on asyncio streams and h11.

It reads requests, hands them to `FakeSegmentState`, carries out the faults the state picks on the
socket itself (an RST through `SO_LINGER (1, 0)`, a FIN, a hang, a partial or trickled response),
and serves the `/__fake/...` control API. `FakeSegment` runs it on a background thread with its own
event loop, for sync and async tests alike; `serve_forever` runs it in the foreground until SIGTERM
or SIGINT, for the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import socket
import struct
import threading
from collections.abc import Callable
from http import HTTPStatus
from types import TracebackType
from typing import Any, Final, Self

import anyio
import h11

from relay.testing.fake_segment import FakeSegmentState
from relay.testing.fake_segment_config import FakeSegmentOptions
from relay.testing.fake_segment_control import control_response, health_response
from relay.testing.fake_segment_faults import Fault
from relay.testing.fake_segment_requests import (
    HttpResponse,
    IncomingRequest,
    classify_route,
    cors_preflight_response,
    success_response,
)

logger = logging.getLogger(__name__)

READ_CHUNK_BYTES: Final = 64 * 1024
# The server stops reading a request body past this size, far above any Segment limit.
MAX_WIRE_BODY_BYTES: Final = 32 * 1024 * 1024
MAX_HEAD_BYTES: Final = 64 * 1024
_CLOSE_TIMEOUT_SECONDS: Final = 1.0
_BAD_REQUEST_BYTES: Final = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n"
    b"Connection: close\r\n\r\nBad Request"
)


class _ClientGone(Exception):
    """The client closed its side before the request was complete."""


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _has_body(status: int) -> bool:
    return status >= 200 and status not in (204, 304)


def _wire_headers(response: HttpResponse) -> list[tuple[str, str]]:
    # The length is always ours, so a fault cannot make h11 refuse the response.
    headers = [
        (name, value) for name, value in response.headers if name.lower() != "content-length"
    ]
    if _has_body(response.status):
        headers.append(("Content-Length", str(len(response.body))))
    return headers


def partial_response_bytes(response: HttpResponse, partial_bytes: int | None) -> bytes:
    """The start of `response` as bytes on the wire, never the whole of it: `partial_bytes`
    bytes, or by default the status line and the first header line."""
    status_line = f"HTTP/1.1 {response.status} {_reason(response.status)}\r\n".encode("latin-1")
    header_lines = [
        f"{name}: {value}\r\n".encode("latin-1") for name, value in _wire_headers(response)
    ]
    whole = status_line + b"".join(header_lines) + b"\r\n" + response.body
    if partial_bytes is None:
        partial_bytes = len(status_line) + (len(header_lines[0]) if header_lines else 0)
    return whole[: min(partial_bytes, len(whole) - 1)]


class _Connection:
    """One accepted TCP connection: its h11 state machine and the faults carried out on it."""

    def __init__(
        self,
        state: FakeSegmentState,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        connection_id: int,
    ) -> None:
        self._state = state
        self._reader = reader
        self._writer = writer
        self._connection_id = connection_id
        self._http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self._counted = False
        self._closed = False
        self._body: bytes | None = None
        self._raw_size = 0
        self._body_over_limit = False
        self._method = ""

    async def serve(self) -> None:
        try:
            if await self._apply_connection_fault():
                return
            while not self._closed:
                event = await self._next_event()
                if not isinstance(event, h11.Request):
                    break
                if not await self._serve_request(event):
                    break
                if self._http.our_state is not h11.DONE or self._http.their_state is not h11.DONE:
                    break
                self._http.start_next_cycle()
        except h11.RemoteProtocolError:
            await self._send_protocol_error()
        except (_ClientGone, ConnectionError, TimeoutError):
            pass
        except asyncio.CancelledError:
            # The server is stopping: drop the connection at once.
            self._reset()
            raise
        except Exception:
            logger.exception("fake Segment: connection %s failed", self._connection_id)
            self._reset()
        finally:
            await self._close_gracefully()

    # Reading.

    async def _next_event(self) -> h11.Event | None:
        while True:
            event = self._http.next_event()
            if isinstance(event, h11.Event):
                return event
            if event is not h11.NEED_DATA:
                return None
            if self._http.they_are_waiting_for_100_continue:
                await self._write(
                    self._http.send(h11.InformationalResponse(status_code=100, headers=[]))
                )
            self._http.receive_data(await self._reader.read(READ_CHUNK_BYTES))

    async def _read_body(self) -> None:
        if self._body is not None:
            return
        chunks: list[bytes] = []
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                self._raw_size += len(event.data)
                if self._raw_size > MAX_WIRE_BODY_BYTES:
                    self._body_over_limit = True
                    self._body = b""
                    return
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                self._body = b"".join(chunks)
                return
            else:
                raise _ClientGone

    def _request(
        self, method: str, target: str, headers: tuple[tuple[str, str], ...]
    ) -> IncomingRequest:
        return IncomingRequest(
            method=method,
            target=target,
            headers=headers,
            body=self._body or b"",
            connection_id=self._connection_id,
            body_over_wire_limit=self._body_over_limit,
            raw_size=self._raw_size,
        )

    async def _client_leaves_within(self, seconds: float | None) -> bool:
        """Wait up to `seconds` (None: for ever); True as soon as the client closes its side."""
        try:
            async with asyncio.timeout(seconds):
                while True:
                    data = await self._reader.read(READ_CHUNK_BYTES)
                    if not data:
                        return True
                    # A pipelined next request: keep it for the next cycle.
                    self._http.receive_data(data)
        except TimeoutError:
            return False
        except ConnectionError:
            return True

    # Writing and closing.

    async def _write(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def _send(self, response: HttpResponse | None) -> None:
        if response is None:
            raise RuntimeError("the fake Segment state gave no response to send")
        data = self._http.send(
            h11.Response(
                status_code=response.status,
                headers=_wire_headers(response),
                reason=_reason(response.status).encode("latin-1"),
            )
        )
        if self._sends_body(response) and response.body:
            data += self._http.send(h11.Data(data=response.body)) or b""
        data += self._http.send(h11.EndOfMessage()) or b""
        await self._write(data or b"")

    async def _send_slowly(self, response: HttpResponse | None, bytes_per_second: float) -> None:
        if response is None:
            raise RuntimeError("the fake Segment state gave no response to send")
        head = self._http.send(
            h11.Response(
                status_code=response.status,
                headers=_wire_headers(response),
                reason=_reason(response.status).encode("latin-1"),
            )
        )
        await self._write(head or b"")
        body = response.body if self._sends_body(response) else b""
        chunk_size = max(1, int(bytes_per_second / 20))
        for offset in range(0, len(body), chunk_size):
            piece = body[offset : offset + chunk_size]
            await asyncio.sleep(len(piece) / bytes_per_second)
            await self._write(self._http.send(h11.Data(data=piece)) or b"")
        await self._write(self._http.send(h11.EndOfMessage()) or b"")

    def _sends_body(self, response: HttpResponse) -> bool:
        # A HEAD answer keeps its Content-Length but carries no body.
        return _has_body(response.status) and self._method != "HEAD"

    async def _send_protocol_error(self) -> None:
        # Only when no response of this cycle has started; h11 cannot send after its own error.
        if self._http.our_state in (h11.IDLE, h11.SEND_RESPONSE) and not self._closed:
            with contextlib.suppress(ConnectionError, OSError):
                await self._write(_BAD_REQUEST_BYTES)

    def _reset(self) -> None:
        """Abort with a TCP RST: linger on, timeout 0, then close. Also ends a graceful close
        that was interrupted, so it never returns early."""
        self._closed = True
        sock = self._writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._writer.transport.abort()

    async def _close_gracefully(self) -> None:
        """Close with a FIN after what was written has gone out.

        The write side is shut first, then what the client still sends is read and dropped until
        it closes too: closing a socket with unread data makes the kernel answer with an RST.
        """
        if self._closed:
            return
        self._closed = True
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT_SECONDS):
                if self._writer.can_write_eof():
                    self._writer.write_eof()
                    while await self._reader.read(READ_CHUNK_BYTES):
                        pass
                self._writer.close()
                await self._writer.wait_closed()
        except (TimeoutError, ConnectionError, OSError):
            self._writer.transport.abort()

    async def _disconnect(self, fault: Fault) -> None:
        if fault.kind == "reset":
            self._reset()
        else:
            await self._close_gracefully()

    # Requests.

    def _count_connection(self) -> None:
        if not self._counted:
            self._counted = True
            self._state.count_api_connection()

    async def _apply_connection_fault(self) -> bool:
        fault = self._state.select_connection_fault()
        if fault is None:
            return False
        self._count_connection()
        self._state.record_connection_fault(self._connection_id, fault)
        await self._disconnect(fault)
        return True

    async def _serve_request(self, event: h11.Request) -> bool:
        """Serve one request; False when the connection must not carry another."""
        method = event.method.decode("ascii", "replace").upper()
        target = event.target.decode("latin-1")
        headers = tuple(
            (name.decode("latin-1").lower(), value.decode("latin-1"))
            for name, value in event.headers
        )
        self._body = None
        self._raw_size = 0
        self._body_over_limit = False
        self._method = method
        route = classify_route(method, target)
        if route.family == "control":
            await self._read_body()
            await self._send(control_response(self._state, method, route, self._body or b""))
            return True
        if route.family == "health" and route.method_allowed:
            await self._read_body()
            await self._send(health_response())
            return True
        if method == "OPTIONS":
            await self._read_body()
            await self._send(cors_preflight_response())
            return True

        self._count_connection()
        if self._state.fault_matching_needs_write_keys():
            await self._read_body()
        write_keys = self._state.request_write_keys(self._request(method, target, headers))
        fault = self._state.select_request_fault(route.path, write_keys)
        if fault is None:
            await self._read_body()
            await self._send(
                self._state.handle_request(self._request(method, target, headers)).sent
            )
            return True
        return await self._carry_out(fault, method, target, headers)

    async def _carry_out(
        self, fault: Fault, method: str, target: str, headers: tuple[tuple[str, str], ...]
    ) -> bool:
        if fault.stage == "head":
            if fault.kind == "latency":
                await asyncio.sleep(self._state.fault_delay_seconds(fault))
            else:
                self._state.handle_request(
                    self._request(method, target, headers), fault, process=False
                )
                await self._disconnect(fault)
                return False
        await self._read_body()
        request = self._request(method, target, headers)
        if fault.kind == "latency":
            return await self._carry_out_latency(fault, request)
        result = self._state.handle_request(request, fault, process=fault.accept == "after_accept")
        if fault.kind in ("status", "bad_success"):
            await self._send(result.sent)
            return True
        if fault.kind == "slow_body":
            await self._send_slowly(result.sent, fault.bytes_per_s or 1.0)
            return True
        if fault.kind == "hang":
            await self._client_leaves_within(None if fault.ms is None else fault.ms / 1000)
            await self._close_gracefully()
            return False
        if fault.phase == "mid_response":
            answer = result.pipeline_response or success_response()
            await self._write(partial_response_bytes(answer, fault.partial_bytes))
        await self._disconnect(fault)
        return False

    async def _carry_out_latency(self, fault: Fault, request: IncomingRequest) -> bool:
        if fault.phase == "before_read":
            # The delay already happened, before the body was read.
            await self._send(self._state.handle_request(request, fault).sent)
            return True
        delay = self._state.fault_delay_seconds(fault)
        if fault.accept == "after_accept":
            result = self._state.handle_request(request, fault)
            await asyncio.sleep(delay)
            await self._send(result.sent)
            return True
        if await self._client_leaves_within(delay):
            # The client gave up before the fake accepted anything: nothing is recorded.
            self._state.handle_request(
                request, fault, process=False, extra_flags=("client_disconnected",)
            )
            await self._close_gracefully()
            return False
        await self._send(self._state.handle_request(request, fault).sent)
        return True


async def run_server(
    state: FakeSegmentState,
    sock: socket.socket,
    stop: asyncio.Event,
    on_ready: Callable[[], None],
) -> None:
    """Serve on the listening socket `sock` until `stop` is set, then drop every connection."""
    loop = asyncio.get_running_loop()
    # Each connection's task with its writer: a task cancelled before it ever ran cannot close
    # its own transport, so the shutdown below does it.
    connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = _Connection(state, reader, writer, state.connection_accepted())
        task = loop.create_task(connection.serve())
        connections[task] = writer
        task.add_done_callback(lambda finished: connections.pop(finished, None))

    server = await asyncio.start_server(on_client, sock=sock)
    try:
        on_ready()
        await stop.wait()
    finally:
        server.close()
        pending = dict(connections)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for writer in pending.values():
            writer.transport.abort()
        # One loop turn lets the aborted transports close their sockets.
        await asyncio.sleep(0)
        await server.wait_closed()


def bind_listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=128)
    sock.setblocking(False)
    return sock


def base_url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


class FakeSegment(FakeSegmentState):
    """The fake Segment API on loopback, served from a background thread with its own event loop,
    so both sync and async tests can use it and inspect it at any time.

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
        if overrides:
            options = dataclasses.replace(options or FakeSegmentOptions(), **overrides)
        super().__init__(options)
        self.host = host
        self._requested_port = port
        self._base_url: str | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._startup_error: BaseException | None = None

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
        if self._thread is not None:
            raise RuntimeError("this FakeSegment was already started")
        sock = bind_listening_socket(self.host, self._requested_port)
        self._base_url = base_url_of(sock)
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run_loop,
            args=(sock, ready),
            name=f"fake-segment{self._base_url.rsplit(':', 1)[1]}",
            daemon=True,
        )
        self._thread.start()
        ready.wait()
        if self._startup_error is not None:
            raise RuntimeError("the fake Segment server failed to start") from self._startup_error
        return self

    def _run_loop(self, sock: socket.socket, ready: threading.Event) -> None:
        try:
            asyncio.run(self._serve(sock, ready))
        except Exception as error:
            self._startup_error = error
            logger.exception("fake Segment server stopped on an error")
        finally:
            sock.close()
            ready.set()

    async def _serve(self, sock: socket.socket, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        await run_server(self, sock, self._stop_event, ready.set)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and drop open connections; the records stay readable."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        loop, stop_event = self._loop, self._stop_event
        if loop is not None and stop_event is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed
                loop.call_soon_threadsafe(stop_event.set)
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError(f"the fake Segment server did not stop within {timeout} s")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await anyio.to_thread.run_sync(self.stop)


async def _wait_for_thread_event(event: threading.Event, stop: asyncio.Event) -> None:
    # A threading.Event cannot wake an event loop, so it is polled.
    while not event.is_set():  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    stop.set()


def serve_forever(
    host: str = "127.0.0.1",
    port: int = 0,
    options: FakeSegmentOptions | None = None,
    *,
    ready_callback: Callable[[str], None] | None = None,
    stop_event: threading.Event | None = None,
    announce: bool = True,
) -> None:
    """Serve the fake in the foreground until SIGTERM or SIGINT (handled only when called from
    the main thread) or until `stop_event` is set; then return.

    When listening it prints `fake-segment listening on http://HOST:PORT` (unless `announce` is
    false) and calls `ready_callback(base_url)`.
    """
    state = FakeSegmentState(options)
    sock = bind_listening_socket(host, port)
    base_url = base_url_of(sock)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        handled: list[signal.Signals] = []
        if threading.current_thread() is threading.main_thread():
            for signal_number in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(signal_number, stop.set)
                    handled.append(signal_number)
        watcher = (
            asyncio.create_task(_wait_for_thread_event(stop_event, stop)) if stop_event else None
        )

        def on_ready() -> None:
            logger.info("fake Segment listening on %s", base_url)
            if announce:
                print(f"fake-segment listening on {base_url}", flush=True)
            if ready_callback is not None:
                ready_callback(base_url)

        try:
            await run_server(state, sock, stop, on_ready)
        finally:
            if watcher is not None:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
            for signal_number in handled:
                loop.remove_signal_handler(signal_number)

    try:
        asyncio.run(main())
    finally:
        sock.close()
