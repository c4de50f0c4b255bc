"""The receiver: a Quart app that writes each Aircall webhook to the outbox before answering 200.

The contract (PRODUCT §3) is checked in this order, so that each answer says the first thing that
is wrong: content type (415), size (413), JSON object (400), token (401), envelope fields (400),
then the write (200 after the commit, 503 when the database cannot take it). A request refused at
any step stores nothing. The token is checked before the envelope so that callers without a valid
token learn nothing about what a valid body looks like.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry
from quart import Quart, Response

from relay import aircall
from relay.db.gauges import OutboxGauges, read_outbox_gauges
from relay.db.store import IncomingEvent, OutboxStore, StoredEvent, row_specific_error
from relay.logs import get_logger
from relay.receiver.batcher import BatcherUnavailable, CommitBatcher
from relay.receiver.metrics import ReceiverMetrics
from relay.receiver.webhook import (
    Answer,
    BodyTooLarge,
    ReceiverRoutes,
    WebhookRequest,
    wait_unless_disconnected,
)
from relay.settings import Settings
from relay.settings.tokens import TokenTable

RETRY_AFTER_SECONDS = "5"

log = get_logger("relay.receiver")


@dataclass
class ReceiverState:
    """What the routes share: built in `create_app`, started and stopped with the server."""

    settings: Settings
    store: OutboxStore
    tokens: TokenTable
    batcher: CommitBatcher[IncomingEvent, StoredEvent]
    metrics: ReceiverMetrics
    head_revision: str
    clock: Callable[[], datetime]
    # The port `/metrics` is answered on, and only there (None: nowhere). From the settings;
    # `serve` sets the port it took when they asked for any free one (0).
    metrics_port: int | None = None


def _json_text(value: dict[str, Any]) -> str:
    return aircall.canonical_json(value)


def create_app(
    settings: Settings,
    store: OutboxStore,
    head_revision: str,
    clock: Callable[[], datetime] | None = None,
    on_shutdown: Callable[[], Any] | None = None,
    extra_metrics: Sequence[CollectorRegistry] = (),
) -> Quart:
    """The receiver app; `/metrics` also renders `extra_metrics` (`run`: the drainer's)."""
    app = Quart("relay.receiver")
    # The webhook route enforces the limit itself (`WebhookRequest.body`); Quart's other routes
    # take no body, and this keeps them from reading a large one.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    receiver_metrics = ReceiverMetrics()
    state = ReceiverState(
        settings=settings,
        store=store,
        tokens=TokenTable(settings.aircall_tokens),
        batcher=CommitBatcher(
            store.insert_events,
            on_batch=receiver_metrics.observe_commit,
            wait_seconds=commit_wait_seconds(settings),
            key=_event_identity,
            row_specific=row_specific_error,
            probe=store.probe_write,
        ),
        metrics=receiver_metrics,
        head_revision=head_revision,
        clock=clock or (lambda: datetime.now(UTC)),
        metrics_port=settings.receiver_metrics_port or None,
    )
    for registry in extra_metrics:
        receiver_metrics.include(registry)
    app.extensions["relay"] = state

    @app.before_serving
    async def start() -> None:
        state.batcher.start()
        # Everything loaded so far (modules, app, engine) lives as long as the process: move it
        # out of the collector's reach, so that a full collection scans only what requests
        # allocate. Without this, each full collection walks every object of Quart, Hypercorn
        # and SQLAlchemy (~100k) and stalls every request in flight for tens of milliseconds.
        gc.collect()
        gc.freeze()

    @app.after_serving
    async def stop() -> None:
        await state.batcher.close()
        await state.store.close_writer()
        if on_shutdown is not None:
            await on_shutdown()

    async def webhook(request: WebhookRequest) -> Answer:
        started = time.perf_counter()
        answer, fields = await handle_webhook(state, request)
        elapsed_ms = round((time.perf_counter() - started) * 1000, 2)
        outcome = fields.pop("outcome")
        state.metrics.observe(
            event=fields.get("aircall_event"), outcome=outcome, seconds=elapsed_ms / 1000
        )
        level = "info" if answer.status < 500 else "error"
        getattr(log, level)(
            "webhook", outcome=outcome, status=answer.status, ms=elapsed_ms, **fields
        )
        return answer

    # The webhook route and the rule of the metrics port, in front of Quart's routes
    # (relay/receiver/webhook.py). Quart's own `__call__` calls `asgi_app`.
    app.asgi_app = ReceiverRoutes(  # type: ignore[method-assign]
        app.asgi_app, settings.webhook_path, webhook, lambda: state.metrics_port
    )

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(_json_text({"status": "ok"}), content_type="application/json")

    @app.get("/readyz")
    async def readyz() -> Response:
        schema = await state.store.schema_state()
        # After the schema's read, so that a failing write check (which closes the pooled
        # connections on SQLite, see `OutboxStore`) also closes the one just used.
        unwritable = await state.batcher.writable()
        ready = schema.reachable and schema.revision == state.head_revision and not unwritable
        body = {
            "status": "ready" if ready else "not ready",
            "database": "reachable" if schema.reachable else f"unreachable ({schema.error})",
            "schema_revision": schema.revision,
            "expected_revision": state.head_revision,
            "writes": "ok" if unwritable is None else f"failing ({unwritable})",
        }
        return Response(
            _json_text(body), status=200 if ready else 503, content_type="application/json"
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        await _read_outbox_gauges(state)
        text, content_type = state.metrics.render()
        return Response(text, content_type=content_type)

    return app


async def _read_outbox_gauges(state: ReceiverState) -> None:
    """Refresh the outbox gauges from the database; a failure shows as `relay_outbox_up 0`."""
    now = state.clock()
    cutoff = now - timedelta(seconds=state.settings.call_ended_timeout_seconds)
    try:
        gauges: OutboxGauges | None = await read_outbox_gauges(state.store.engine, cutoff)
    except Exception as error:  # a scrape never fails because the database does
        log.warning("outbox_gauges_failed", error=f"{type(error).__name__}: {error}")
        gauges = None
    state.metrics.outbox.update(gauges, now)


async def handle_webhook(
    state: ReceiverState, request: WebhookRequest
) -> tuple[Answer, dict[str, Any]]:
    """Answer one webhook; also return the fields of its log line (never the body or token)."""
    if request.mimetype != "application/json":
        shown = request.mimetype or "none"
        return Answer.error(
            415, "unsupported_media_type", f"expected application/json, got {shown}"
        ), {"outcome": "unsupported_media_type"}
    limit = state.settings.max_body_bytes
    length = request.content_length
    if length is not None and length > limit:
        return _too_large(length, limit)
    try:
        raw = await request.body(limit)
    except BodyTooLarge:
        return _too_large(None, limit)
    try:
        body = aircall.parse_body(raw)
    except aircall.BodyError as error:
        return Answer.error(400, "invalid_body", str(error)), {"outcome": "invalid_body"}

    token = aircall.take_token(body)
    source = state.tokens.label_for(token)
    if source is None:
        detail = "token missing" if token is None else "token unknown"
        return Answer.error(401, "unauthorized", detail), {
            "outcome": "unauthorized",
            "detail": detail,
        }

    try:
        envelope = aircall.validate_envelope(body, parsed=True)
    except aircall.EnvelopeError as error:
        return Answer.error(400, "invalid_envelope", str(error)), {
            "outcome": "invalid_envelope",
            "source": source,
            "detail": str(error),
        }

    forward = state.settings.forwards(envelope.event)
    dedup_key = envelope.dedup_key
    resource_id = envelope.resource_id  # a property that reads `data.id` each time
    incoming = IncomingEvent(
        dedup_key=dedup_key,
        message_id=aircall.message_id_for(dedup_key),
        source=source,
        resource=envelope.resource,
        event=envelope.event,
        resource_id=resource_id,
        ordering_key=aircall.ordering_key(envelope.resource, resource_id, dedup_key),
        occurred_at=envelope.occurred_at,
        received_at=None,  # stamped by the write, on the database's clock
        payload=envelope.payload,
        forward=forward,
        skip_reason=None if forward else aircall.skip_reason(envelope.event),
    )
    fields: dict[str, Any] = {
        "aircall_event": envelope.event,
        "ordering_key": incoming.ordering_key,
        "source": source,
    }
    try:
        stored = await wait_unless_disconnected(request, state.batcher.submit(incoming))
    except BatcherUnavailable as error:  # closed, overloaded, timed out, writer restarting
        fields.update(outcome="unavailable", detail=str(error))
        return Answer.error(503, "unavailable", str(error), Retry_After=RETRY_AFTER_SECONDS), fields
    except Exception as error:  # nothing was committed: Aircall retries after a 503
        fields.update(outcome="database_error", detail=f"{type(error).__name__}: {error}")
        return Answer.error(
            503,
            "database_unavailable",
            "the outbox database did not take the event; retry later",
            Retry_After=RETRY_AFTER_SECONDS,
        ), fields

    if stored.duplicate:
        outcome = "duplicate"
    elif stored.status == "skipped":
        outcome = "skipped"
    else:
        outcome = "stored"
    fields.update(outcome=outcome, duplicate=stored.duplicate, id=stored.id)
    return Answer(200, {"status": outcome, "id": stored.id}), fields


def commit_wait_seconds(settings: Settings) -> float:
    """How long a webhook waits for its commit at most: the batch ahead of it and its own may
    each wait out `RELAY_DATABASE_TIMEOUT_SECONDS` for the database, plus a second for the work
    (5 s by default: Aircall's own deadline)."""
    return 2 * settings.database_timeout_seconds + 1.0


def _event_identity(event: IncomingEvent) -> str:
    return event.dedup_key


def _too_large(length: int | None, limit: int) -> tuple[Answer, dict[str, Any]]:
    size = f"{length} bytes" if length is not None else "the body"
    return Answer.error(413, "payload_too_large", f"{size} is over the limit of {limit} bytes"), {
        "outcome": "payload_too_large"
    }
