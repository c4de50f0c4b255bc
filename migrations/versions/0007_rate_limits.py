"""The deployment's budget toward Segment: a `rate_limits` table that every drainer takes from.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01

`RELAY_SEGMENT_EVENTS_PER_SECOND` and `RELAY_SEGMENT_REQUESTS_PER_SECOND` were token buckets in
each drainer's memory, so N drainers sent N times the limit. They become one token bucket in the
database: the row `segment`, which each drainer updates in one statement, with the database's
clock, to take what a request sends before sending it (and which a 429 pauses for all of them).
The row is written the first time a drainer sends with a limit on; the table starts empty, and
stays so while both limits are 0. Creating a table changes no outbox row, on either database.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# Written out rather than imported from relay.db.tables (as in 0001): a migration keeps
# describing the schema as it was at this revision.
Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    limit = "the limit of the last drainer to send (0: none)"
    available = "what may go at updated_at; negative: promised to requests waiting"
    op.create_table(
        "rate_limits",
        sa.Column("name", sa.String(32), nullable=False, comment="what is limited: segment"),
        sa.Column("events_per_second", sa.Double(), nullable=False, comment=limit),
        sa.Column("requests_per_second", sa.Double(), nullable=False, comment=limit),
        sa.Column("events_available", sa.Double(), nullable=False, comment=available),
        sa.Column("requests_available", sa.Double(), nullable=False, comment=available),
        sa.Column("updated_at", Timestamp, nullable=False, comment="database clock"),
        sa.Column(
            "paused_until", Timestamp, nullable=True, comment="a 429's pause: none sent before"
        ),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_rate_limits")),
    )


def downgrade() -> None:
    op.drop_table("rate_limits")
