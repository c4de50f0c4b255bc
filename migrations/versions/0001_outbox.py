"""The outbox and the log of delivery requests.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Written out rather than imported from relay.db.tables: a migration must keep describing the
# schema as it was at this revision, whatever the tables module says later.
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "delivery_requests",
        sa.Column(
            "id", sa.String(64), nullable=False, comment="request id, also in outbox.request_id"
        ),
        sa.Column("drainer", sa.String(200), nullable=False, comment="lease owner that sent it"),
        sa.Column("started_at", Timestamp, nullable=False),
        sa.Column("finished_at", Timestamp, nullable=True),
        sa.Column("duration_ms", sa.Integer(), nullable=True),
        sa.Column("event_count", sa.Integer(), nullable=False),
        sa.Column("body_bytes", sa.Integer(), nullable=False),
        sa.Column("outbox_ids", sa.JSON(), nullable=False, comment="outbox.id of the rows sent"),
        sa.Column("http_status", sa.Integer(), nullable=True, comment="null: no HTTP answer"),
        sa.Column(
            "outcome", sa.String(32), nullable=False, comment="delivered, retry, rejected, ..."
        ),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_delivery_requests")),
    )
    op.create_index("ix_delivery_requests_started_at", "delivery_requests", ["started_at"])

    op.create_table(
        "outbox",
        sa.Column(
            "id",
            Id,
            sa.Identity(always=False),
            nullable=False,
            comment="receipt id: order of receipt",
        ),
        sa.Column(
            "dedup_key", sa.String(64), nullable=False, comment="sha256 of the canonical event"
        ),
        sa.Column("message_id", sa.String(100), nullable=False, comment="Segment messageId"),
        sa.Column("source", sa.String(64), nullable=False, comment="label of the Aircall token"),
        sa.Column("resource", sa.String(64), nullable=False),
        sa.Column("event", sa.String(128), nullable=False),
        sa.Column("resource_id", sa.String(64), nullable=True, comment="data.id as text"),
        sa.Column("ordering_key", sa.String(200), nullable=False, comment="e.g. call:1903456789"),
        sa.Column("occurred_at", Timestamp, nullable=False, comment="Aircall timestamp, UTC"),
        sa.Column("received_at", Timestamp, nullable=False),
        sa.Column("last_received_at", Timestamp, nullable=False),
        sa.Column("received_count", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False, comment="body as received, minus token"),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("next_attempt_at", Timestamp, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True, comment="why dead, skipped or retrying"),
        sa.Column("last_http_status", sa.Integer(), nullable=True),
        sa.Column("claimed_by", sa.String(200), nullable=True, comment="lease owner (drainer)"),
        sa.Column("claimed_until", Timestamp, nullable=True, comment="lease expiry"),
        sa.Column("delivered_at", Timestamp, nullable=True),
        sa.Column("request_id", sa.String(64), nullable=True, comment="delivery_requests.id"),
        sa.Column("late", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.CheckConstraint(
            "status IN ('pending', 'delivering', 'delivered', 'dead', 'skipped')",
            name=op.f("ck_outbox_status"),
        ),
        sa.CheckConstraint("received_count >= 1", name=op.f("ck_outbox_received_count")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox")),
        sa.UniqueConstraint("dedup_key", name=op.f("uq_outbox_dedup_key")),
        sa.UniqueConstraint("message_id", name=op.f("uq_outbox_message_id")),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_outbox_event_received_at", "outbox", ["event", "received_at"])
    op.create_index("ix_outbox_ordering_key_occurred_at", "outbox", ["ordering_key", "occurred_at"])
    op.create_index("ix_outbox_status_next_attempt_at", "outbox", ["status", "next_attempt_at"])


def downgrade() -> None:
    op.drop_table("outbox")
    op.drop_table("delivery_requests")
