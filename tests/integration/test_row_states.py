"""The row states are the database's to enforce (migration 0006), on SQLite and PostgreSQL: SQL
written by hand cannot leave a row that the relay would never move again, while every state the
relay itself writes, and the hand-written repairs docs/operations.md shows, are accepted."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import exc as sa_exc

from relay.db.delivery import DeadRows, DeliveryStore, RequestRecord
from relay.db.engine import create_engine
from relay.db.store import OutboxStore
from tests.support import ROOT, OutboxDatabase, execute_async, incoming_event

pytestmark = pytest.mark.anyio

NOW = datetime.now(UTC).replace(microsecond=0)
OWNER = "relay-2:4242:ab12cd"


def _body(call: int, event: str) -> dict[str, object]:
    return {"resource": "call", "event": event, "timestamp": 1_773_000_000, "data": {"id": call}}


@dataclass
class Rows:
    """One row in each state, written by the relay's own statements: id by state."""

    database: OutboxDatabase
    ids: dict[str, int]


@pytest.fixture
async def rows(database: OutboxDatabase) -> Rows:
    engine = create_engine(database.url, timeout_seconds=2.0)
    outbox, delivery = OutboxStore(engine), DeliveryStore(engine)
    received = NOW - timedelta(minutes=5)
    stored = await outbox.insert_events(
        [incoming_event(_body(call, "call.created"), received) for call in (1, 2, 3, 4)]
        + [incoming_event(_body(5, "call.tagged"), received, forward=False)]
    )
    delivered, dead, delivering, pending, skipped = (row.id for row in stored)
    claimed = await delivery.claim(OWNER, NOW, timedelta(0), timedelta(minutes=1), 3, 1)
    assert {row.id for row in claimed} == {delivered, dead, delivering}
    request = RequestRecord(
        id=RequestRecord.new_id(),
        started_at=NOW,
        finished_at=NOW + timedelta(milliseconds=30),
        event_count=2,
        body_bytes=400,
        outbox_ids=[delivered, dead],
        http_status=400,
        outcome="rejected",
        error="Segment answered 400",
    )
    await delivery.finish(
        OWNER,
        request,
        delivered=[delivered],
        dead=[DeadRows(ids=[dead], reason="Segment refused the message with 400")],
    )
    await outbox.close_writer()
    await delivery.close()
    await engine.dispose()
    ids = {
        "pending": pending,
        "delivering": delivering,
        "delivered": delivered,
        "dead": dead,
        "skipped": skipped,
    }
    made = await database.rows_async("SELECT id, status FROM outbox ORDER BY id")
    assert {row["id"]: row["status"] for row in made} == {ids[s]: s for s in ids}
    return Rows(database, ids)


# (the row's state, what SQL written by hand does to it, the constraint that refuses it)
REFUSED = [
    ("pending", "next_attempt_at = NULL", "ck_outbox_pending_or_delivering_has_next_attempt_at"),
    ("pending", "status = 'delivering'", "ck_outbox_delivering_has_lease"),
    ("pending", "status = 'delivered'", "ck_outbox_delivered_has_delivered_at"),
    ("pending", "status = 'dead'", "ck_outbox_dead_has_reason"),
    (
        "pending",
        "claimed_by = 'vm:2:x', claimed_until = next_attempt_at",
        "ck_outbox_lease_only_while_delivering",
    ),
    ("pending", "attempts = -1", "ck_outbox_attempts_not_negative"),
    ("delivering", "claimed_until = NULL", "ck_outbox_delivering_has_lease"),
    ("delivering", "next_attempt_at = NULL", "ck_outbox_pending_or_delivering_has_next_attempt_at"),
    ("delivering", "claimed_by = NULL", "ck_outbox_delivering_has_lease"),
    ("delivering", "status = 'pending'", "ck_outbox_lease_only_while_delivering"),
    ("delivered", "delivered_at = NULL", "ck_outbox_delivered_has_delivered_at"),
    ("delivered", "status = 'pending'", "ck_outbox_pending_or_delivering_has_next_attempt_at"),
    ("dead", "last_error = NULL", "ck_outbox_dead_has_reason"),
    ("dead", "status = 'pending'", "ck_outbox_pending_or_delivering_has_next_attempt_at"),
    ("skipped", "last_error = NULL", "ck_outbox_skipped_has_reason"),
    ("skipped", "status = 'pending'", "ck_outbox_pending_or_delivering_has_next_attempt_at"),
]


@pytest.mark.parametrize(("state", "change", "constraint"), REFUSED)
async def test_an_update_that_breaks_a_row_state_is_refused_and_changes_nothing(
    rows: Rows, state: str, change: str, constraint: str
) -> None:
    before = await rows.database.rows_async()
    with pytest.raises(sa_exc.IntegrityError, match=constraint):
        await execute_async(
            rows.database.url, f"UPDATE outbox SET {change} WHERE id = {rows.ids[state]}"
        )
    assert await rows.database.rows_async() == before


async def test_an_insert_of_a_pending_row_that_is_never_due_is_refused(rows: Rows) -> None:
    [row] = await rows.database.rows_async(f"SELECT * FROM outbox WHERE id = {rows.ids['pending']}")
    columns = ("dedup_key", "message_id", "source", "resource", "event", "ordering_key", "payload")
    copy = {name: row[name] for name in columns}
    copy["dedup_key"] = copy["message_id"] = "f" * 64
    copy["payload"] = "{}"
    values = ", ".join(f"'{value}'" for value in copy.values())
    now = NOW.strftime("%Y-%m-%d %H:%M:%S")
    with pytest.raises(
        sa_exc.IntegrityError, match="ck_outbox_pending_or_delivering_has_next_attempt_at"
    ):
        await execute_async(
            rows.database.url,
            f"INSERT INTO outbox ({', '.join(columns)}, occurred_at, received_at,"
            f" last_received_at, status) VALUES ({values}, '{now}', '{now}', '{now}', 'pending')",
        )
    assert len(await rows.database.rows_async()) == len(rows.ids)


def _repairs() -> list[str]:
    """The `UPDATE` statements of docs/operations.md ("Changing rows by hand")."""
    document = (ROOT / "docs" / "operations.md").read_text()
    section = document.split("### Changing rows by hand", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sql\n(.*?)```", section, flags=re.DOTALL)
    assert blocks, "no SQL in the section"
    return [block.strip().rstrip(";") for block in blocks]


async def test_the_hand_written_repairs_of_the_operations_guide_are_accepted(rows: Rows) -> None:
    for sql in _repairs():
        await execute_async(rows.database.url, sql)
    statuses = await rows.database.rows_async("SELECT id, status FROM outbox ORDER BY id")
    # The row in flight is given back, the dead one is due again, the others are unchanged.
    assert {row["id"]: row["status"] for row in statuses} == {
        rows.ids["pending"]: "pending",
        rows.ids["delivering"]: "pending",
        rows.ids["delivered"]: "delivered",
        rows.ids["dead"]: "pending",
        rows.ids["skipped"]: "skipped",
    }
