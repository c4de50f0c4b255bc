"""The fake Segment's memory: `FakeSegmentState` runs each `POST /v1/batch` through Segment's
rules (fake_segment_rules), picks its fault (a FIFO queue of scripted faults, each for `times`
requests, then a seeded random chaos table, spec §4), and keeps what it accepted, discarded and
deduplicated, with the request log, for a test to read (spec §6).

It knows nothing of sockets and is thread-safe: the server (fake_segment_server) feeds it
requests from its connection threads while test code reads it from another thread.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Self

from relay.testing.fake_segment_faults import (
    SUCCESS,
    ChaosEntry,
    Fault,
    Response,
    check_chaos,
    error_response,
    fault_response,
)
from relay.testing.fake_segment_rules import (
    Analysis,
    FakeSegmentOptions,
    discard_reason,
    dropped_columns,
    enrich,
    format_timestamp,
    inherit_batch_fields,
)


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
        message.update(origin, flags=flags, dropped_columns=dropped_columns(message, flags))
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
        check_chaos(table)
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
