"""Reconciliation with Aircall's API: the outbox row's `origin`, and `reconcile_runs`.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05

`aircall-relay reconcile` compares Aircall's calls with the outbox and, with `--backfill`,
stores a `call.ended` built from Aircall's API for a call whose own never came. Such a row is
marked `origin = 'reconciled'`; every row the receiver writes, and every row already stored, is
`webhook` (the column's default, so adding it rewrites no row: SQLite adds a column in place,
PostgreSQL 11 and later keep a constant default in the catalogue). Each run is recorded in
`reconcile_runs`, and the view `last_reconcile_run` shows the latest.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# Written out rather than imported from relay.db.tables: a migration keeps describing the schema
# as it was at this revision.
Timestamp = sa.DateTime(timezone=True)
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
ORIGIN_CHECK = "origin IN ('webhook', 'reconciled')"


def _age(column: str, dialect: str) -> str:
    if dialect == "sqlite":
        return f"CAST(ROUND((julianday('now') - julianday({column})) * 86400) AS INTEGER)"
    return f"CAST(EXTRACT(EPOCH FROM (now() - {column})) AS BIGINT)"


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        # In place (no table rebuild): SQLite takes a column CHECK in ADD COLUMN.
        op.execute(
            "ALTER TABLE outbox ADD COLUMN origin VARCHAR(16) DEFAULT 'webhook' NOT NULL"
            f" CONSTRAINT ck_outbox_origin CHECK ({ORIGIN_CHECK})"
        )
    else:
        op.add_column(
            "outbox",
            sa.Column(
                "origin",
                sa.String(16),
                nullable=False,
                server_default=sa.text("'webhook'"),
                comment="webhook or reconciled",
            ),
        )
        op.create_check_constraint(op.f("ck_outbox_origin"), "outbox", ORIGIN_CHECK)
    op.create_table(
        "reconcile_runs",
        sa.Column("id", Id, sa.Identity(always=False), nullable=False),
        sa.Column("window_since", Timestamp, nullable=False, comment="calls started from"),
        sa.Column("window_until", Timestamp, nullable=False, comment="calls started before"),
        sa.Column("backfill", sa.Boolean(), nullable=False, comment="run with --backfill"),
        sa.Column("calls_seen", sa.Integer(), nullable=False, comment="calls Aircall listed"),
        sa.Column(
            "missing", sa.Integer(), nullable=False, comment="ended calls with no outbox row"
        ),
        sa.Column(
            "awaiting_call_ended",
            sa.Integer(),
            nullable=False,
            comment="ended calls past the grace with rows but no call.ended",
        ),
        sa.Column("not_yet_due", sa.Integer(), nullable=False, comment="ongoing or within grace"),
        sa.Column("backfilled", sa.Integer(), nullable=False, comment="call.ended rows stored"),
        sa.Column("errors", sa.Integer(), nullable=False, comment="calls that could not be judged"),
        sa.Column("started_at", Timestamp, nullable=False),
        sa.Column("finished_at", Timestamp, nullable=False),
        sa.Column(
            "outcome",
            sa.String(16),
            nullable=False,
            comment="complete, incomplete, errors, failed",
        ),
        sa.Column("error", sa.Text(), nullable=True, comment="why the run failed"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reconcile_runs")),
        sqlite_autoincrement=True,
    )
    op.create_index(
        op.f("ix_reconcile_runs_started_at"), "reconcile_runs", ["started_at"], unique=False
    )
    op.execute(
        f"""
        CREATE VIEW last_reconcile_run AS
        SELECT id, window_since, window_until, backfill, calls_seen, missing,
               awaiting_call_ended, not_yet_due, backfilled, errors, started_at, finished_at,
               {_age("finished_at", dialect)} AS age_seconds, outcome, error
        FROM reconcile_runs
        WHERE id = (SELECT max(id) FROM reconcile_runs)
        """
    )


def downgrade() -> None:
    op.execute("DROP VIEW last_reconcile_run")
    op.drop_index(op.f("ix_reconcile_runs_started_at"), table_name="reconcile_runs")
    op.drop_table("reconcile_runs")
    if op.get_bind().dialect.name == "sqlite":
        op.execute("ALTER TABLE outbox DROP COLUMN origin")
    else:
        op.drop_column("outbox", "origin")
