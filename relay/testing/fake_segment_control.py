"""The `/__fake/...` HTTP mirror of the fake's inspection and control API, for a sender or a test
in another process (`fake_segment_client.FakeSegmentClient` is its client).

Reads are `GET` and answer JSON; changes are `POST` with a JSON body (or none) and answer
`{"ok": true}`. A bad request answers 400 `{"error": "..."}`. Lists take `offset` and `limit`
query parameters, so a client can fetch only what is new.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, Final

from relay.testing.fake_segment import FakeSegmentState
from relay.testing.fake_segment_faults import scripted_fault_from_json
from relay.testing.fake_segment_messages import format_timestamp
from relay.testing.fake_segment_requests import CONTROL_PREFIX, HttpResponse, Route


class _BadControlRequest(ValueError):
    pass


def _json_response(status: int, payload: object) -> HttpResponse:
    body = json.dumps(payload, separators=(",", ":"), default=str).encode()
    return HttpResponse(status, (("Content-Type", "application/json"),), body)


def _ok() -> HttpResponse:
    return _json_response(200, {"ok": True})


def _int_parameter(query: Mapping[str, str], name: str) -> int | None:
    value = query.get(name)
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except ValueError:
        raise _BadControlRequest(f"{name} must be an integer") from None
    if number < 0:
        raise _BadControlRequest(f"{name} must not be negative")
    return number


def _page(items: list[dict[str, Any]], query: Mapping[str, str]) -> list[dict[str, Any]]:
    offset = _int_parameter(query, "offset") or 0
    limit = _int_parameter(query, "limit")
    return items[offset:] if limit is None else items[offset : offset + limit]


def _json_body(body: bytes) -> dict[str, Any]:
    if not body.strip():
        return {}
    try:
        payload = json.loads(body)
    except ValueError:
        raise _BadControlRequest("the body is not JSON") from None
    if not isinstance(payload, dict):
        raise _BadControlRequest("the body must be a JSON object")
    return payload


def _get_requests(state: FakeSegmentState, query: Mapping[str, str]) -> object:
    include_bodies = query.get("bodies", "1") not in ("0", "false", "no")
    return _page(state.requests(include_bodies=include_bodies), query)


def _get_events(state: FakeSegmentState, query: Mapping[str, str]) -> object:
    return _page(state.events(query.get("name"), user_id=query.get("user_id")), query)


def _get_duplicate_count(state: FakeSegmentState, query: Mapping[str, str]) -> object:
    message_id = query.get("message_id")
    if message_id is None:
        raise _BadControlRequest("message_id is required")
    return {"message_id": message_id, "count": state.duplicate_count(message_id)}


_READS: Final[Mapping[str, Callable[[FakeSegmentState, Mapping[str, str]], object]]] = {
    "requests": _get_requests,
    "accepted": lambda state, query: _page(state.accepted(), query),
    "discarded": lambda state, query: _page(state.discarded(), query),
    "duplicates": lambda state, query: _page(state.duplicates(), query),
    "events": _get_events,
    "duplicate_count": _get_duplicate_count,
    "stats": lambda state, query: state.stats(),
    "now": lambda state, query: {"now": format_timestamp(state.now())},
    "faults": lambda state, query: state.pending_faults(),
    "chaos": lambda state, query: state.chaos(),
}


def _post_advance(state: FakeSegmentState, payload: dict[str, Any]) -> None:
    seconds = payload.get("seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise _BadControlRequest("advance needs a number of 'seconds'")
    state.advance(float(seconds))


def _post_inject(state: FakeSegmentState, payload: dict[str, Any]) -> None:
    fault, match = scripted_fault_from_json(payload)
    state.inject(
        fault, path=match.path, write_key=match.write_key, nth=match.nth, times=match.times
    )


def _post_chaos(state: FakeSegmentState, payload: dict[str, Any]) -> None:
    table = payload.get("table", [])
    seed = payload.get("seed", 0)
    if not isinstance(table, list) or not all(isinstance(entry, dict) for entry in table):
        raise _BadControlRequest("chaos needs a 'table' list of entries")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise _BadControlRequest("the chaos seed must be an integer")
    state.set_chaos(table, seed)


_WRITES: Final[Mapping[str, Callable[[FakeSegmentState, dict[str, Any]], None]]] = {
    "reset": lambda state, payload: state.reset(),
    "clear_dedup": lambda state, payload: state.clear_dedup(),
    "advance": _post_advance,
    "inject": _post_inject,
    "chaos": _post_chaos,
}


def control_response(
    state: FakeSegmentState, method: str, route: Route, body: bytes
) -> HttpResponse:
    """Answer one `/__fake/...` request."""
    name = route.path[len(CONTROL_PREFIX) :]
    try:
        if method == "GET" and name in _READS:
            return _json_response(200, _READS[name](state, route.query))
        if method == "POST" and name in _WRITES:
            _WRITES[name](state, _json_body(body))
            return _ok()
    except ValueError as error:
        # Includes the faults module's validation errors: they describe the bad field.
        return _json_response(400, {"error": str(error)})
    if name in _READS or name in _WRITES:
        return _json_response(405, {"error": f"{method} is not allowed on {route.path}"})
    return _json_response(404, {"error": f"no control endpoint {route.path}"})


def health_response() -> HttpResponse:
    """`GET /internal/health`: 200 with an empty body, as Segment's own fake answers."""
    return HttpResponse(200, (), b"")
