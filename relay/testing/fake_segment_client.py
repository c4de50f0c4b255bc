"""`FakeSegmentClient`: the fake Segment server's inspection and control API, over HTTP, for a
test whose fake runs in another process (for instance `aircall-relay fake-segment`).

It offers the same methods as the in-process `FakeSegment` (`FakeSegmentInspector`), through the
`/__fake/...` endpoints of `fake_segment_control`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Self, cast

import httpx

from relay.testing.fake_segment import (
    FakeSegmentInspector,
    coerce_chaos_entries,
    coerce_fault,
)
from relay.testing.fake_segment_faults import ChaosEntry, Fault, FaultMatch
from relay.testing.fake_segment_messages import parse_timestamp


class FakeSegmentClient(FakeSegmentInspector):
    """Inspect and steer a fake Segment server at `base_url` (`http://127.0.0.1:PORT`).

    A control request the server refuses raises `ValueError` with the server's explanation.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _checked(self, response: httpx.Response) -> Any:
        if response.status_code == 400:
            raise ValueError(response.json().get("error", response.text))
        response.raise_for_status()
        return response.json()

    def _get(self, endpoint: str, parameters: Mapping[str, str] | None = None) -> Any:
        return self._checked(self._http.get(f"/__fake/{endpoint}", params=dict(parameters or {})))

    def _post(self, endpoint: str, payload: Mapping[str, Any] | None = None) -> None:
        self._checked(self._http.post(f"/__fake/{endpoint}", json=dict(payload or {})))

    def requests(self, *, include_bodies: bool = True) -> list[dict[str, Any]]:
        return cast(
            list[dict[str, Any]], self._get("requests", {"bodies": "1" if include_bodies else "0"})
        )

    def accepted(self) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self._get("accepted"))

    def discarded(self) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self._get("discarded"))

    def duplicates(self) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self._get("duplicates"))

    def events(
        self, name: str | None = None, *, user_id: str | None = None
    ) -> list[dict[str, Any]]:
        parameters = {
            key: value for key, value in (("name", name), ("user_id", user_id)) if value is not None
        }
        return cast(list[dict[str, Any]], self._get("events", parameters))

    def duplicate_count(self, message_id: str) -> int:
        return int(self._get("duplicate_count", {"message_id": message_id})["count"])

    def stats(self) -> dict[str, int]:
        return cast(dict[str, int], self._get("stats"))

    def now(self) -> datetime:
        parsed = parse_timestamp(self._get("now")["now"])
        if parsed is None:
            raise ValueError("the fake answered an unreadable time")
        return parsed[0]

    def pending_faults(self) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self._get("faults"))

    def chaos(self) -> dict[str, Any]:
        return cast(dict[str, Any], self._get("chaos"))

    def reset(self) -> None:
        self._post("reset")

    def clear_dedup(self) -> None:
        self._post("clear_dedup")

    def advance(self, seconds: float) -> None:
        self._post("advance", {"seconds": seconds})

    def inject(
        self,
        fault: Fault | Mapping[str, Any],
        *,
        path: str | None = None,
        write_key: str | None = None,
        nth: int = 1,
        times: int | None = 1,
    ) -> None:
        # Validated here too, so a bad fault fails in the test's own traceback.
        match = FaultMatch(path=path, write_key=write_key, nth=nth, times=times)
        self._post("inject", {**coerce_fault(fault).to_json(), **match.to_json()})

    def set_chaos(self, table: Sequence[ChaosEntry | Mapping[str, Any]], seed: int = 0) -> None:
        entries = coerce_chaos_entries(table)
        self._post("chaos", {"table": [entry.to_json() for entry in entries], "seed": seed})
