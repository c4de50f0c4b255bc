"""Indexes for the drainer's claim and late check on a large backlog.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23

`ix_outbox_status_id` lets a claim read pending rows in order of receipt and stop at the first
heads of keys, instead of sorting every pending row. `ix_outbox_ordering_key_status` answers the
ordering checks (an earlier event of the key pending or in flight; a later one delivered) from
the index alone; on SQLite, reading a row's status means reading past its payload.
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_outbox_status_id", "outbox", ["status", "id"])
    op.create_index(
        "ix_outbox_ordering_key_status",
        "outbox",
        ["ordering_key", "status", "occurred_at", "event"],
    )


def downgrade() -> None:
    op.drop_index("ix_outbox_ordering_key_status", table_name="outbox")
    op.drop_index("ix_outbox_status_id", table_name="outbox")
