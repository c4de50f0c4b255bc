"""Drop the unique constraint on outbox.message_id: dedup_key's already makes it unique.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26

`message_id` is `"aircall-" + dedup_key`, so the unique constraint on `dedup_key` (kept: it is
what the receiver's `ON CONFLICT` arbitrates on) already guarantees that no two rows share a
`message_id`. The second unique index cost a B-tree insert at a random place for every webhook,
about a quarter of the SQLite writer's CPU per row, and on PostgreSQL it let two receivers
storing the same event at once fail with a unique violation that `ON CONFLICT (dedup_key)` does
not arbitrate. To find a row by its messageId, look it up by its dedup key, which is indexed:
`WHERE dedup_key = substr('aircall-…', 9)` (`aircall-relay outbox show` does that).

PostgreSQL drops the constraint in place. SQLite cannot drop a constraint: the table is
rebuilt (copied, then renamed), which takes a while and about the table's size in free disk on
a large outbox. The views that read `outbox` are dropped first and created again from their
own SQL, and the AUTOINCREMENT counter is kept, so that a receipt id is never given twice even
when the newest rows were purged.
"""

from __future__ import annotations

from alembic import op
from relay_migrations.sqlite_rebuild import sqlite_rebuild

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

CONSTRAINT = "uq_outbox_message_id"


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        op.drop_constraint(CONSTRAINT, "outbox", type_="unique")
        return
    with sqlite_rebuild() as batch:
        batch.drop_constraint(CONSTRAINT, type_="unique")


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        op.create_unique_constraint(CONSTRAINT, "outbox", ["message_id"])
        return
    with sqlite_rebuild() as batch:
        batch.create_unique_constraint(CONSTRAINT, ["message_id"])
