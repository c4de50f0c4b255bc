"""The fake Segment server's configuration (fake-segment spec §0): every option with Segment's
defaults, what it knows of each write key, the optional rate limit, and the injectable clock.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal, Protocol, get_args

from relay.testing.fake_segment_faults import ChaosEntry, ChaosTable

Region = Literal["us", "eu"]
OverCountPolicy = Literal["discard_all", "discard_overflow"]
ErrorBodyStyle = Literal["text", "json"]
UnknownKeyPolicy = Literal["200_discard", "401"]
NumericIdPolicy = Literal["discard", "coerce"]
RateLimitScope = Literal["workspace", "write_key"]
RateLimitUnit = Literal["requests", "events"]
RateLimitMode = Literal["reject", "queue"]


@dataclass(frozen=True)
class SourceConfig:
    """What the fake knows of one write key: its workspace, region, and whether it is enabled."""

    workspace: str = "default"
    region: Region = "us"
    enabled: bool = True

    def __post_init__(self) -> None:
        _check_choice("region", self.region, Region)


@dataclass(frozen=True)
class RateLimitConfig:
    """The optional token bucket (spec §5): `rps` tokens a second up to `burst` (default `rps`),
    per workspace or per write key, counting requests or events, on the fake clock.

    `mode="reject"` answers 429; `mode="queue"` accepts and flags the messages `throttled_queued`.
    `retry_after_seconds` fixes the `Retry-After` value; by default it is the bucket's wait,
    rounded up to whole seconds (at least 1).
    """

    rps: float
    burst: float | None = None
    per: RateLimitScope = "workspace"
    unit: RateLimitUnit = "requests"
    retry_after_seconds: int | None = None
    mode: RateLimitMode = "reject"

    def __post_init__(self) -> None:
        if self.rps <= 0:
            raise ValueError("rate limit rps must be positive")
        if self.burst is None:
            object.__setattr__(self, "burst", max(1.0, float(self.rps)))
        if self.burst is not None and self.burst <= 0:
            raise ValueError("rate limit burst must be positive")
        _check_choice("per", self.per, RateLimitScope)
        _check_choice("unit", self.unit, RateLimitUnit)
        _check_choice("mode", self.mode, RateLimitMode)

    @property
    def capacity(self) -> float:
        return self.rps if self.burst is None else self.burst


class Clock(Protocol):
    """Where the fake reads the time; tests move it with `advance`."""

    def now(self) -> datetime: ...

    def advance(self, seconds: float) -> None: ...


class WallClock:
    """Wall-clock UTC plus an offset that `advance` grows (the default clock)."""

    def __init__(self) -> None:
        self._offset = timedelta(0)
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            offset = self._offset
        return datetime.now(UTC) + offset

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._offset += timedelta(seconds=seconds)


class ManualClock:
    """A clock that only moves when told to, for exact timestamps in tests."""

    def __init__(self, start: datetime | None = None) -> None:
        start = start or datetime(2025, 1, 1, tzinfo=UTC)
        if start.tzinfo is None:
            raise ValueError("ManualClock needs an aware datetime")
        self._now = start.astimezone(UTC)
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += timedelta(seconds=seconds)


@dataclass(frozen=True)
class FakeSegmentOptions:
    """Every setting of the fake (spec §0), with Segment's defaults.

    `write_keys` maps a write key to its `SourceConfig`; when empty, any non-empty key is known.
    `chaos` and `chaos_seed` set the initial chaos table, which `reset()` restores.
    `keep_request_bodies=False` drops the decoded bodies from the request log (benchmarks).
    `seed` drives latency jitter. `clock` defaults to a fresh `WallClock`.
    """

    write_keys: Mapping[str, SourceConfig] = field(default_factory=dict)
    region: Region = "us"
    max_single_bytes: int = 32 << 10
    max_batch_bytes: int = 500 << 10
    max_event_bytes: int = 32 << 10
    max_batch_events: int = 2500
    max_message_id_chars: int = 100
    dedup_window: timedelta = timedelta(hours=24)
    over_count_policy: OverCountPolicy = "discard_all"
    error_body_style: ErrorBodyStyle = "text"
    unknown_key_policy: UnknownKeyPolicy = "200_discard"
    empty_key_status: int = 400
    strict_content_type: bool = False
    numeric_id_policy: NumericIdPolicy = "discard"
    rate_limit: RateLimitConfig | None = None
    chaos: Sequence[ChaosEntry] = ()
    chaos_seed: int = 0
    keep_request_bodies: bool = True
    seed: int = 0
    clock: Clock | None = None

    def __post_init__(self) -> None:
        _check_choice("region", self.region, Region)
        _check_choice("over_count_policy", self.over_count_policy, OverCountPolicy)
        _check_choice("error_body_style", self.error_body_style, ErrorBodyStyle)
        _check_choice("unknown_key_policy", self.unknown_key_policy, UnknownKeyPolicy)
        _check_choice("numeric_id_policy", self.numeric_id_policy, NumericIdPolicy)
        for name in (
            "max_single_bytes",
            "max_batch_bytes",
            "max_event_bytes",
            "max_batch_events",
            "max_message_id_chars",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not 400 <= self.empty_key_status <= 599:
            raise ValueError("empty_key_status must be a 4xx or 5xx code")
        if self.dedup_window < timedelta(0):
            raise ValueError("dedup_window must not be negative")
        # Validates the probabilities now rather than at the first request.
        ChaosTable(self.chaos, self.chaos_seed)


def _check_choice(name: str, value: object, choices: object) -> None:
    allowed = get_args(choices)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, not {value!r}")
