"""Fault injection for the fake Segment (spec §4), and the responses it sends (spec §7).

A `Fault` says what the client meets instead of (or after) the normal answer; `ChaosEntry` is one
row of the seeded random table. `fault_response` is the answer under a fault; the server carries
out the faults that are no answer (a hang, an RST, a FIN, a partial response) on the socket.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final, Literal

FaultKind = Literal["status", "latency", "hang", "reset", "close", "bad_success"]
AcceptMode = Literal["before_accept", "after_accept"]
DisconnectPhase = Literal["after_headers_read", "after_body_read", "mid_response"]

_DISCONNECT_PHASES: Final = ("after_headers_read", "after_body_read", "mid_response")


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


def check_chaos(table: Sequence[ChaosEntry]) -> None:
    if any(not 0.0 <= entry.probability <= 1.0 for entry in table):
        raise ValueError("a chaos probability is between 0 and 1")
    if sum(entry.probability for entry in table) > 1.0 + 1e-9:
        raise ValueError("the chaos probabilities add up to more than 1")


# What the fake answers (spec §7)


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
