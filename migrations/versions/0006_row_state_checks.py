"""CHECK constraints for the outbox's row states.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27

Every statement of the relay keeps a row's columns consistent with its status (architecture.md,
"Row states"), but nothing stopped SQL written by hand from making a row the relay never moves
again: a `pending` row without `next_attempt_at` is never due, so it blocks its ordering key
for good; a `delivering` row without `claimed_until` never has its lease expire. The database
now refuses such rows:

- `attempts` is never negative;
- a `pending` row has `next_attempt_at` (when it is due), and so does a `delivering` one (a
  lease that expires gives the row back to `pending` as it is);
- a `delivering` row has its lease, `claimed_by` and `claimed_until`, and no other row has either;
- a `delivered` row has `delivered_at` (retention ages it by that);
- a `dead` or `skipped` row has its reason in `last_error`.

No version of the relay wrote a row that breaks these (each of its statements sets or clears
these columns with the status). A row edited by hand may, so before the constraints are added,
such rows are mended, each in the way that loses nothing, and a warning says how many:
`delivering` without a whole lease goes back to `pending` (sent again, with the same
messageId); `pending` or `delivering` without `next_attempt_at` becomes due at its receipt (as
the receiver writes it); a lease left on another status is cleared; `delivered` without
`delivered_at` gets its receipt time; `dead` or `skipped` without a reason gets one that says it
was not recorded; negative `attempts` become 0.

PostgreSQL adds the constraints in place, in one `ALTER TABLE` (one scan of the table, under its
exclusive lock). SQLite cannot add a constraint to a table: it is rebuilt as in migration 0004
(views, partial index and AUTOINCREMENT counter kept). Downgrading drops the constraints; the
mended rows stay as they are, valid at every revision.
"""

from __future__ import annotations

import logging

from alembic import op
from relay_migrations.sqlite_rebuild import sqlite_rebuild
from sqlalchemy import text

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# Written out rather than imported from relay.db.tables, like every migration's schema.
CHECKS = {
    "ck_outbox_attempts_not_negative": "attempts >= 0",
    "ck_outbox_pending_or_delivering_has_next_attempt_at": (
        "status NOT IN ('pending', 'delivering') OR next_attempt_at IS NOT NULL"
    ),
    "ck_outbox_delivering_has_lease": (
        "status <> 'delivering' OR (claimed_by IS NOT NULL AND claimed_until IS NOT NULL)"
    ),
    "ck_outbox_lease_only_while_delivering": (
        "status = 'delivering' OR (claimed_by IS NULL AND claimed_until IS NULL)"
    ),
    "ck_outbox_delivered_has_delivered_at": "status <> 'delivered' OR delivered_at IS NOT NULL",
    "ck_outbox_dead_has_reason": "status <> 'dead' OR last_error IS NOT NULL",
    "ck_outbox_skipped_has_reason": "status <> 'skipped' OR last_error IS NOT NULL",
}

# (what the rows lacked, the UPDATE that mends them), in this order: a row in flight without a
# lease is given back first, so that the next statements see it as the pending row it becomes.
MENDS = (
    (
        "delivering without a whole lease, given back as pending",
        "UPDATE outbox SET status = 'pending', claimed_by = NULL, claimed_until = NULL,"
        " next_attempt_at = coalesce(next_attempt_at, received_at)"
        " WHERE status = 'delivering' AND (claimed_by IS NULL OR claimed_until IS NULL)",
    ),
    (
        "pending or delivering without next_attempt_at, due at their receipt",
        "UPDATE outbox SET next_attempt_at = received_at"
        " WHERE status IN ('pending', 'delivering') AND next_attempt_at IS NULL",
    ),
    (
        "not in flight with a lease left on them, cleared",
        "UPDATE outbox SET claimed_by = NULL, claimed_until = NULL"
        " WHERE status <> 'delivering' AND (claimed_by IS NOT NULL OR claimed_until IS NOT NULL)",
    ),
    (
        "delivered without delivered_at, given their receipt time",
        "UPDATE outbox SET delivered_at = received_at"
        " WHERE status = 'delivered' AND delivered_at IS NULL",
    ),
    (
        "dead or skipped without a reason, given one",
        "UPDATE outbox SET last_error = status || ' before migration 0006, reason not recorded'"
        " WHERE status IN ('dead', 'skipped') AND last_error IS NULL",
    ),
    (
        "negative attempts, set to 0",
        "UPDATE outbox SET attempts = 0 WHERE attempts < 0",
    ),
)

log = logging.getLogger("relay_migrations")


def upgrade() -> None:
    bind = op.get_bind()
    for what, sql in MENDS:
        mended = bind.execute(text(sql)).rowcount
        if mended:
            log.warning("migration 0006 mended %d row(s): %s", mended, what)
    if bind.dialect.name != "sqlite":
        op.execute(
            "ALTER TABLE outbox "
            + ", ".join(f"ADD CONSTRAINT {name} CHECK ({sql})" for name, sql in CHECKS.items())
        )
        return
    with sqlite_rebuild() as batch:
        for name, sql in CHECKS.items():
            batch.create_check_constraint(op.f(name), text(sql))


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        op.execute("ALTER TABLE outbox " + ", ".join(f"DROP CONSTRAINT {name}" for name in CHECKS))
        return
    with sqlite_rebuild() as batch:
        for name in CHECKS:
            batch.drop_constraint(op.f(name), type_="check")
