"""The sample webhooks shipped with the relay (`relay/testing/samples/`): one for each of the 26
events of Segment's Aircall catalogue, as Aircall documents them, the sample call's twelve
among them. Their `token` is a placeholder (`REPLACED-AT-RUN-TIME`), replaced by the caller's
token when one is given.
The demo and the relay's own tests read them from here, so that nothing outside the package
is needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

SAMPLES_DIRECTORY: Final[Path] = Path(__file__).resolve().parent / "samples"


def sample_files() -> list[Path]:
    """The sample payload files, sorted by event name."""
    return sorted(SAMPLES_DIRECTORY.glob("*.json"))


def sample_events() -> list[str]:
    """The events that have a sample, sorted."""
    return [path.stem for path in sample_files()]


def sample_payload(event: str, token: str | None = None) -> dict[str, Any]:
    """A fresh copy of `event`'s sample webhook, its `token` set to `token` when given."""
    path = SAMPLES_DIRECTORY / f"{event}.json"
    if not path.is_file():
        raise LookupError(f"no sample payload for {event!r} in {SAMPLES_DIRECTORY}")
    body: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if token is not None:
        body["token"] = token
    return body
