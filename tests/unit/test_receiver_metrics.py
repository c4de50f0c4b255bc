"""The receiver's metrics text: the outbox gauges (and their absence when the database could not
be read), the SQLite file's filesystem, and another registry rendered after the receiver's
(`run`); calls awaiting `call.ended` are one metric, the receiver's."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prometheus_client.parser import text_string_to_metric_families

from relay.db.gauges import FilesystemSpace, LastReconcile, OutboxGauges
from relay.drainer.metrics import DrainerMetrics
from relay.receiver.metrics import ReceiverMetrics

NOW = datetime(2026, 3, 10, 15, 0, tzinfo=UTC)


def samples(metrics: ReceiverMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    }


def test_outbox_gauges_as_read() -> None:
    metrics = ReceiverMetrics()
    gauges = OutboxGauges(
        pending=7,
        delivering=2,
        dead=1,
        oldest_undelivered_received_at=NOW - timedelta(seconds=42.5),
        calls_awaiting_call_ended=3,
    )
    metrics.outbox.update(gauges, NOW)
    found = samples(metrics)
    assert found[("relay_outbox_up", ())] == 1
    assert found[("relay_outbox_rows", (("status", "pending"),))] == 7
    assert found[("relay_outbox_rows", (("status", "delivering"),))] == 2
    assert found[("relay_outbox_rows", (("status", "dead"),))] == 1
    assert found[("relay_outbox_oldest_pending_age_seconds", ())] == 42.5
    assert found[("relay_outbox_calls_awaiting_call_ended", ())] == 3


def test_the_sqlite_files_filesystem_and_nothing_of_it_without_one() -> None:
    metrics = ReceiverMetrics()
    space = FilesystemSpace(avail_bytes=3 * 2**30, size_bytes=40 * 2**30)
    metrics.outbox.update(OutboxGauges(0, 0, 0, None, 0, filesystem=space), NOW)
    found = samples(metrics)
    assert found[("relay_outbox_filesystem_avail_bytes", ())] == 3 * 2**30
    assert found[("relay_outbox_filesystem_size_bytes", ())] == 40 * 2**30
    metrics.outbox.update(OutboxGauges(0, 0, 0, None, 0), NOW)  # PostgreSQL
    assert not [name for name, _ in samples(metrics) if "filesystem" in name]


def test_calls_awaiting_call_ended_are_one_metric_the_receivers() -> None:
    """The drainer exported a gauge of its own for them (`relay_calls_awaiting_call_ended`, as of
    its last check); the receiver's, read from the database at each scrape, is the only one."""
    families = {
        process: {family.name for family in metrics.registry.collect()}
        for process, metrics in (("receiver", ReceiverMetrics()), ("drainer", DrainerMetrics()))
    }
    awaiting = {
        (process, name)
        for process, names in families.items()
        for name in names
        if "awaiting" in name
    }
    assert awaiting == {("receiver", "relay_outbox_calls_awaiting_call_ended")}
    assert not [name for name in families["drainer"] if name.startswith("relay_outbox_")]


def test_nothing_waiting_is_an_age_of_zero() -> None:
    metrics = ReceiverMetrics()
    metrics.outbox.update(OutboxGauges(0, 0, 4, None, 0), NOW)
    found = samples(metrics)
    assert found[("relay_outbox_oldest_pending_age_seconds", ())] == 0
    assert found[("relay_outbox_rows", (("status", "pending"),))] == 0


def test_an_unreadable_outbox_shows_up_0_and_no_stale_gauges() -> None:
    metrics = ReceiverMetrics()
    metrics.outbox.update(OutboxGauges(5, 0, 0, NOW, 0), NOW)
    metrics.outbox.update(None, NOW + timedelta(seconds=15))
    found = samples(metrics)
    assert found[("relay_outbox_up", ())] == 0
    assert not [name for name, _ in found if name.startswith("relay_outbox_") and "up" not in name]


def test_an_included_registry_is_rendered_after_the_receivers() -> None:
    metrics, drainer = ReceiverMetrics(), DrainerMetrics()
    metrics.include(drainer.registry)
    metrics.observe("call.created", "stored", 0.003)
    drainer.delivered.inc(3)
    found = samples(metrics)
    assert found[("relay_webhooks_total", (("event", "call.created"), ("outcome", "stored")))] == 1
    assert found[("relay_events_delivered_total", ())] == 3


def test_the_last_reconcile_run_as_gauges_and_absent_when_none_ran() -> None:
    metrics = ReceiverMetrics()
    metrics.outbox.update(OutboxGauges(0, 0, 0, None, 0), NOW)
    assert not [name for name, _ in samples(metrics) if name.startswith("relay_reconcile_")]
    run = LastReconcile(
        finished_at=NOW - timedelta(minutes=5), complete=False, missing=4, awaiting_call_ended=1,
        backfilled=2,
    )  # fmt: skip
    metrics.outbox.update(OutboxGauges(0, 0, 0, None, 0, last_reconcile=run), NOW)
    found = samples(metrics)
    assert found[("relay_reconcile_last_run_timestamp_seconds", ())] == run.finished_at.timestamp()
    assert found[("relay_reconcile_last_run_complete", ())] == 0
    assert found[("relay_reconcile_last_run_calls", (("verdict", "missing"),))] == 4
    assert found[("relay_reconcile_last_run_calls", (("verdict", "awaiting_call_ended"),))] == 1
    assert found[("relay_reconcile_last_run_calls", (("verdict", "backfilled"),))] == 2
