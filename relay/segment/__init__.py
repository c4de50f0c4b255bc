"""Segment's side of the relay: one outbox event as a Segment `track` message, and the
`POST /v1/batch` body built from encoded messages. Pure code: no I/O, no clock.

Import what you need from `relay.segment`; the modules behind it, each with one job:

- `rules.py`: the mapping's rules as data, where a rule is changed: who a message is about
  (`userId` or `anonymousId`), how top-level keys are renamed for the warehouses, which arrays
  a message too large loses first.
- `mapping.py`: `to_track_message`, which applies them, checks and trims the message.
- `validation.py`: Segment's limits and what it would discard (`validate_message`).
- `encoding.py`: the bytes: payloads parsed, messages and batches written, timestamps.

docs/mapping.md explains every decision to operators, with a worked example.
"""

from relay.pii import parse_path
from relay.segment.encoding import (
    batch_body_bytes,
    batch_overhead_bytes,
    decode_payload,
    encode_batch,
    format_timestamp,
)
from relay.segment.mapping import MappingOptions, OutboxEvent, TrackMessage, to_track_message
from relay.segment.validation import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_BATCH_BYTES,
    MAX_BATCH_EVENTS,
    MAX_MESSAGE_ID_CHARS,
    SEGMENT_MAX_MESSAGE_BYTES,
    UnsendableEvent,
    validate_message,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MAX_BATCH_BYTES",
    "MAX_BATCH_EVENTS",
    "MAX_MESSAGE_ID_CHARS",
    "SEGMENT_MAX_MESSAGE_BYTES",
    "MappingOptions",
    "OutboxEvent",
    "TrackMessage",
    "UnsendableEvent",
    "batch_body_bytes",
    "batch_overhead_bytes",
    "decode_payload",
    "encode_batch",
    "format_timestamp",
    "parse_path",
    "to_track_message",
    "validate_message",
]
