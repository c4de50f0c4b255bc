"""The fake Segment's rules and memory (docs in /work/shared/reference/fake-segment.md, "the spec"):
what `POST /v1/batch` answers, what happens to each message after a 200, the faults a test
scripts, and what a test can read back.

Segment's documented behaviours kept here, those the relay's tests and benchmarks rely on:

- Auth: the write key of a message is its own `writeKey`, else the body's, else the user name of
  HTTP Basic auth (empty password). None at all: 400. A key not in `write_keys` (when any are
  configured), a disabled source or a wrong region: 200 and the message is discarded
  (`unknown_key_policy="401"` answers 401 instead, a debugging aid that Segment does not have).
- Limits: a body over `max_batch_bytes` (500 KB), an element over `max_event_bytes` (32 KB,
  compact UTF-8 JSON), bad JSON, a body that is not an object or a `batch` that is not an array:
  400 `Bad Request`, nothing accepted. Over `max_batch_events` (2,500): 200, every message
  discarded. A `Content-Encoding` is refused with 400 (the relay sends none; Segment would accept
  gzip).
- 200 for dropped messages: each message is validated after the 200 with Segment's discard codes;
  discards, duplicates and acceptances are recorded, never signalled on the wire.
- Dedup by `messageId` within `dedup_window` (24 h), across write keys; discarded messages do not
  enter the dedup store.
- Enrichment: `messageId` when absent, `receivedAt`, `originalTimestamp`, and `timestamp`
  corrected by the client's clock skew (`receivedAt - (sentAt - timestamp)`); the batch's
  `context`, `integrations` and `sentAt` apply to each message (the message's own keys win).
- The warehouse: each accepted message lists the reserved columns its properties would fill
  (`dropped_columns`, relay/snakecase.py, the relay's own list), and is flagged
  `reserved_property_dropped_in_warehouse` when there are any.
- Faults (spec §4): a FIFO queue of scripted faults (`inject`, each for `times` requests) and a
  seeded random chaos table (`set_chaos`), consulted in that order for each request.

`FakeSegmentState` knows nothing of sockets and is thread-safe: the server (fake_segment_server)
feeds it requests from its connection threads while test code reads it from another thread.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from typing import Any, Final, Literal, Self

from relay.snakecase import reserved_columns_in

Region = Literal["us", "eu"]
FaultKind = Literal["status", "latency", "hang", "reset", "close", "bad_success"]
AcceptMode = Literal["before_accept", "after_accept"]
DisconnectPhase = Literal["after_headers_read", "after_body_read", "mid_response"]

MESSAGE_TYPES: Final = frozenset({"identify", "track", "page", "screen", "group", "alias"})
MAX_MESSAGE_ID_CHARS: Final = 100
BATCH_PATH: Final = "/v1/batch"
RESERVED_PROPERTY_FLAG: Final = "reserved_property_dropped_in_warehouse"
_DISCONNECT_PHASES: Final = ("after_headers_read", "after_body_read", "mid_response")


# Configuration


@dataclass(frozen=True)
class SourceConfig:
    """What the fake knows of one write key: the region of its workspace, and whether its source
    is enabled."""

    region: Region = "us"
    enabled: bool = True


@dataclass(frozen=True)
class FakeSegmentOptions:
    """Every setting of the fake, with Segment's documented limits as defaults.

    `write_keys` maps each known write key to its source; when empty, any non-empty key is known.
    `chaos` and `seed` set the chaos table that `reset()` restores; `seed` also drives latency
    jitter. `keep_request_bodies=False` keeps the parsed bodies out of the request log (saves
    memory and time in benchmarks). `clock` gives the time of receipt (default: the wall clock).
    """

    write_keys: Mapping[str, SourceConfig] = field(default_factory=dict)
    region: Region = "us"
    max_batch_bytes: int = 500 << 10
    max_event_bytes: int = 32 << 10
    max_batch_events: int = 2500
    dedup_window: timedelta = timedelta(hours=24)
    unknown_key_policy: Literal["200_discard", "401"] = "200_discard"
    keep_request_bodies: bool = True
    chaos: Sequence[ChaosEntry] = ()
    seed: int = 0
    clock: Callable[[], datetime] | None = None

    def __post_init__(self) -> None:
        if self.region not in ("us", "eu"):
            raise ValueError(f"region must be 'us' or 'eu', not {self.region!r}")
        if self.unknown_key_policy not in ("200_discard", "401"):
            raise ValueError("unknown_key_policy must be '200_discard' or '401'")
        if min(self.max_batch_bytes, self.max_event_bytes, self.max_batch_events) < 1:
            raise ValueError("the size and count limits must be at least 1")
        if self.dedup_window < timedelta(0):
            raise ValueError("dedup_window must not be negative")
        _check_chaos(self.chaos)


# Faults (spec §4)


@dataclass(frozen=True)
class Fault:
    """One fault. Build it with the class methods (`Fault.status(503)`, `Fault.reset()`, ...).

    `before_accept` (the default) records nothing as accepted, except `latency`, which only
    delays the normal answer (and records nothing if the client leaves meanwhile, flagging the
    request `client_disconnected`). `after_accept` processes and records the messages first, then
    the client meets the fault: the ambiguous failure that makes a re-send a duplicate.
    """

    kind: FaultKind
    accept: AcceptMode = "before_accept"
    code: int | None = None
    headers: tuple[tuple[str, str], ...] = ()
    body: str | None = None
    ms: float | None = None
    jitter_ms: float = 0.0
    phase: DisconnectPhase | None = None

    def __post_init__(self) -> None:
        if self.accept not in ("before_accept", "after_accept"):
            raise ValueError(f"accept must be before_accept or after_accept, not {self.accept!r}")
        low, high = (200, 299) if self.kind == "bad_success" else (200, 599)
        if self.kind in ("status", "bad_success") and not low <= (self.code or 0) <= high:
            raise ValueError(f"a {self.kind} fault needs a code from {low} to {high}")
        if self.kind == "latency" and (self.ms is None or self.ms < 0 or self.jitter_ms < 0):
            raise ValueError("a latency fault needs ms >= 0 and jitter_ms >= 0")
        if self.kind in ("reset", "close"):
            if self.phase not in _DISCONNECT_PHASES:
                raise ValueError(f"{self.kind} phase must be one of {_DISCONNECT_PHASES}")
            if self.accept == "after_accept" and self.phase == "after_headers_read":
                raise ValueError(f"an after_accept {self.kind} needs the body: not {self.phase}")

    @classmethod
    def status(
        cls,
        code: int,
        *,
        headers: Mapping[str, str] | None = None,
        body: str | None = None,
        accept: AcceptMode = "before_accept",
    ) -> Fault:
        """Answer `code` with these headers and body (by default the status's reason phrase)."""
        return cls("status", accept, code, tuple((headers or {}).items()), body)

    @classmethod
    def rate_limited(cls, seconds: int = 1, *, accept: AcceptMode = "before_accept") -> Fault:
        """A 429 as Segment documents it: `Retry-After` and `X-RateLimit-Reset` in seconds."""
        headers = {"Retry-After": str(seconds), "X-RateLimit-Reset": str(seconds)}
        return cls.status(429, headers=headers, accept=accept)

    @classmethod
    def latency(
        cls, ms: float, *, jitter_ms: float = 0.0, accept: AcceptMode = "before_accept"
    ) -> Fault:
        """Answer normally after `ms` milliseconds, plus a seeded draw of up to `jitter_ms`."""
        return cls("latency", accept, ms=ms, jitter_ms=jitter_ms)

    @classmethod
    def hang(cls, ms: float | None = None, *, accept: AcceptMode = "before_accept") -> Fault:
        """Read the request and answer nothing; close after `ms`, or when the client leaves."""
        return cls("hang", accept, ms=ms)

    @classmethod
    def reset(
        cls, phase: DisconnectPhase = "after_body_read", *, accept: AcceptMode = "before_accept"
    ) -> Fault:
        """Abort the connection with a TCP RST at `phase`; `mid_response` first sends the status
        line and the first header."""
        return cls("reset", accept, phase=phase)

    @classmethod
    def close(
        cls, phase: DisconnectPhase = "after_body_read", *, accept: AcceptMode = "before_accept"
    ) -> Fault:
        """Close the connection (FIN) at `phase`, without a complete response."""
        return cls("close", accept, phase=phase)

    @classmethod
    def bad_success(
        cls, body: str = "", *, code: int = 200, accept: AcceptMode = "before_accept"
    ) -> Fault:
        """A 2xx whose body is not `{"success": true}`, or a 2xx other than 200."""
        return cls("bad_success", accept, code, body=body)

    @property
    def processes(self) -> bool:
        """Whether the request is processed (its messages recorded) under this fault."""
        return self.kind == "latency" or self.accept == "after_accept"


@dataclass(frozen=True)
class ChaosEntry:
    """One row of the chaos table: `fault` strikes a request with this probability."""

    fault: Fault
    probability: float


def _check_chaos(table: Sequence[ChaosEntry]) -> None:
    if any(not 0.0 <= entry.probability <= 1.0 for entry in table):
        raise ValueError("a chaos probability is between 0 and 1")
    if sum(entry.probability for entry in table) > 1.0 + 1e-9:
        raise ValueError("the chaos probabilities add up to more than 1")


# What goes on the wire


@dataclass(frozen=True)
class Response:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


SUCCESS: Final = Response(200, (("Content-Type", "application/json"),), b'{"success": true}')


def reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def error_response(status: int, headers: Mapping[str, str] | None = None) -> Response:
    """Segment's error answer: the bare reason phrase as plain text (`Bad Request`)."""
    all_headers = {"Content-Type": "text/plain", **(headers or {})}
    return Response(status, tuple(all_headers.items()), reason_phrase(status).encode())


def fault_response(fault: Fault, answer: Response | None) -> Response | None:
    """What the client gets under `fault`, given the pipeline's `answer` (None when the request
    was not processed); None when it gets no complete response."""
    if fault.kind == "latency":
        return answer
    if fault.kind == "bad_success":
        headers = {"Content-Type": "application/json", **dict(fault.headers)}
        return Response(fault.code or 200, tuple(headers.items()), (fault.body or "").encode())
    if fault.kind == "status":
        code = fault.code or 500
        if fault.body is None and code >= 400:
            return error_response(code, dict(fault.headers))
        headers = {"Content-Type": "text/plain", **dict(fault.headers)}
        return Response(code, tuple(headers.items()), (fault.body or "").encode())
    return None


# Request analysis: outside the lock


@dataclass
class Analysis:
    """A request decoded and checked: `error` names why it gets a 400 (None: it gets a 200), and
    `messages` are (position, element, write key) of the batch."""

    error: str | None = None
    body: dict[str, Any] | None = None
    logged_body: object = None
    messages: list[tuple[int, object, object]] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    size: int = 0


def _basic_auth_key(header: str | None, flags: list[str]) -> str | None:
    scheme, _, credentials = (header or "").strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        flags.append("bad_basic_auth")
        return None
    user, colon, password = decoded.partition(":")
    if not colon:
        flags.append("basic_without_colon")  # tolerated, as Segment does today
    # The key is the user name and the password is empty: anything else is not a write key.
    return None if password else user


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def analyze(headers: Mapping[str, str], raw: bytes, options: FakeSegmentOptions) -> Analysis:
    """Check a `/v1/batch` request in Segment's order; `headers` have lower-case names."""
    result = Analysis(size=len(raw))
    media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        result.flags.append("bad_content_type")  # Segment asks for it, and accepts without
    basic_key = _basic_auth_key(headers.get("authorization"), result.flags)
    if headers.get("content-encoding", "identity").strip().lower() != "identity":
        result.error = "unsupported_content_encoding"
        return result
    if len(raw) > options.max_batch_bytes:
        result.error = "body_too_large"
        return result
    try:
        parsed = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError):
        result.error = "invalid_json"
        result.logged_body = raw.decode("utf-8", "replace")
        return result
    result.logged_body = parsed
    if not isinstance(parsed, dict):
        result.error = "not_an_object"
        return result
    result.body = parsed
    batch = parsed.get("batch")
    if batch is None:
        batch = []
    if not isinstance(batch, list):
        result.error = "batch_not_array"
        return result
    if any(_compact_size(element) > options.max_event_bytes for element in batch):
        result.error = "event_too_large"
    body_key = parsed.get("writeKey")
    for position, element in enumerate(batch):
        own_key = element.get("writeKey") if isinstance(element, dict) else None
        keys = (own_key, body_key, basic_key)
        result.messages.append((position, element, next((k for k in keys if k is not None), None)))
    keys_in_force = [key for _, _, key in result.messages] or [body_key or basic_key]
    if result.error is None and any(not isinstance(key, str) or not key for key in keys_in_force):
        result.error = "missing_write_key"
    return result


def _compact_size(element: object) -> int:
    return len(json.dumps(element, separators=(",", ":"), ensure_ascii=False).encode())


# Per-message rules (spec §3)


def discard_reason(message: Mapping[str, Any]) -> str | None:
    """The first of Segment's validation failures for this message, or None."""
    kind = message.get("type")
    if kind not in MESSAGE_TYPES:
        return "invalid_type"
    ids = (message.get("userId"), message.get("anonymousId"))
    if ids == (None, None):
        return "no_user_anon_id"
    if any(value is not None and (not isinstance(value, str) or not value) for value in ids):
        return "id_not_string"
    event = message.get("event")
    if kind == "track" and event is None:
        return "event_not_defined"
    if kind == "track" and (not isinstance(event, str) or not event):
        return "event_not_string"
    if kind in ("track", "page", "screen") and not isinstance(message.get("properties", {}), dict):
        return "properties_not_object"
    message_id = message.get("messageId")
    if message_id is not None and (
        not isinstance(message_id, str) or not 0 < len(message_id) <= MAX_MESSAGE_ID_CHARS
    ):
        return "invalid_message_id"
    return None


def format_timestamp(moment: datetime) -> str:
    """ISO-8601 UTC with `Z`, in milliseconds unless the value is finer."""
    moment = moment.astimezone(UTC).replace(tzinfo=None)
    precision = "milliseconds" if moment.microsecond % 1000 == 0 else "microseconds"
    return moment.isoformat(timespec=precision) + "Z"


def _parse_timestamp(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def enrich(message: dict[str, Any], received: datetime, flags: list[str]) -> None:
    """Segment's ingest enrichment: `messageId` when absent and the four timestamps."""
    if message.get("messageId") is None:
        message["messageId"] = f"fake-{uuid.uuid4()}"
        flags.append("message_id_assigned")
    message["receivedAt"] = format_timestamp(received)
    message.setdefault("sentAt", None)
    original = message.get("timestamp")
    message["originalTimestamp"] = original
    if original is None:
        message["timestamp"] = message["receivedAt"]
        return
    original_at, sent_at = _parse_timestamp(original), _parse_timestamp(message["sentAt"])
    if original_at is None:
        flags.append("invalid_timestamp")
        message["timestamp"] = message["receivedAt"]
    elif sent_at is not None:
        message["timestamp"] = format_timestamp(received - (sent_at - original_at))


def inherit_batch_fields(element: dict[str, Any], body: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a batch element with the batch's `context` and `integrations` merged in (the
    element's keys win) and the batch's `sentAt` when it has none."""
    message = dict(element)
    for name in ("context", "integrations"):
        shared, own = body.get(name), message.get(name)
        if isinstance(shared, dict) and (own is None or isinstance(own, dict)):
            message[name] = {**shared, **(own or {})}
    if message.get("sentAt") is None and body.get("sentAt") is not None:
        message["sentAt"] = body["sentAt"]
    return message


# The state


class FakeSegmentState:
    """The fake's rules and records. Every method is safe to call from any thread.

    Returned records are plain JSON values (also served under `/__fake/...`); treat them as
    read-only.
    """

    def __init__(self, options: FakeSegmentOptions | None = None, **overrides: Any) -> None:
        self.options = dataclasses.replace(options or FakeSegmentOptions(), **overrides)
        self._clock = self.options.clock or (lambda: datetime.now(UTC))
        # Re-entrant, because a wait_for predicate calls the inspection methods.
        self._condition = threading.Condition(threading.RLock())
        self._jitter = random.Random(self.options.seed)
        self._connections_opened = 0
        self._forget_everything()

    def _forget_everything(self) -> None:
        self._requests: list[dict[str, Any]] = []
        self._accepted: list[dict[str, Any]] = []
        self._discarded: list[dict[str, Any]] = []
        self._duplicates: list[dict[str, Any]] = []
        self._duplicate_counts: Counter[str] = Counter()
        self._dedup: dict[str, tuple[datetime, int]] = {}
        self._scripted: list[list[Any]] = []  # [fault, requests left (None: no end)]
        self._chaos = list(self.options.chaos)
        self._chaos_random = random.Random(self.options.seed)

    # Called by the server.

    def connection_opened(self) -> None:
        with self._condition:
            self._connections_opened += 1

    def take_fault(self) -> Fault | None:
        """The fault for the next Segment API request: the first scripted one, else chaos's
        draw (one draw per request, so a seed always gives the same sequence), else None."""
        with self._condition:
            if self._scripted:
                entry = self._scripted[0]
                if entry[1] is not None:
                    entry[1] -= 1
                    if entry[1] == 0:
                        self._scripted.pop(0)
                fault: Fault = entry[0]
                return fault
            if not self._chaos:
                return None
            roll, cumulative = self._chaos_random.random(), 0.0
            for chaos in self._chaos:
                cumulative += chaos.probability
                if roll < cumulative:
                    return chaos.fault
            return None

    def delay_seconds(self, fault: Fault) -> float:
        with self._condition:
            jitter = self._jitter.uniform(0, fault.jitter_ms) if fault.jitter_ms else 0.0
        return ((fault.ms or 0.0) + jitter) / 1000

    def handle(
        self,
        analysis: Analysis | None,
        fault: Fault | None = None,
        *,
        flags: Sequence[str] = (),
    ) -> tuple[Response | None, Response | None]:
        """Record a `POST /v1/batch` and run it through the pipeline, unless `fault` forbids or
        its body was never read (`analysis` None); return (what to send, what the pipeline
        answered, None when it did not run)."""
        with self._condition:
            now = self._clock()
            entry: dict[str, Any] = {
                "seq": len(self._requests) + 1,
                "received_at": format_timestamp(now),
                "size": None if analysis is None else analysis.size,
                "message_count": 0 if analysis is None else len(analysis.messages),
                "status": None,
                "error": None,
                "fault": None if fault is None else dataclasses.asdict(fault),
                "flags": [*flags, *(analysis.flags if analysis else ())],
                "decoded_body": (
                    analysis.logged_body if analysis and self.options.keep_request_bodies else None
                ),
            }
            answer = None
            if analysis is not None and (fault is None or fault.processes):
                answer = self._pipeline(analysis, entry, now)
            sent = answer if fault is None else fault_response(fault, answer)
            entry["status"] = None if sent is None else sent.status
            self._requests.append(entry)
            self._condition.notify_all()
        return sent, answer

    def _pipeline(self, analysis: Analysis, entry: dict[str, Any], now: datetime) -> Response:
        if analysis.error is not None:
            entry["error"] = analysis.error
            return error_response(400)
        keys = self.options.write_keys
        unknown = [key for _, _, key in analysis.messages if keys and key not in keys]
        if unknown and self.options.unknown_key_policy == "401":
            entry["error"] = "unknown_write_key"
            return error_response(401)
        if not analysis.messages:
            entry["flags"].append("empty_batch")
            discard = {"level": "request", "reason": "empty_batch", "request_seq": entry["seq"]}
            self._discarded.append(discard)
            return SUCCESS
        too_many = len(analysis.messages) > self.options.max_batch_events
        results = [
            self._process(analysis.body or {}, message, entry["seq"], now, too_many)
            for message in analysis.messages
        ]
        if any(results) and not all(results):
            entry["flags"].append("multi_user_error")
        return SUCCESS

    def _process(
        self,
        body: Mapping[str, Any],
        pending: tuple[int, object, object],
        seq: int,
        now: datetime,
        too_many: bool,
    ) -> bool:
        """Discard, deduplicate or accept one message; True unless it was discarded."""
        position, element, key = pending
        if isinstance(element, dict):
            message = inherit_batch_fields(element, body)
        else:
            message = {"value": element}
        message["writeKey"] = key
        if too_many:
            reason: str | None = "batch_too_many_events"
        elif not isinstance(element, dict):
            reason = "invalid_type"
        else:
            reason = self._source_problem(key) or discard_reason(message)
        origin = {"request_seq": seq, "position": position}
        if reason is not None:
            discard = {"level": "message", "reason": reason, "message": message, **origin}
            self._discarded.append(discard)
            return False
        flags: list[str] = []
        enrich(message, now, flags)
        properties = message.get("properties")
        dropped = reserved_columns_in(properties) if isinstance(properties, dict) else []
        if dropped:
            flags.append(RESERVED_PROPERTY_FLAG)
        message.update(origin, flags=flags, dropped_columns=dropped)
        message_id: str = message["messageId"]
        first = self._dedup.get(message_id)
        if first is not None and now - first[0] < self.options.dedup_window:
            self._duplicate_counts[message_id] += 1
            self._duplicates.append(
                {
                    "messageId": message_id,
                    "first_request_seq": first[1],
                    "dup_request_seq": seq,
                    "first_received_at": format_timestamp(first[0]),
                    "dup_received_at": format_timestamp(now),
                    "message": message,
                }
            )
        else:
            self._dedup[message_id] = (now, seq)
            self._accepted.append(message)
        return True

    def _source_problem(self, key: object) -> str | None:
        keys = self.options.write_keys
        if not keys:
            return None
        source = keys.get(key) if isinstance(key, str) else None
        if source is None:
            return "unknown_source"
        if not source.enabled:
            return "source_disabled"
        return "wrong_region" if source.region != self.options.region else None

    # Inspection and control (spec §6).

    def requests(self, *, include_bodies: bool = True) -> list[dict[str, Any]]:
        """One entry per request to the Segment API, in arrival order: `seq`, `received_at`,
        `size`, `message_count`, `status` sent (None: no response), `error` (why a 4xx),
        `fault`, `flags`, `decoded_body`."""
        with self._condition:
            if include_bodies:
                return list(self._requests)
            return [{**entry, "decoded_body": None} for entry in self._requests]

    def accepted(self) -> list[dict[str, Any]]:
        """The accepted messages, enriched, in acceptance order."""
        with self._condition:
            return list(self._accepted)

    def discarded(self) -> list[dict[str, Any]]:
        """`{level, reason, message, request_seq, position}` per discard, in order."""
        with self._condition:
            return list(self._discarded)

    def duplicates(self) -> list[dict[str, Any]]:
        """`{messageId, first_request_seq, dup_request_seq, first_received_at, dup_received_at,
        message}` per duplicate, in order."""
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
            }

    def connections_opened(self) -> int:
        """TCP connections accepted since the fake started."""
        return self.stats()["connections_opened"]

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """Accepted track messages, optionally only those of event `name`."""
        return [
            message
            for message in self.accepted()
            if message.get("type") == "track" and name in (None, message.get("event"))
        ]

    def reset(self) -> None:
        """Forget every record, the dedup store and the scripted faults; the chaos table goes
        back to the configured one. Connections are not counted again."""
        with self._condition:
            self._forget_everything()
            self._condition.notify_all()

    def inject(self, fault: Fault, *, times: int | None = 1) -> None:
        """Queue `fault` for the next `times` requests (None: every request until `reset`)."""
        if times is not None and times < 1:
            raise ValueError("times must be at least 1, or None")
        with self._condition:
            self._scripted.append([fault, times])

    def set_chaos(self, table: Sequence[ChaosEntry], seed: int = 0) -> None:
        """Replace the chaos table (an empty one turns chaos off), drawing from `seed`."""
        _check_chaos(table)
        with self._condition:
            self._chaos = list(table)
            self._chaos_random = random.Random(seed)

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
        with self._condition:
            while not (
                (count is None or len(self._accepted) >= count)
                and (predicate is None or predicate(self))
            ):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    wanted = "the condition" if count is None else f"{count} accepted messages"
                    raise TimeoutError(f"waited {timeout} s for {wanted}; stats {self.stats()}")
                self._condition.wait(remaining)

    def assert_no_discards(self) -> None:
        """No message or request was discarded: no 200 lost data."""
        if discards := self.discarded():
            summary = [
                (item["reason"], item["request_seq"], item.get("position")) for item in discards
            ]
            raise AssertionError(
                f"{len(discards)} discards (reason, request_seq, position): {summary[:10]}"
            )

    def assert_no_duplicates(self) -> None:
        """No messageId arrived twice within the dedup window."""
        if ids := [item["messageId"] for item in self.duplicates()]:
            raise AssertionError(f"{len(ids)} duplicates, messageIds: {ids[:10]}")

    def assert_max_batch_events(self, limit: int) -> None:
        """No request carried more than `limit` messages."""
        requests = self.requests(include_bodies=False)
        if over := [(e["seq"], e["message_count"]) for e in requests if e["message_count"] > limit]:
            raise AssertionError(f"requests over {limit} events (seq, message_count): {over[:10]}")
