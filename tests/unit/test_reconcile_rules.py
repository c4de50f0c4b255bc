"""Reconcile's pure decisions: the verdict on a call (grace), the window's parsing, the back-filled
row's identity, and the drainer's rule for a call with two `call.ended` rows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from relay.db.reconcile import CallEndedRow, CallInOutbox, reconciled_dedup_key
from relay.drainer.policy import second_call_ended
from relay.reconcile import (
    AWAITING,
    COMPLETE,
    EXIT_FAILURE,
    EXIT_INCOMPLETE,
    EXIT_OK,
    MISSING,
    NOT_YET_DUE,
    Report,
    judge,
    parse_moment,
)

NOW = datetime(2026, 12, 5, 8, 0, tzinfo=UTC)
GRACE = 3600.0


def ended(seconds_ago: float) -> int:
    return int(NOW.timestamp() - seconds_ago)


@pytest.mark.parametrize(
    ("ended_at", "in_outbox", "verdict"),
    [
        (ended(7200), CallInOutbox(True, True), COMPLETE),
        (ended(10), CallInOutbox(True, True), COMPLETE),  # complete even within the grace
        (None, CallInOutbox(True, True), COMPLETE),
        (ended(7200), None, MISSING),
        (ended(3600), None, MISSING),  # exactly the grace: due
        (ended(7200), CallInOutbox(True, False), AWAITING),
        (ended(3599), None, NOT_YET_DUE),
        (ended(3599), CallInOutbox(True, False), NOT_YET_DUE),
        (None, None, NOT_YET_DUE),  # still going on
        (None, CallInOutbox(True, False), NOT_YET_DUE),
    ],
)
def test_a_call_is_judged_once_it_ended_the_grace_ago(
    ended_at: int | None, in_outbox: CallInOutbox | None, verdict: str
) -> None:
    assert judge(ended_at, in_outbox, NOW, GRACE) == verdict


def test_a_grace_of_zero_judges_every_ended_call() -> None:
    assert judge(ended(0), None, NOW, 0.0) == MISSING


def test_the_window_takes_durations_and_iso_dates() -> None:
    assert parse_moment("24h", NOW, "--since") == NOW - timedelta(hours=24)
    assert parse_moment("90m", NOW, "--since") == NOW - timedelta(minutes=90)
    assert parse_moment("2d", NOW, "--since") == NOW - timedelta(days=2)
    assert parse_moment("30s", NOW, "--since") == NOW - timedelta(seconds=30)
    assert parse_moment("2026-12-01T00:00:00Z", NOW, "--since") == datetime(2026, 12, 1, tzinfo=UTC)
    assert parse_moment("2026-12-01T02:00:00+02:00", NOW, "--since") == datetime(
        2026, 12, 1, tzinfo=UTC
    )
    assert parse_moment("2026-12-01 00:00", NOW, "--since") == datetime(2026, 12, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="--until 'yesterday': expected a duration"):
        parse_moment("yesterday", NOW, "--until")


def test_the_back_filled_identity_depends_on_the_call_alone() -> None:
    key = reconciled_dedup_key("1903456789")
    assert key == reconciled_dedup_key("1903456789")
    assert key != reconciled_dedup_key("1903456790")
    assert len(key) == 64 and int(key, 16) >= 0


def _report(missing: int = 0, awaiting: int = 0, backfilled: int = 0, errors: int = 0) -> Report:
    report = Report(NOW - timedelta(days=1), NOW, True, GRACE, started_at=NOW)
    report.verdicts[MISSING] = [str(n) for n in range(missing)]
    report.verdicts[AWAITING] = [str(100 + n) for n in range(awaiting)]
    report.backfilled = [str(n) for n in range(backfilled)]
    report.errors = ["call 1: Aircall no longer has it (404)"] * errors
    report.finish(NOW)
    return report


def test_exit_codes_and_outcomes() -> None:
    assert (_report().exit_code, _report().outcome) == (EXIT_OK, "complete")
    repaired = _report(missing=2, awaiting=1, backfilled=3)
    assert (repaired.exit_code, repaired.outcome) == (EXIT_OK, "complete")
    assert "COMPLETE" in repaired.as_text() and "3 back-filled" in repaired.as_text()
    unrepaired = _report(missing=2, awaiting=1, backfilled=1)
    assert (unrepaired.exit_code, unrepaired.outcome) == (EXIT_INCOMPLETE, "incomplete")
    assert unrepaired.unrepaired == 2
    assert "INCOMPLETE: 2 ended call(s)" in unrepaired.as_text()
    failed = _report(missing=1, errors=1)
    assert (failed.exit_code, failed.outcome) == (EXIT_FAILURE, "errors")


# --- the drainer's rule: exactly one call.ended per call ----------------------------------------


def row(
    row_id: int, origin: str, status: str = "pending", attempts: int = 0, key: str = "call:1"
) -> CallEndedRow:
    return CallEndedRow(row_id, key, origin, status, attempts)


def test_a_webhook_after_a_back_filled_row_gives_way_naming_it() -> None:
    rows = [row(7, "reconciled"), row(9, "webhook", "delivering")]
    skipped = second_call_ended([9], rows)
    assert list(skipped) == [9]
    assert "outbox row 7" in skipped[9] and "origin reconciled" in skipped[9]
    # The back-filled row itself goes.
    assert second_call_ended([7], rows) == {}


def test_a_back_filled_row_gives_way_to_a_webhook_already_delivered() -> None:
    rows = [row(7, "reconciled", "delivering"), row(9, "webhook", "delivered")]
    skipped = second_call_ended([7], rows)
    assert list(skipped) == [7]
    assert "outbox row 9" in skipped[7] and "origin webhook" in skipped[7]


def test_both_claimed_together_only_the_back_filled_row_goes() -> None:
    rows = [row(7, "reconciled", "delivering"), row(9, "webhook", "delivering")]
    assert list(second_call_ended([7, 9], rows)) == [9]


def test_a_row_that_may_have_reached_segment_wins() -> None:
    # The webhook was sent once and timed out (attempts 1): Segment may have it.
    rows = [row(7, "reconciled", "delivering"), row(9, "webhook", "pending", attempts=1)]
    assert list(second_call_ended([7], rows)) == [7]
    rows = [row(7, "reconciled", "pending"), row(9, "webhook", "delivering", attempts=1)]
    assert second_call_ended([9], rows) == {}


def test_dead_and_skipped_rows_count_for_nothing() -> None:
    rows = [row(7, "reconciled", "skipped"), row(9, "webhook", "delivering")]
    assert second_call_ended([9], rows) == {}
    rows = [row(7, "reconciled", "delivering"), row(9, "webhook", "dead")]
    assert second_call_ended([7], rows) == {}


def test_two_webhooks_of_a_call_are_left_alone_and_calls_do_not_mix() -> None:
    rows = [row(3, "webhook", "delivered"), row(9, "webhook", "delivering")]
    assert second_call_ended([9], rows) == {}
    rows = [row(7, "reconciled", key="call:2"), row(9, "webhook", "delivering", key="call:1")]
    assert second_call_ended([9], rows) == {}
