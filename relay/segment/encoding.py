"""The bytes: the stored payload parsed, a message written as compact JSON, timestamps in
Segment's form, and the `POST /v1/batch` body built from encoded messages.

Every message is compact UTF-8 JSON, keys in their order, byte for byte what the standard
library's `json` writes (`separators=(",", ":")`, `ensure_ascii=False`). The drainer hands over
the stored payload as text; `decode_payload` parses it with orjson when that gives exactly what
`json.loads` gives, and such a message is then written with orjson, which writes the same bytes
(tests/unit/test_segment_json.py). The one difference: a number with a fraction or an exponent
(Aircall sends none) is spelt orjson's way (`1e-7` for `1e-07`), the same number.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final

import orjson

from relay.segment.validation import MAX_BATCH_EVENTS, NOT_JSON, UnsendableEvent

# One encoder for every message: `json.dumps` with options builds a new one per call. No check
# for circular references: a message is built from parsed JSON and a few fresh dicts, so it has
# none (and a too deep one raises RecursionError, which to_track_message reports).
_ENCODER: Final[json.JSONEncoder] = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, allow_nan=False, check_circular=False
)

# For decode_payload: every ASCII digit to "0", every other byte to a space, so that a run of 19
# digits anywhere in the text is one substring search.
_DIGITS_AS_ZEROS: Final[bytes] = bytes(
    0x30 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256)
)
_NINETEEN_DIGITS: Final[bytes] = b"0" * 19


def decode_payload(text: str | bytes) -> tuple[Any, bool]:
    """The stored JSON text parsed exactly as `json.loads` parses it, and whether orjson parsed
    it (then what it holds may be written by orjson: see `encode_message`).

    orjson parses faster (docs/performance.md) and gives the same value for every JSON text it
    accepts, but for integers beyond 64 bits, which it silently reads as floats (an Aircall id
    above 2**64 would lose digits). Those have at least 19 digits (every 18-digit integer fits),
    so a text with a run of 19 digits anywhere (in a string too: that only costs speed) is left
    to the standard library, as is every text orjson refuses (`NaN`, `1e400`, a lone surrogate
    escape, nesting past 1,024 levels), which `json.loads` then parses or refuses as before.
    What orjson returns holds no integer beyond 64 bits and no NaN or infinity.

    Raises ValueError (json.JSONDecodeError) or RecursionError like `json.loads`.
    """
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    if _NINETEEN_DIGITS not in raw.translate(_DIGITS_AS_ZEROS):
        try:
            return orjson.loads(raw), True
        except orjson.JSONDecodeError:
            pass
    return json.loads(text), False


def encode_message(message: Mapping[str, Any], fast: bool = False) -> bytes:
    """The message's compact UTF-8 JSON. `fast`: it was built from a payload orjson parsed (no
    integer beyond 64 bits, no NaN or infinity, which orjson would write as `null`), so orjson
    may write it: the same bytes as the standard library but for how floats are spelt. orjson
    refuses what it cannot write exactly (a lone surrogate in a string, nesting past 255 levels,
    an integer beyond 64 bits) with TypeError: the standard library writes those."""
    if fast:
        try:
            return orjson.dumps(message)
        except TypeError:
            pass
    try:
        try:
            return _ENCODER.encode(message).encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate (from a `\ud800` escape Aircall's JSON may carry) has no UTF-8
            # form; JSON's own escapes keep it, and the bytes still parse back to the same text.
            return json.dumps(
                message, separators=(",", ":"), ensure_ascii=True, allow_nan=False
            ).encode("ascii")
    except (TypeError, ValueError) as error:
        raise UnsendableEvent(NOT_JSON, f"the message cannot be encoded as JSON: {error}") from None


def format_timestamp(moment: datetime) -> str:
    """ISO-8601 UTC with milliseconds and `Z`: `2026-03-10T14:07:48.000Z`."""
    if moment.tzinfo is UTC:  # what the outbox gives: no conversion, "+00:00" becomes "Z"
        return moment.isoformat(timespec="milliseconds")[:-6] + "Z"
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"a timezone-aware datetime is required, got {moment!r}")
    utc = moment.astimezone(UTC).replace(tzinfo=None)
    return utc.isoformat(timespec="milliseconds") + "Z"


_BATCH_START: Final[bytes] = b'{"batch":['
_BATCH_SENT_AT: Final[bytes] = b'],"sentAt":"'
_BATCH_END: Final[bytes] = b'"}'
_TIMESTAMP_CHARS: Final[int] = len("2026-03-10T14:07:48.000Z")


def encode_batch(encoded_messages: Sequence[bytes], sent_at: datetime) -> bytes:
    """`{"batch":[...],"sentAt":"..."}` with the encoded messages spliced in byte for byte.

    ValueError for an empty batch or one over MAX_BATCH_EVENTS: Segment answers 200 to both and
    drops the events, so sending either would be a silent loss.
    """
    if not encoded_messages:
        raise ValueError("an empty batch is discarded by Segment (empty_batch)")
    if len(encoded_messages) > MAX_BATCH_EVENTS:
        raise ValueError(
            f"{len(encoded_messages):,} messages in one batch; Segment drops batches over "
            f"{MAX_BATCH_EVENTS:,}"
        )
    sent_at_text = format_timestamp(sent_at).encode("ascii")
    return b"".join(
        (_BATCH_START, b",".join(encoded_messages), _BATCH_SENT_AT, sent_at_text, _BATCH_END)
    )


def batch_overhead_bytes() -> int:
    """Bytes of the batch envelope around the messages, `sentAt` included.

    A batch of n messages is exactly `batch_overhead_bytes() + sum(sizes) + (n - 1)` bytes: one
    comma between messages (batch_body_bytes computes it).
    """
    return len(_BATCH_START) + len(_BATCH_SENT_AT) + _TIMESTAMP_CHARS + len(_BATCH_END)


def batch_body_bytes(message_sizes: Sequence[int]) -> int:
    """The exact size of encode_batch's body for messages of these encoded sizes."""
    if not message_sizes:
        return batch_overhead_bytes()
    return batch_overhead_bytes() + sum(message_sizes) + len(message_sizes) - 1
