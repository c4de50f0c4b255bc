"""The fake Segment server's memory and rules (fake-segment spec §2, §3, §5, §6): the state that
runs each request through the pipeline and records what it accepted, discarded and deduplicated,
and the inspection and control API shared with the HTTP client.

`FakeSegmentState` knows nothing of sockets and is thread-safe: the HTTP server
(`fake_segment_server`) feeds it requests from its event-loop thread while test code reads it
from another. `FakeSegmentInspector` is the inspection and control API that the in-process fake
and the HTTP client (`fake_segment_client`) share, with the one-line assertions built on it.
Everything it returns is plain JSON data, so both give identical answers.
"""

from __future__ import annotations

import abc
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Self

import anyio

from relay.testing.fake_segment_config import (
    Clock,
    FakeSegmentOptions,
    RateLimitConfig,
    WallClock,
)
from relay.testing.fake_segment_faults import (
    ChaosEntry,
    ChaosTable,
    Fault,
    FaultMatch,
    FaultQueue,
)
from relay.testing.fake_segment_messages import (
    DISCARD_BAD_REQUEST,
    DISCARD_BATCH_TOO_MANY_EVENTS,
    DISCARD_EMPTY_BATCH,
    DISCARD_INVALID_TYPE,
    DISCARD_SOURCE_DISABLED,
    DISCARD_UNKNOWN_SOURCE,
    DISCARD_WRONG_REGION,
    enrich_message,
    format_timestamp,
    inherit_batch_fields,
    validate_message,
    warehouse_drops_property,
)
from relay.testing.fake_segment_requests import (
    REQUEST_ERRORS,
    HttpResponse,
    IncomingRequest,
    PendingMessage,
    RequestAnalysis,
    Route,
    analyze_request,
    classify_route,
    error_response,
    loggable_headers,
    pixel_response,
    success_response,
    with_content_type,
)

# The rate limiter (spec §5)


class TokenBucketLimiter:
    """Token buckets keyed by workspace or write key, refilled on the fake clock."""

    def __init__(self, config: RateLimitConfig) -> None:
        self.config = config
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str, cost: float, now_seconds: float) -> float | None:
        """Take `cost` tokens: None when allowed, else the seconds until they would be there."""
        capacity = self.config.capacity
        tokens, updated = self._buckets.get(key, (capacity, now_seconds))
        tokens = min(capacity, tokens + max(0.0, now_seconds - updated) * self.config.rps)
        # A request costing more than the whole bucket passes when the bucket is full, leaving
        # a debt; otherwise it could never pass.
        needed = min(cost, capacity)
        if tokens >= needed:
            self._buckets[key] = (tokens - cost, now_seconds)
            return None
        self._buckets[key] = (tokens, now_seconds)
        return (needed - tokens) / self.config.rps

    def clear(self) -> None:
        self._buckets.clear()


# Inspection API shared by the in-process fake and the HTTP client (spec §6)


def coerce_fault(fault: Fault | Mapping[str, Any]) -> Fault:
    return fault if isinstance(fault, Fault) else Fault.from_json(fault)


def coerce_chaos_entries(table: Sequence[ChaosEntry | Mapping[str, Any]]) -> list[ChaosEntry]:
    return [
        entry if isinstance(entry, ChaosEntry) else ChaosEntry.from_json(entry) for entry in table
    ]


class FakeSegmentInspector(abc.ABC):
    """What a test can ask of and tell the fake, in process or over HTTP.

    Returned records are plain JSON values; treat them as read-only (in process they are shared
    with the fake).
    """

    @abc.abstractmethod
    def requests(self, *, include_bodies: bool = True) -> list[dict[str, Any]]:
        """One entry per HTTP request to the Segment API, in arrival order."""

    @abc.abstractmethod
    def accepted(self) -> list[dict[str, Any]]:
        """Enriched accepted messages, in acceptance order."""

    @abc.abstractmethod
    def discarded(self) -> list[dict[str, Any]]:
        """`{level, reason, message, request_seq, position, writeKey}` per discard."""

    @abc.abstractmethod
    def duplicates(self) -> list[dict[str, Any]]:
        """`{messageId, first_request_seq, dup_request_seq, first_received_at, dup_received_at,
        writeKey, position, message}` per duplicate."""

    @abc.abstractmethod
    def duplicate_count(self, message_id: str) -> int:
        """How many duplicates of this messageId arrived since the last `reset()`."""

    @abc.abstractmethod
    def stats(self) -> dict[str, int]:
        """Counts: requests, accepted, discarded, duplicates, connections_opened,
        connections_accepted, pending_faults."""

    @abc.abstractmethod
    def now(self) -> datetime:
        """The fake clock's time."""

    @abc.abstractmethod
    def pending_faults(self) -> list[dict[str, Any]]:
        """The scripted faults still queued, with their filters and counters."""

    @abc.abstractmethod
    def chaos(self) -> dict[str, Any]:
        """The chaos table in force, `{seed, table}`."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget every record, the dedup store, the rate buckets and the scripted faults; the
        chaos table goes back to the configured one. Connections already open are not counted
        again by `connections_opened`."""

    @abc.abstractmethod
    def clear_dedup(self) -> None:
        """Forget only the dedup store."""

    @abc.abstractmethod
    def advance(self, seconds: float) -> None:
        """Move the fake clock."""

    @abc.abstractmethod
    def inject(
        self,
        fault: Fault | Mapping[str, Any],
        *,
        path: str | None = None,
        write_key: str | None = None,
        nth: int = 1,
        times: int | None = 1,
    ) -> None:
        """Queue a scripted fault for the matching requests (see `FaultMatch`)."""

    @abc.abstractmethod
    def set_chaos(self, table: Sequence[ChaosEntry | Mapping[str, Any]], seed: int = 0) -> None:
        """Replace the random chaos table (an empty table turns chaos off)."""

    # Built on the primitives above.

    def events(
        self, name: str | None = None, *, user_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Accepted Track messages, optionally with this event name and userId."""
        return [
            message
            for message in self.accepted()
            if message.get("type") == "track"
            and (name is None or message.get("event") == name)
            and (user_id is None or message.get("userId") == user_id)
        ]

    def connections_opened(self) -> int:
        """TCP connections that carried Segment API traffic (control traffic is not counted)."""
        return self.stats()["connections_opened"]

    def _condition_holds(self, predicate: Callable[[Self], bool] | None, count: int | None) -> bool:
        if count is not None and self.stats()["accepted"] < count:
            return False
        return predicate is None or predicate(self)

    def _timeout_error(self, count: int | None, timeout: float) -> TimeoutError:
        wanted = f"{count} accepted messages" if count is not None else "the condition"
        return TimeoutError(f"waited {timeout} s for {wanted}; fake stats: {self.stats()}")

    def wait_for(
        self,
        predicate: Callable[[Self], bool] | None = None,
        *,
        count: int | None = None,
        timeout: float = 5.0,
    ) -> None:
        """Block until `predicate(self)` holds and at least `count` messages were accepted."""
        if predicate is None and count is None:
            raise ValueError("wait_for needs a predicate or a count")
        deadline = time.monotonic() + timeout
        while not self._condition_holds(predicate, count):
            if time.monotonic() >= deadline:
                raise self._timeout_error(count, timeout)
            time.sleep(0.01)

    async def wait_for_async(
        self,
        predicate: Callable[[Self], bool] | None = None,
        *,
        count: int | None = None,
    ) -> None:
        """`wait_for` for async tests: polls without blocking the event loop. It has no timeout
        of its own; bound it with `anyio.fail_after(seconds)` (or `asyncio.timeout`)."""
        if predicate is None and count is None:
            raise ValueError("wait_for_async needs a predicate or a count")
        # Polling, because the records change on the server's thread (or in another process),
        # where no event of this loop can be set.
        while not self._condition_holds(predicate, count):  # noqa: ASYNC110
            await anyio.sleep(0.01)

    def assert_no_discards(self) -> None:
        """No message or request was discarded (a 200 that lost data)."""
        discards = self.discarded()
        if discards:
            summary = [
                (item["reason"], item.get("request_seq"), item.get("position"))
                for item in discards[:10]
            ]
            raise AssertionError(
                f"{len(discards)} discards (reason, request_seq, position): {summary}"
            )

    def assert_no_duplicates(self) -> None:
        """No messageId arrived twice within the dedup window."""
        duplicates = self.duplicates()
        if duplicates:
            ids = [item["messageId"] for item in duplicates[:10]]
            raise AssertionError(f"{len(duplicates)} duplicates, messageIds: {ids}")

    def assert_max_request_bytes(self, limit: int) -> None:
        """No Segment API request had a decoded body over `limit` bytes."""
        over = [
            (entry["seq"], entry["decoded_size"])
            for entry in self.requests(include_bodies=False)
            if entry["kind"] is not None and (entry["decoded_size"] or 0) > limit
        ]
        if over:
            raise AssertionError(f"requests over {limit} bytes (seq, decoded_size): {over[:10]}")

    def assert_max_batch_events(self, limit: int) -> None:
        """No request carried more than `limit` messages."""
        over = [
            (entry["seq"], entry["message_count"])
            for entry in self.requests(include_bodies=False)
            if entry["message_count"] > limit
        ]
        if over:
            raise AssertionError(f"requests over {limit} events (seq, message_count): {over[:10]}")


# The state


@dataclass(frozen=True)
class HandledRequest:
    """What the state decided for one request: `sent` is what goes on the wire (None: nothing);
    `pipeline_response` is what the pipeline answered (None when the request was not processed)."""

    seq: int
    sent: HttpResponse | None
    pipeline_response: HttpResponse | None


@dataclass
class _DedupEntry:
    received_at: datetime
    request_seq: int


class FakeSegmentState(FakeSegmentInspector):
    """The fake's memory and rules. Every method is safe to call from any thread."""

    def __init__(self, options: FakeSegmentOptions | None = None) -> None:
        self.options = options or FakeSegmentOptions()
        self._clock: Clock = self.options.clock or WallClock()
        # Re-entrant, because a wait_for predicate calls the inspection methods.
        self._condition = threading.Condition(threading.RLock())
        self._limiter = (
            TokenBucketLimiter(self.options.rate_limit) if self.options.rate_limit else None
        )
        self._faults = FaultQueue()
        self._jitter_random = random.Random(self.options.seed)
        self._next_connection_id = 1
        self._forget_everything()

    def _forget_everything(self) -> None:
        self._requests: list[dict[str, Any]] = []
        self._accepted: list[dict[str, Any]] = []
        self._discarded: list[dict[str, Any]] = []
        self._duplicates: list[dict[str, Any]] = []
        self._duplicate_counts: Counter[str] = Counter()
        self._dedup: dict[str, _DedupEntry] = {}
        self._next_request_seq = 1
        self._connections_opened = 0
        self._connections_accepted = 0
        self._faults.clear()
        self._chaos = ChaosTable(self.options.chaos, self.options.chaos_seed)
        if self._limiter is not None:
            self._limiter.clear()

    # Called by the server.

    def connection_accepted(self) -> int:
        """Count a TCP connection and return its id."""
        with self._condition:
            connection_id = self._next_connection_id
            self._next_connection_id += 1
            self._connections_accepted += 1
            self._condition.notify_all()
            return connection_id

    def count_api_connection(self) -> None:
        """Count a connection once it carries Segment API traffic (or an on_accept fault)."""
        with self._condition:
            self._connections_opened += 1
            self._condition.notify_all()

    def select_connection_fault(self) -> Fault | None:
        with self._condition:
            return self._faults.take_for_connection()

    def fault_matching_needs_write_keys(self) -> bool:
        with self._condition:
            return self._faults.needs_write_keys() or any(
                entry.write_key is not None for entry in self._chaos.entries
            )

    def select_request_fault(self, path: str, write_keys: Sequence[str]) -> Fault | None:
        """The scripted fault for this request, else chaos's draw, else None."""
        with self._condition:
            fault = self._faults.take_for_request(path, write_keys)
            if fault is None:
                fault = self._chaos.draw(path, write_keys)
            return fault

    def fault_delay_seconds(self, fault: Fault) -> float:
        with self._condition:
            jitter = self._jitter_random.uniform(0, fault.jitter_ms) if fault.jitter_ms else 0.0
        return ((fault.ms or 0.0) + jitter) / 1000.0

    def request_write_keys(self, request: IncomingRequest) -> list[str]:
        """The write keys visible in a request (Basic auth, and the body if it was read)."""
        route = classify_route(request.method, request.target)
        return analyze_request(request, route, self.options).write_keys_seen

    def record_connection_fault(self, connection_id: int, fault: Fault) -> None:
        """Log an on_accept fault: a request entry with no method or path, as none was read."""
        with self._condition:
            entry = self._new_entry(connection_id, self._clock.now())
            entry["seq"] = self._next_request_seq
            self._next_request_seq += 1
            entry["fault"] = fault.to_json()
            self._requests.append(entry)
            self._condition.notify_all()

    def handle_request(
        self,
        request: IncomingRequest,
        fault: Fault | None = None,
        *,
        process: bool = True,
        extra_flags: Sequence[str] = (),
    ) -> HandledRequest:
        """Run a Segment API request through the pipeline (when `process`), record it, and say
        what to send given the fault in force."""
        route = classify_route(request.method, request.target)
        analysis = analyze_request(request, route, self.options)
        with self._condition:
            seq = self._next_request_seq
            self._next_request_seq += 1
            now = self._clock.now()
            entry = self._new_entry(request.connection_id, now)
            entry.update(
                seq=seq,
                method=request.method,
                path=route.path,
                target=request.target,
                kind=route.kind,
                headers=loggable_headers(request.headers),
                raw_size=analysis.raw_size,
                decoded_size=analysis.decoded_size,
                content_encoding=analysis.content_encoding,
                content_type=analysis.content_type,
                auth_mode=analysis.auth_mode,
                write_keys_seen=list(analysis.write_keys_seen),
                message_count=len(analysis.messages),
                decoded_body=analysis.logged_body if self.options.keep_request_bodies else None,
            )
            flags: list[str] = entry["flags"]
            flags.extend(analysis.flags)
            flags.extend(extra_flags)
            pipeline_response = (
                self._run_pipeline(route, analysis, entry, seq, now) if process else None
            )
            sent = (
                pipeline_response
                if fault is None
                else self._fault_response(fault, pipeline_response)
            )
            entry["status"] = None if sent is None else sent.status
            entry["response_body"] = None if sent is None else sent.body_text()
            entry["fault"] = None if fault is None else fault.to_json()
            self._requests.append(entry)
            self._condition.notify_all()
        return HandledRequest(seq, sent, pipeline_response)

    def _new_entry(self, connection_id: int, now: datetime) -> dict[str, Any]:
        return {
            "seq": None,
            "connection_id": connection_id,
            "received_at": format_timestamp(now),
            "method": None,
            "path": None,
            "target": None,
            "kind": None,
            "headers": {},
            "raw_size": 0,
            "decoded_size": None,
            "content_encoding": None,
            "content_type": None,
            "auth_mode": "none",
            "write_keys_seen": [],
            "status": None,
            "response_body": None,
            "error": None,
            "fault": None,
            "flags": [],
            "message_count": 0,
            "decoded_body": None,
        }

    def _fault_response(
        self, fault: Fault, pipeline_response: HttpResponse | None
    ) -> HttpResponse | None:
        """What the client gets under `fault`; None when it gets no (complete) response."""
        style = self.options.error_body_style
        if fault.kind == "latency":
            return pipeline_response
        if fault.kind == "slow_body":
            return pipeline_response or success_response()
        if fault.kind == "bad_success":
            return HttpResponse(
                fault.code or 200,
                with_content_type(fault.content_type or "application/json", fault.headers),
                (fault.body or "").encode(),
            )
        if fault.kind == "status":
            code = fault.code or 500
            if fault.body is None and code >= 400:
                default = error_response(code, "injected_fault", style)
                default_type = dict(default.headers)["Content-Type"]
                return HttpResponse(
                    code,
                    with_content_type(fault.content_type or default_type, fault.headers),
                    default.body,
                )
            return HttpResponse(
                code,
                with_content_type(fault.content_type or "text/plain", fault.headers),
                (fault.body or "").encode(),
            )
        return None

    def _run_pipeline(
        self,
        route: Route,
        analysis: RequestAnalysis,
        entry: dict[str, Any],
        seq: int,
        now: datetime,
    ) -> HttpResponse:
        style = self.options.error_body_style
        if route.family == "not_found":
            entry["error"] = "not_found"
            return error_response(404, "not_found", style)
        if not route.method_allowed:
            entry["error"] = "method_not_allowed"
            return error_response(405, "method_not_allowed", style)
        lenient = route.family in ("short", "pixel")
        answer = pixel_response() if route.family == "pixel" else success_response()
        throttled = False
        if not lenient and self._limiter is not None:
            limit = self._limiter.config
            wait = self._limiter.take(
                self._rate_limit_key(analysis, limit),
                max(1, len(analysis.messages)) if limit.unit == "events" else 1,
                now.timestamp(),
            )
            if wait is not None:
                if limit.mode == "reject":
                    entry["error"] = "rate_limited"
                    seconds = limit.retry_after_seconds
                    if seconds is None:
                        seconds = max(1, math.ceil(wait))
                    headers = (("Retry-After", str(seconds)), ("X-RateLimit-Reset", str(seconds)))
                    return error_response(429, "rate_limited", style, headers=headers)
                throttled = True
                entry["flags"].append("throttled_queued")
        if analysis.error is not None:
            entry["error"] = analysis.error
            if lenient:
                self._discarded.append(
                    _request_discard(DISCARD_BAD_REQUEST, seq, detail=analysis.error)
                )
                return answer
            status = self.options.empty_key_status if analysis.error == "missing_write_key" else 400
            return error_response(
                status, analysis.error, style, message=REQUEST_ERRORS[analysis.error]
            )
        if (
            not lenient
            and self.options.unknown_key_policy == "401"
            and self.options.write_keys
            and any(
                message.write_key not in self.options.write_keys for message in analysis.messages
            )
        ):
            entry["error"] = "unknown_write_key"
            return error_response(401, "unknown_write_key", style, message="Unknown write key")
        self._process_messages(analysis, entry, seq, now, throttled)
        return answer

    def _rate_limit_key(self, analysis: RequestAnalysis, limit: RateLimitConfig) -> str:
        key = next(
            (
                message.write_key
                for message in analysis.messages
                if isinstance(message.write_key, str)
            ),
            analysis.write_keys_seen[0] if analysis.write_keys_seen else "",
        )
        if limit.per == "write_key":
            return f"key:{key}"
        return f"workspace:{self._workspace_of(key)}"

    def _workspace_of(self, key: object) -> str | None:
        if not self.options.write_keys:
            return "default"
        if isinstance(key, str) and key in self.options.write_keys:
            return self.options.write_keys[key].workspace
        return None

    def _process_messages(
        self,
        analysis: RequestAnalysis,
        entry: dict[str, Any],
        seq: int,
        now: datetime,
        throttled: bool,
    ) -> None:
        flags: list[str] = entry["flags"]
        messages = analysis.messages
        if not messages:
            flags.append("empty_batch")
            self._discarded.append(_request_discard(DISCARD_EMPTY_BATCH, seq))
            return
        limit = self.options.max_batch_events
        too_many = analysis.is_batch and len(messages) > limit
        discard_all = too_many and self.options.over_count_policy == "discard_all"
        failures = passes = 0
        body = analysis.body or {}
        for pending in messages:
            element = pending.element
            if isinstance(element, dict):
                message = (
                    inherit_batch_fields(element, body) if analysis.is_batch else dict(element)
                )
            else:
                message = {"value": element}
            message["writeKey"] = pending.write_key
            if discard_all or (too_many and pending.position >= limit):
                reason: str | None = DISCARD_BATCH_TOO_MANY_EVENTS
            elif not isinstance(element, dict):
                reason = DISCARD_INVALID_TYPE
            else:
                reason = self._source_check(pending.write_key) or validate_message(
                    message, self.options
                )
            if reason is not None:
                failures += 1
                self._discarded.append(
                    {
                        "level": "message",
                        "reason": reason,
                        "message": message,
                        "request_seq": seq,
                        "position": pending.position,
                        "writeKey": pending.write_key,
                    }
                )
                continue
            passes += 1
            self._accept(message, pending, seq, now, throttled)
        if analysis.is_batch and failures and passes:
            flags.append("multi_user_error")

    def _source_check(self, key: object) -> str | None:
        write_keys = self.options.write_keys
        if not write_keys:
            return None
        if not isinstance(key, str) or key not in write_keys:
            return DISCARD_UNKNOWN_SOURCE
        source = write_keys[key]
        if not source.enabled:
            return DISCARD_SOURCE_DISABLED
        if source.region != self.options.region:
            return DISCARD_WRONG_REGION
        return None

    def _accept(
        self,
        message: dict[str, Any],
        pending: PendingMessage,
        seq: int,
        now: datetime,
        throttled: bool,
    ) -> None:
        flags: list[str] = ["throttled_queued"] if throttled else []
        enrich_message(message, now, flags)
        properties = message.get("properties")
        if isinstance(properties, dict) and any(
            warehouse_drops_property(name, value) for name, value in properties.items()
        ):
            flags.append("reserved_property_dropped_in_warehouse")
        message["workspace"] = self._workspace_of(pending.write_key)
        message["request_seq"] = seq
        message["position"] = pending.position
        message["flags"] = flags
        message_id: str = message["messageId"]
        first = self._dedup.get(message_id)
        if first is not None and now - first.received_at < self.options.dedup_window:
            self._duplicate_counts[message_id] += 1
            self._duplicates.append(
                {
                    "messageId": message_id,
                    "first_request_seq": first.request_seq,
                    "dup_request_seq": seq,
                    "first_received_at": format_timestamp(first.received_at),
                    "dup_received_at": format_timestamp(now),
                    "writeKey": pending.write_key,
                    "position": pending.position,
                    "message": message,
                }
            )
            return
        self._dedup[message_id] = _DedupEntry(now, seq)
        self._accepted.append(message)

    # Inspection and control.

    def requests(self, *, include_bodies: bool = True) -> list[dict[str, Any]]:
        with self._condition:
            if include_bodies:
                return list(self._requests)
            return [
                {name: value for name, value in entry.items() if name != "decoded_body"}
                for entry in self._requests
            ]

    def accepted(self) -> list[dict[str, Any]]:
        with self._condition:
            return list(self._accepted)

    def discarded(self) -> list[dict[str, Any]]:
        with self._condition:
            return list(self._discarded)

    def duplicates(self) -> list[dict[str, Any]]:
        with self._condition:
            return list(self._duplicates)

    def duplicate_count(self, message_id: str) -> int:
        with self._condition:
            return self._duplicate_counts[message_id]

    def stats(self) -> dict[str, int]:
        with self._condition:
            return {
                "requests": len(self._requests),
                "accepted": len(self._accepted),
                "discarded": len(self._discarded),
                "duplicates": len(self._duplicates),
                "connections_opened": self._connections_opened,
                "connections_accepted": self._connections_accepted,
                "pending_faults": len(self._faults),
            }

    def now(self) -> datetime:
        return self._clock.now()

    def pending_faults(self) -> list[dict[str, Any]]:
        with self._condition:
            return self._faults.pending()

    def chaos(self) -> dict[str, Any]:
        with self._condition:
            return self._chaos.to_json()

    def reset(self) -> None:
        with self._condition:
            self._forget_everything()
            self._condition.notify_all()

    def clear_dedup(self) -> None:
        with self._condition:
            self._dedup.clear()

    def advance(self, seconds: float) -> None:
        with self._condition:
            self._clock.advance(seconds)
            self._condition.notify_all()

    def inject(
        self,
        fault: Fault | Mapping[str, Any],
        *,
        path: str | None = None,
        write_key: str | None = None,
        nth: int = 1,
        times: int | None = 1,
    ) -> None:
        match = FaultMatch(path=path, write_key=write_key, nth=nth, times=times)
        with self._condition:
            self._faults.push(coerce_fault(fault), match)

    def set_chaos(self, table: Sequence[ChaosEntry | Mapping[str, Any]], seed: int = 0) -> None:
        chaos = ChaosTable(coerce_chaos_entries(table), seed)
        with self._condition:
            self._chaos = chaos

    def wait_for(
        self,
        predicate: Callable[[Self], bool] | None = None,
        *,
        count: int | None = None,
        timeout: float = 5.0,
    ) -> None:
        # Sleeps on the condition the server notifies, so it wakes at once instead of polling.
        if predicate is None and count is None:
            raise ValueError("wait_for needs a predicate or a count")
        deadline = time.monotonic() + timeout
        with self._condition:
            while not self._condition_holds(predicate, count):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._timeout_error(count, timeout)
                self._condition.wait(remaining)


def _request_discard(reason: str, seq: int, *, detail: str | None = None) -> dict[str, Any]:
    return {
        "level": "request",
        "reason": reason,
        "detail": detail,
        "message": None,
        "request_seq": seq,
        "position": None,
        "writeKey": None,
    }
