"""Fault injection for the fake Segment server (fake-segment spec §4).

Owns what a fault does (`Fault`), which requests a scripted fault applies to (`FaultMatch` and the
FIFO `FaultQueue`), and the seeded, weighted random chaos table (`ChaosEntry`, `ChaosTable`). This
module only chooses faults; `fake_segment_server` carries them out on the socket.

When a fault is chosen: an `on_accept` reset or close is matched against TCP connections as they
are accepted, before a byte is read, so it cannot filter on path or write key and it only fires when
the client opens a new connection. Every other fault is chosen once per request, as soon as the
request line and headers are read; a `write_key` filter also sees the body's keys, which makes the
server read the body before choosing.
"""

from __future__ import annotations

import fnmatch
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

FaultKind = Literal["status", "latency", "hang", "reset", "close", "bad_success", "slow_body"]
AcceptMode = Literal["before_accept", "after_accept"]
# When the server picks the fault: at TCP accept, after the request head, or after the body.
FaultStage = Literal["connection", "head", "request"]

FAULT_KINDS: Final[frozenset[str]] = frozenset(get_args(FaultKind))
ACCEPT_MODES: Final[frozenset[str]] = frozenset(get_args(AcceptMode))
DISCONNECT_PHASES: Final[tuple[str, ...]] = (
    "on_accept",
    "after_headers_read",
    "after_body_read",
    "mid_response",
)
LATENCY_PHASES: Final[tuple[str, ...]] = ("before_read", "before_response")

_MATCH_FIELDS: Final[frozenset[str]] = frozenset({"path", "write_key", "nth", "times"})


def _normalise_path_pattern(pattern: str) -> str:
    # Patterns are compared with the normalised request path (lower case, no trailing slash).
    lowered = pattern.lower()
    if len(lowered) > 1 and lowered.endswith("/"):
        lowered = lowered[:-1]
    return lowered


@dataclass(frozen=True)
class Fault:
    """One fault: its kind, whether it strikes before or after the request is accepted, and the
    parameters of that kind. Build one with the class methods (`Fault.status(500)`, ...).

    `before_accept` (the default) means nothing is recorded as accepted, except for `latency`, which
    only delays the normal processing (and drops the request if the client left meanwhile).
    `after_accept` processes and records the messages first, then the client sees the fault.
    """

    kind: FaultKind
    accept: AcceptMode = "before_accept"
    code: int | None = None
    headers: tuple[tuple[str, str], ...] = ()
    body: str | None = None
    content_type: str | None = None
    ms: float | None = None
    jitter_ms: float = 0.0
    phase: str | None = None
    bytes_per_s: float | None = None
    partial_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {sorted(FAULT_KINDS)}")
        if self.accept not in ACCEPT_MODES:
            raise ValueError(f"accept must be one of {sorted(ACCEPT_MODES)}, not {self.accept!r}")
        if self.jitter_ms < 0:
            raise ValueError("jitter_ms must not be negative")
        validate = {
            "status": self._validate_status,
            "bad_success": self._validate_bad_success,
            "latency": self._validate_latency,
            "hang": self._validate_hang,
            "reset": self._validate_disconnect,
            "close": self._validate_disconnect,
            "slow_body": self._validate_slow_body,
        }[self.kind]
        validate()

    def _validate_status(self) -> None:
        if self.code is None or not 200 <= self.code <= 599:
            raise ValueError("a status fault needs a code from 200 to 599")

    def _validate_bad_success(self) -> None:
        if self.code is None:
            object.__setattr__(self, "code", 200)
        if self.code is None or not 200 <= self.code <= 299:
            raise ValueError("a bad_success fault answers a 2xx code")
        if self.body is None:
            object.__setattr__(self, "body", "")

    def _validate_latency(self) -> None:
        if self.ms is None or self.ms < 0:
            raise ValueError("a latency fault needs ms >= 0")
        if self.phase is None:
            object.__setattr__(self, "phase", "before_response")
        if self.phase not in LATENCY_PHASES:
            raise ValueError(f"latency phase must be one of {LATENCY_PHASES}, not {self.phase!r}")
        if self.accept == "after_accept" and self.phase == "before_read":
            raise ValueError("after_accept latency waits before the response: use before_response")

    def _validate_hang(self) -> None:
        if self.ms is not None and self.ms < 0:
            raise ValueError("hang ms must be >= 0, or None to hang until the client leaves")

    def _validate_disconnect(self) -> None:
        if self.phase is None:
            object.__setattr__(self, "phase", "after_body_read")
        if self.phase not in DISCONNECT_PHASES:
            raise ValueError(
                f"{self.kind} phase must be one of {DISCONNECT_PHASES}, not {self.phase!r}"
            )
        if self.accept == "after_accept" and self.phase not in ("after_body_read", "mid_response"):
            raise ValueError(
                f"an after_accept {self.kind} needs the whole request: phase after_body_read "
                "or mid_response"
            )
        if self.partial_bytes is not None and self.partial_bytes < 1:
            raise ValueError("partial_bytes must be at least 1")

    def _validate_slow_body(self) -> None:
        if self.bytes_per_s is None or self.bytes_per_s <= 0:
            raise ValueError("a slow_body fault needs bytes_per_s > 0")

    # Constructors, one per kind.

    @classmethod
    def status(
        cls,
        code: int,
        *,
        headers: Mapping[str, str] | None = None,
        body: str | None = None,
        content_type: str | None = None,
        accept: AcceptMode = "before_accept",
    ) -> Fault:
        """Answer `code` with these headers and body (default body: the error catalogue's)."""
        return cls(
            "status",
            accept=accept,
            code=code,
            headers=tuple((headers or {}).items()),
            body=body,
            content_type=content_type,
        )

    @classmethod
    def rate_limited(
        cls, retry_after_seconds: int = 1, *, accept: AcceptMode = "before_accept"
    ) -> Fault:
        """A 429 as Segment documents it: `Retry-After` and `X-RateLimit-Reset` in seconds."""
        seconds = str(retry_after_seconds)
        return cls.status(
            429,
            headers={"Retry-After": seconds, "X-RateLimit-Reset": seconds},
            accept=accept,
        )

    @classmethod
    def latency(
        cls,
        ms: float,
        *,
        jitter_ms: float = 0.0,
        phase: str = "before_response",
        accept: AcceptMode = "before_accept",
    ) -> Fault:
        """Wait `ms` (plus up to `jitter_ms`) before reading the body or before answering."""
        return cls("latency", accept=accept, ms=ms, jitter_ms=jitter_ms, phase=phase)

    @classmethod
    def hang(cls, ms: float | None = None, *, accept: AcceptMode = "before_accept") -> Fault:
        """Read the request, answer nothing; close after `ms`, or when the client leaves."""
        return cls("hang", accept=accept, ms=ms)

    @classmethod
    def reset(
        cls,
        phase: str = "after_body_read",
        *,
        partial_bytes: int | None = None,
        accept: AcceptMode = "before_accept",
    ) -> Fault:
        """Abort the connection with a TCP RST (SO_LINGER 0) at `phase`."""
        return cls("reset", accept=accept, phase=phase, partial_bytes=partial_bytes)

    @classmethod
    def close(
        cls,
        phase: str = "after_body_read",
        *,
        partial_bytes: int | None = None,
        accept: AcceptMode = "before_accept",
    ) -> Fault:
        """Close the connection gracefully (FIN) at `phase`, without a (complete) response."""
        return cls("close", accept=accept, phase=phase, partial_bytes=partial_bytes)

    @classmethod
    def bad_success(
        cls,
        body: str = "",
        *,
        code: int = 200,
        content_type: str = "application/json",
        accept: AcceptMode = "before_accept",
    ) -> Fault:
        """A 2xx whose body is not `{"success": true}` (or a 2xx other than 200)."""
        return cls("bad_success", accept=accept, code=code, body=body, content_type=content_type)

    @classmethod
    def slow_body(cls, bytes_per_s: float, *, accept: AcceptMode = "before_accept") -> Fault:
        """Trickle the response body. before_accept trickles `{"success": true}` and records
        nothing; after_accept processes the request and trickles its real answer."""
        return cls("slow_body", accept=accept, bytes_per_s=bytes_per_s)

    @property
    def stage(self) -> FaultStage:
        """When the server has to pick this fault to carry it out."""
        if self.kind in ("reset", "close") and self.phase == "on_accept":
            return "connection"
        if (self.kind in ("reset", "close") and self.phase == "after_headers_read") or (
            self.kind == "latency" and self.phase == "before_read"
        ):
            return "head"
        return "request"

    def to_json(self) -> dict[str, Any]:
        """The fault as a flat JSON object, the format `from_json` and `/__fake/inject` read."""
        data: dict[str, Any] = {"kind": self.kind, "accept": self.accept}
        optional: dict[str, Any] = {
            "code": self.code,
            "body": self.body,
            "content_type": self.content_type,
            "ms": self.ms,
            "phase": self.phase,
            "bytes_per_s": self.bytes_per_s,
            "partial_bytes": self.partial_bytes,
        }
        data.update({name: value for name, value in optional.items() if value is not None})
        if self.headers:
            data["headers"] = dict(self.headers)
        if self.jitter_ms:
            data["jitter_ms"] = self.jitter_ms
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Fault:
        """Read a fault from JSON; unknown fields are an error, so typos do not pass silently."""
        known = {
            "kind",
            "accept",
            "code",
            "headers",
            "body",
            "content_type",
            "ms",
            "jitter_ms",
            "phase",
            "bytes_per_s",
            "partial_bytes",
        }
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        if "kind" not in data:
            raise ValueError("a fault needs a 'kind'")
        headers = data.get("headers") or {}
        if not isinstance(headers, Mapping):
            raise ValueError("fault headers must be an object of name to value")
        return cls(
            kind=data["kind"],
            accept=data.get("accept", "before_accept"),
            code=_optional_int(data, "code"),
            headers=tuple((str(name), str(value)) for name, value in headers.items()),
            body=_optional_str(data, "body"),
            content_type=_optional_str(data, "content_type"),
            ms=_optional_float(data, "ms"),
            jitter_ms=_optional_float(data, "jitter_ms") or 0.0,
            phase=_optional_str(data, "phase"),
            bytes_per_s=_optional_float(data, "bytes_per_s"),
            partial_bytes=_optional_int(data, "partial_bytes"),
        )


def _optional_int(data: Mapping[str, Any], name: str) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer")
    return value


def _optional_float(data: Mapping[str, Any], name: str) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number")
    return float(value)


def _optional_str(data: Mapping[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string")
    return value


@dataclass(frozen=True)
class FaultMatch:
    """Which requests a scripted fault applies to.

    `path` is an exact path or a glob (`/v1/*`), compared case-insensitively with the trailing
    slash stripped. `write_key` must be among the request's keys (Basic auth, body, messages).
    The fault skips the first `nth - 1` matching requests, then applies to `times` of them
    (`None`: every one from then on, until `reset()`).
    """

    path: str | None = None
    write_key: str | None = None
    nth: int = 1
    times: int | None = 1

    def __post_init__(self) -> None:
        if self.nth < 1:
            raise ValueError("nth counts from 1")
        if self.times is not None and self.times < 1:
            raise ValueError("times must be at least 1, or None for every matching request")
        if self.path is not None:
            object.__setattr__(self, "path", _normalise_path_pattern(self.path))

    def matches(self, path: str, write_keys: Sequence[str]) -> bool:
        if self.path is not None and not fnmatch.fnmatchcase(path, self.path):
            return False
        return self.write_key is None or self.write_key in write_keys

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "write_key": self.write_key,
            "nth": self.nth,
            "times": self.times,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FaultMatch:
        nth = _optional_int(data, "nth")
        times: int | None = 1
        if "times" in data:
            times = _optional_int(data, "times")
        return cls(
            path=_optional_str(data, "path"),
            write_key=_optional_str(data, "write_key"),
            nth=1 if nth is None else nth,
            times=times,
        )


def scripted_fault_from_json(data: Mapping[str, Any]) -> tuple[Fault, FaultMatch]:
    """Split the flat JSON of `/__fake/inject` into the fault and its match filters."""
    fault_fields = {name: value for name, value in data.items() if name not in _MATCH_FIELDS}
    match_fields = {name: value for name, value in data.items() if name in _MATCH_FIELDS}
    return Fault.from_json(fault_fields), FaultMatch.from_json(match_fields)


@dataclass
class _ScriptedEntry:
    fault: Fault
    match: FaultMatch
    seen: int = 0
    applied: int = 0


class FaultQueue:
    """The scripted faults, in injection order. Not thread-safe: the state's lock guards it."""

    def __init__(self) -> None:
        self._entries: list[_ScriptedEntry] = []

    def __len__(self) -> int:
        return len(self._entries)

    def push(self, fault: Fault, match: FaultMatch) -> None:
        if fault.stage == "connection" and (match.path is not None or match.write_key is not None):
            raise ValueError(
                "an on_accept fault strikes before the request is read: it cannot filter on "
                "path or write_key"
            )
        self._entries.append(_ScriptedEntry(fault, match))

    def clear(self) -> None:
        self._entries.clear()

    def needs_write_keys(self) -> bool:
        """Whether choosing a request fault needs the request's write keys (so its body)."""
        return any(
            entry.match.write_key is not None and entry.fault.stage != "connection"
            for entry in self._entries
        )

    def take_for_connection(self) -> Fault | None:
        return self._take(connection=True, path="", write_keys=())

    def take_for_request(self, path: str, write_keys: Sequence[str]) -> Fault | None:
        return self._take(connection=False, path=path, write_keys=write_keys)

    def _take(self, *, connection: bool, path: str, write_keys: Sequence[str]) -> Fault | None:
        # Every matching entry counts the event, so `nth` means "the n-th matching request since
        # this fault was injected" whatever the entries ahead of it did; the first entry (FIFO)
        # whose count has reached its `nth` applies.
        chosen: _ScriptedEntry | None = None
        for entry in self._entries:
            if (entry.fault.stage == "connection") != connection:
                continue
            if not entry.match.matches(path, write_keys):
                continue
            entry.seen += 1
            if chosen is None and entry.seen >= entry.match.nth:
                chosen = entry
        if chosen is None:
            return None
        chosen.applied += 1
        if chosen.match.times is not None and chosen.applied >= chosen.match.times:
            self._entries.remove(chosen)
        return chosen.fault

    def pending(self) -> list[dict[str, Any]]:
        """The queued faults with their filters and counters, for inspection."""
        return [
            {
                **entry.fault.to_json(),
                **entry.match.to_json(),
                "seen": entry.seen,
                "applied": entry.applied,
            }
            for entry in self._entries
        ]


@dataclass(frozen=True)
class ChaosEntry:
    """One row of the chaos table: `fault` strikes a matching request with this probability."""

    fault: Fault
    probability: float
    path: str | None = None
    write_key: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError("a chaos probability is between 0 and 1")
        if self.fault.stage == "connection":
            raise ValueError("chaos picks faults per request: an on_accept fault cannot be used")
        if self.path is not None:
            object.__setattr__(self, "path", _normalise_path_pattern(self.path))

    def matches(self, path: str, write_keys: Sequence[str]) -> bool:
        if self.path is not None and not fnmatch.fnmatchcase(path, self.path):
            return False
        return self.write_key is None or self.write_key in write_keys

    def to_json(self) -> dict[str, Any]:
        return {
            "probability": self.probability,
            "path": self.path,
            "write_key": self.write_key,
            "fault": self.fault.to_json(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ChaosEntry:
        unknown = set(data) - {"probability", "path", "write_key", "fault"}
        if unknown:
            raise ValueError(f"unknown chaos entry fields: {sorted(unknown)}")
        fault = data.get("fault")
        if not isinstance(fault, Mapping):
            raise ValueError("a chaos entry needs a 'fault' object")
        probability = _optional_float(data, "probability")
        if probability is None:
            raise ValueError("a chaos entry needs a 'probability'")
        return cls(
            fault=Fault.from_json(fault),
            probability=probability,
            path=_optional_str(data, "path"),
            write_key=_optional_str(data, "write_key"),
        )


class ChaosTable:
    """Weighted random faults. Each request draws one number from a generator seeded with `seed`,
    whether or not an entry matches, so a given request sequence always meets the same faults."""

    def __init__(self, entries: Sequence[ChaosEntry], seed: int) -> None:
        total = sum(entry.probability for entry in entries)
        if total > 1.0 + 1e-9:
            raise ValueError(f"chaos probabilities add up to {total}, more than 1")
        self.entries: tuple[ChaosEntry, ...] = tuple(entries)
        self.seed = seed
        self._random = random.Random(seed)

    def draw(self, path: str, write_keys: Sequence[str]) -> Fault | None:
        if not self.entries:
            return None
        roll = self._random.random()
        cumulative = 0.0
        for entry in self.entries:
            if not entry.matches(path, write_keys):
                continue
            cumulative += entry.probability
            if roll < cumulative:
                return entry.fault
        return None

    def to_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "table": [entry.to_json() for entry in self.entries]}
