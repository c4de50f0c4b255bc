"""Rebuilding the SQLite `outbox` table, for migrations that change what SQLite cannot alter in
place (drop a constraint, add a CHECK).

Shared by migrations 0004 and 0006. It only moves the table as it is, whatever the revision, so
it describes no schema of its own.
"""

from __future__ import annotations

from typing import Any

from alembic import op
from sqlalchemy import text


class sqlite_rebuild:
    """`op.batch_alter_table("outbox", recreate="always")`, with the views on `outbox` dropped
    around it (SQLite refuses to rename a table while a view names a missing one), the
    AUTOINCREMENT counter carried over (the copy would reset it to the largest id present), and
    the partial indexes created again from their own SQL (depending on SQLAlchemy's version, the
    copy may lose their `WHERE`)."""

    def __enter__(self) -> Any:
        bind = op.get_bind()
        self._views = bind.execute(
            text("SELECT name, sql FROM sqlite_master WHERE type = 'view' ORDER BY name")
        ).all()
        self._partial_indexes = bind.execute(
            text(
                "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'outbox'"
                " AND sql LIKE '% WHERE %' ORDER BY name"
            )
        ).all()
        self._sequence = bind.execute(
            text("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'")
        ).scalar()
        for name, _ in self._views:
            op.execute(f'DROP VIEW "{name}"')
        for name, _ in self._partial_indexes:
            op.execute(f'DROP INDEX "{name}"')
        self._batch = op.batch_alter_table(
            "outbox", recreate="always", table_kwargs={"sqlite_autoincrement": True}
        )
        return self._batch.__enter__()

    def __exit__(self, *exc_info: Any) -> None:
        self._batch.__exit__(*exc_info)
        if exc_info[0] is not None:
            return
        if self._sequence is not None:
            bind = op.get_bind()
            bind.execute(
                text("UPDATE sqlite_sequence SET seq = max(seq, :seq) WHERE name = 'outbox'"),
                {"seq": self._sequence},
            )
            bind.execute(
                text(
                    "INSERT INTO sqlite_sequence (name, seq) SELECT 'outbox', :seq"
                    " WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'outbox')"
                ),
                {"seq": self._sequence},
            )
        for _, sql in self._partial_indexes:
            op.execute(sql)
        for _, sql in self._views:
            op.execute(sql)
