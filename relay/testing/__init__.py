"""Test helpers shipped with the relay: a local fake of Segment's HTTP Tracking API.

`FakeSegment` serves it on loopback from a background thread and records what it accepted,
discarded and deduplicated; `Fault` and `ChaosEntry` script failures; `FakeSegmentClient` inspects
a fake running in another process. The command line lives in `relay.testing.fake_segment_cli`.
"""

from __future__ import annotations

from relay.testing.fake_segment import FakeSegmentInspector, FakeSegmentState
from relay.testing.fake_segment_client import FakeSegmentClient
from relay.testing.fake_segment_config import (
    Clock,
    FakeSegmentOptions,
    ManualClock,
    RateLimitConfig,
    SourceConfig,
    WallClock,
)
from relay.testing.fake_segment_faults import ChaosEntry, Fault, FaultMatch
from relay.testing.fake_segment_messages import DISCARD_REASONS, snakecase, table_name
from relay.testing.fake_segment_server import FakeSegment, serve_forever

__all__ = [
    "DISCARD_REASONS",
    "ChaosEntry",
    "Clock",
    "FakeSegment",
    "FakeSegmentClient",
    "FakeSegmentInspector",
    "FakeSegmentOptions",
    "FakeSegmentState",
    "Fault",
    "FaultMatch",
    "ManualClock",
    "RateLimitConfig",
    "SourceConfig",
    "WallClock",
    "serve_forever",
    "snakecase",
    "table_name",
]
