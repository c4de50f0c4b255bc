"""Fewer outbox indexes: two that no statement needs go, and the event index becomes partial.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26

Every outbox index is a B-tree insert for each webhook the receiver stores, and an index that
holds `status` is also rewritten twice for each event the drainer delivers (claimed, then
recorded). Three of them cost more than they gave:

- `ix_outbox_ordering_key_occurred_at` (ordering_key, occurred_at): `ix_outbox_ordering_key_status`
  (ordering_key, status, occurred_at, event) begins with the same column and answers every
  lookup by ordering key; only the sort of one key's few rows by `occurred_at` is left to do.
- `ix_outbox_status_next_attempt_at` (status, next_attempt_at): no statement of the relay reads
  it (the claim deliberately reads pending rows through `ix_outbox_status_id`), and it changed
  with every status change.
- `ix_outbox_event_received_at` (event, received_at) had an insertion point per event name for
  every row; what reads it is the search for hung-up calls still awaiting `call.ended` (the
  drainer's check, the outbox gauges, the `calls_awaiting_call_ended` view), all of them on
  `event = 'call.hungup'`. It becomes `ix_outbox_call_hungup_received_at` on (ordering_key,
  received_at) for `call.hungup` rows only: one row in twelve of a call, in the order of the key
  that search groups by, with the receipt time it filters on.

Measured on the receiver's SQLite write (bench/outbox_writes.py's method, batches of 30 on a
60,000-row outbox): 55.6 µs of CPU per row before, 40.7 after. Queries by event alone (hand-written
SQL) now read the table; the outbox's retention keeps it to the unpurged window. Dropping and
creating indexes changes no row, on either database; on a large outbox the new index takes a scan
of the table to build.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

HUNGUP = sa.text("event = 'call.hungup'")


def upgrade() -> None:
    op.drop_index("ix_outbox_ordering_key_occurred_at", table_name="outbox")
    op.drop_index("ix_outbox_status_next_attempt_at", table_name="outbox")
    op.drop_index("ix_outbox_event_received_at", table_name="outbox")
    op.create_index(
        "ix_outbox_call_hungup_received_at",
        "outbox",
        ["ordering_key", "received_at"],
        sqlite_where=HUNGUP,
        postgresql_where=HUNGUP,
    )


def downgrade() -> None:
    op.drop_index("ix_outbox_call_hungup_received_at", table_name="outbox")
    op.create_index("ix_outbox_event_received_at", "outbox", ["event", "received_at"])
    op.create_index("ix_outbox_status_next_attempt_at", "outbox", ["status", "next_attempt_at"])
    op.create_index("ix_outbox_ordering_key_occurred_at", "outbox", ["ordering_key", "occurred_at"])
