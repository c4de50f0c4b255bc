"""Test helpers shipped with the relay: a local fake of Segment's HTTP Tracking API, a fake of
Aircall's Public API (`fake_aircall`), and the sample webhooks (`sample_payloads`).

`FakeSegment` serves the fake on loopback from background threads and records what it accepted,
discarded and deduplicated; `Fault` and `ChaosEntry` script failures. Only the commands that serve
a fake (`aircall-relay fake-segment`, `demo`) and the tests import this package.
"""

from __future__ import annotations

from relay.testing.fake_segment import FakeSegmentState
from relay.testing.fake_segment_faults import ChaosEntry, Fault
from relay.testing.fake_segment_rules import FakeSegmentOptions, SourceConfig
from relay.testing.fake_segment_server import FakeSegment

__all__ = [
    "ChaosEntry",
    "FakeSegment",
    "FakeSegmentOptions",
    "FakeSegmentState",
    "Fault",
    "SourceConfig",
]
