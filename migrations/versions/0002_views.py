"""Read-only views for operators: backlog, dead rows, calls awaiting call.ended, recent requests.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23

Ages are in seconds, computed by the database at query time. The SQL differs per dialect only
in how "now" and an age are written.
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

VIEWS = ("outbox_backlog", "outbox_dead", "calls_awaiting_call_ended", "recent_delivery_requests")


def _age(column: str, dialect: str) -> str:
    if dialect == "sqlite":
        return f"CAST(ROUND((julianday('now') - julianday({column})) * 86400) AS INTEGER)"
    return f"CAST(EXTRACT(EPOCH FROM (now() - {column})) AS BIGINT)"


def _day_ago(dialect: str) -> str:
    if dialect == "sqlite":
        return "strftime('%Y-%m-%d %H:%M:%f', 'now', '-1 day')"
    return "now() - INTERVAL '1 day'"


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.execute(
        f"""
        CREATE VIEW outbox_backlog AS
        SELECT event,
               status,
               count(*) AS events,
               min(received_at) AS oldest_received_at,
               {_age("min(received_at)", dialect)} AS oldest_age_seconds,
               max(attempts) AS most_attempts
        FROM outbox
        WHERE status IN ('pending', 'delivering')
        GROUP BY event, status
        """
    )
    op.execute(
        """
        CREATE VIEW outbox_dead AS
        SELECT id, event, ordering_key, occurred_at, received_at, attempts,
               last_http_status, last_error, request_id, message_id
        FROM outbox
        WHERE status = 'dead'
        """
    )
    op.execute(
        f"""
        CREATE VIEW calls_awaiting_call_ended AS
        SELECT hungup.ordering_key AS ordering_key,
               hungup.resource_id AS call_id,
               min(hungup.received_at) AS hungup_received_at,
               {_age("min(hungup.received_at)", dialect)} AS waiting_seconds
        FROM outbox AS hungup
        WHERE hungup.event = 'call.hungup'
          AND NOT EXISTS (
              SELECT 1 FROM outbox AS ended
              WHERE ended.ordering_key = hungup.ordering_key AND ended.event = 'call.ended'
          )
        GROUP BY hungup.ordering_key, hungup.resource_id
        """
    )
    op.execute(
        f"""
        CREATE VIEW recent_delivery_requests AS
        SELECT id, drainer, started_at, duration_ms, event_count, body_bytes,
               http_status, outcome, error, outbox_ids
        FROM delivery_requests
        WHERE started_at >= {_day_ago(dialect)}
        """
    )


def downgrade() -> None:
    for view in reversed(VIEWS):
        op.execute(f"DROP VIEW IF EXISTS {view}")
