"""The outbox schema: table definitions, shared by the store and the Alembic migrations.

Names are chosen for a person writing SQL by hand (PRODUCT §5). The metadata carries a naming
convention so that constraint names are the same on SQLite and PostgreSQL, and `alembic check`
can compare the migrations with these definitions.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

NAMING_CONVENTION: Final[dict[str, str]] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)

STATUSES: Final[tuple[str, ...]] = ("pending", "delivering", "delivered", "dead", "skipped")


class UtcDateTime(sa.types.TypeDecorator[datetime]):
    """An aware UTC datetime on both databases.

    PostgreSQL stores `timestamptz`. SQLite has no date type: it stores text
    `YYYY-MM-DD HH:MM:SS.ffffff` in UTC, which reads well in `sqlite3`, sorts correctly as text
    and compares with SQLite's own `datetime('now')` output.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given where an aware UTC one is needed")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        return None if value is None else utc_datetime(value)


def utc_datetime(value: datetime | str) -> datetime:
    """A stored timestamp as an aware UTC datetime (SQLite gives naive UTC, or text)."""
    if isinstance(value, str):  # a value written by hand in SQL, e.g. datetime('now')
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


# The partial index's condition, as a literal: SQLite and PostgreSQL use a partial index only for
# a query whose own condition is this same literal term (a bound parameter would not do).
CALL_HUNGUP = sa.text("event = 'call.hungup'")


def is_call_hungup(table: Any) -> Any:
    """SQL: the row of `table` (the outbox or an alias of it) is a `call.hungup`, spelled so that
    `ix_outbox_call_hungup_received_at` applies."""
    return table.c.event == sa.literal_column("'call.hungup'", sa.String())


def awaiting_call_ended(received_before: Any) -> Any:
    """SQL: the outbox row is a `call.hungup` received before `received_before` whose call has
    no `call.ended` in the outbox (PRODUCT §6). What the drainer's check, the gauges and
    `outbox stats` all ask: the hung-up calls come from the partial index, and each one's
    `call.ended` is looked for among its own key's rows (`ix_outbox_ordering_key_status`)."""
    ended = outbox.alias("ended")
    return sa.and_(
        is_call_hungup(outbox),
        outbox.c.received_at < received_before,
        ~sa.exists().where(
            ended.c.ordering_key == outbox.c.ordering_key, ended.c.event == "call.ended"
        ),
    )


# SQLite only makes INTEGER PRIMARY KEY the rowid (and AUTOINCREMENT never reuses an id, so the
# receipt id stays a true order of receipt even after a purge); PostgreSQL gets a BIGINT identity.
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

outbox = sa.Table(
    "outbox",
    metadata,
    sa.Column("id", Id, sa.Identity(), primary_key=True, comment="receipt id: order of receipt"),
    sa.Column("dedup_key", sa.String(64), nullable=False, comment="sha256 of the canonical event"),
    sa.Column("message_id", sa.String(100), nullable=False, comment="Segment messageId"),
    sa.Column("source", sa.String(64), nullable=False, comment="label of the Aircall token"),
    sa.Column("resource", sa.String(64), nullable=False),
    sa.Column("event", sa.String(128), nullable=False),
    sa.Column("resource_id", sa.String(64), nullable=True, comment="data.id as text"),
    sa.Column("ordering_key", sa.String(200), nullable=False, comment="e.g. call:1903456789"),
    sa.Column("occurred_at", UtcDateTime(), nullable=False, comment="Aircall timestamp, UTC"),
    sa.Column("received_at", UtcDateTime(), nullable=False),
    sa.Column("last_received_at", UtcDateTime(), nullable=False),
    sa.Column("received_count", sa.Integer(), nullable=False, server_default=sa.text("1")),
    sa.Column("payload", sa.JSON(), nullable=False, comment="body as received, minus token"),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer(), nullable=False, server_default=sa.text("0")),
    sa.Column("next_attempt_at", UtcDateTime(), nullable=True),
    sa.Column("last_error", sa.Text(), nullable=True, comment="why dead, skipped or retrying"),
    sa.Column("last_http_status", sa.Integer(), nullable=True),
    sa.Column("claimed_by", sa.String(200), nullable=True, comment="lease owner (drainer)"),
    sa.Column("claimed_until", UtcDateTime(), nullable=True, comment="lease expiry"),
    sa.Column("delivered_at", UtcDateTime(), nullable=True),
    sa.Column("request_id", sa.String(64), nullable=True, comment="delivery_requests.id"),
    sa.Column("late", sa.Boolean(), nullable=False, server_default=sa.false()),
    # Where the row came from (migration 0008): `webhook` (the receiver) or `reconciled` (a
    # `call.ended` back-filled by `aircall-relay reconcile --backfill` from Aircall's API).
    sa.Column(
        "origin",
        sa.String(16),
        nullable=False,
        server_default=sa.text("'webhook'"),
        comment="webhook or reconciled",
    ),
    # message_id is "aircall-" + dedup_key: unique because dedup_key is (migration 0004 dropped
    # its own unique index). Look a messageId up by `dedup_key = substr(message_id, 9)`.
    sa.UniqueConstraint("dedup_key"),
    sa.CheckConstraint(
        "status IN ('pending', 'delivering', 'delivered', 'dead', 'skipped')", name="status"
    ),
    sa.CheckConstraint("received_count >= 1", name="received_count"),
    # The row states (architecture.md, "Row states"; migration 0006): what every statement of
    # the relay keeps true, so that SQL written by hand cannot make a row the relay would never
    # move again (a pending row without a due time, a row in flight without a lease).
    sa.CheckConstraint("attempts >= 0", name="attempts_not_negative"),
    sa.CheckConstraint(
        "status NOT IN ('pending', 'delivering') OR next_attempt_at IS NOT NULL",
        name="pending_or_delivering_has_next_attempt_at",
    ),
    sa.CheckConstraint(
        "status <> 'delivering' OR (claimed_by IS NOT NULL AND claimed_until IS NOT NULL)",
        name="delivering_has_lease",
    ),
    sa.CheckConstraint(
        "status = 'delivering' OR (claimed_by IS NULL AND claimed_until IS NULL)",
        name="lease_only_while_delivering",
    ),
    sa.CheckConstraint(
        "status <> 'delivered' OR delivered_at IS NOT NULL", name="delivered_has_delivered_at"
    ),
    sa.CheckConstraint("status <> 'dead' OR last_error IS NOT NULL", name="dead_has_reason"),
    sa.CheckConstraint("status <> 'skipped' OR last_error IS NOT NULL", name="skipped_has_reason"),
    sa.CheckConstraint("origin IN ('webhook', 'reconciled')", name="origin"),
    # Hung-up calls by key, with their receipt: the search for calls still awaiting
    # `call.ended` (drainer, gauges, the view) reads only this, for `call.hungup` rows only
    # (migration 0005; queries must spell the event as this literal for the index to apply).
    sa.Index(
        "ix_outbox_call_hungup_received_at",
        "ordering_key",
        "received_at",
        sqlite_where=CALL_HUNGUP,
        postgresql_where=CALL_HUNGUP,
    ),
    # The drainer's (migration 0003). Pending rows in order of receipt, so that a claim reads
    # the first heads of keys without sorting the whole backlog:
    sa.Index("ix_outbox_status_id", "status", "id"),
    # A key's rows by status, with what ordering compares: the checks "is an earlier event of
    # this key pending or in flight" (claim) and "was a later one delivered" (late) read only
    # this index, never the rows (on SQLite a row's status lies behind its payload).
    sa.Index("ix_outbox_ordering_key_status", "ordering_key", "status", "occurred_at", "event"),
    sqlite_autoincrement=True,
)

delivery_requests = sa.Table(
    "delivery_requests",
    metadata,
    sa.Column(
        "id", sa.String(64), primary_key=True, comment="request id, also in outbox.request_id"
    ),
    sa.Column("drainer", sa.String(200), nullable=False, comment="lease owner that sent it"),
    sa.Column("started_at", UtcDateTime(), nullable=False),
    sa.Column("finished_at", UtcDateTime(), nullable=True),
    sa.Column("duration_ms", sa.Integer(), nullable=True),
    sa.Column("event_count", sa.Integer(), nullable=False),
    sa.Column("body_bytes", sa.Integer(), nullable=False),
    sa.Column("outbox_ids", sa.JSON(), nullable=False, comment="outbox.id of the rows sent"),
    sa.Column("http_status", sa.Integer(), nullable=True, comment="null: no HTTP answer"),
    sa.Column("outcome", sa.String(32), nullable=False, comment="delivered, retry, rejected, ..."),
    sa.Column("error", sa.Text(), nullable=True),
    sa.Index("ix_delivery_requests_started_at", "started_at"),
)

# The deployment's budget toward Segment (migration `*_rate_limits.py`): one row, `segment`, from
# which every drainer takes what each request sends before sending it, so that the limits hold for
# all the drainers together (PRODUCT §10). Written only while a limit is on, with the database's
# clock (relay/db/delivery.py); nothing else reads it.
_LIMIT = "the limit of the last drainer to send (0: none)"
_AVAILABLE = "what may go at updated_at; negative: promised to requests waiting"

rate_limits = sa.Table(
    "rate_limits",
    metadata,
    sa.Column("name", sa.String(32), primary_key=True, comment="what is limited: segment"),
    sa.Column("events_per_second", sa.Double(), nullable=False, comment=_LIMIT),
    sa.Column("requests_per_second", sa.Double(), nullable=False, comment=_LIMIT),
    sa.Column("events_available", sa.Double(), nullable=False, comment=_AVAILABLE),
    sa.Column("requests_available", sa.Double(), nullable=False, comment=_AVAILABLE),
    sa.Column("updated_at", UtcDateTime(), nullable=False, comment="database clock"),
    sa.Column(
        "paused_until", UtcDateTime(), nullable=True, comment="a 429's pause: none sent before"
    ),
)

# One row per `aircall-relay reconcile` (migration 0008): the window compared with Aircall's
# calls, what was found and done, and how the run ended; the audit trail of completeness, in SQL
# (relay/db/reconcile.py writes it; the view `last_reconcile_run` shows the latest).
reconcile_runs = sa.Table(
    "reconcile_runs",
    metadata,
    sa.Column("id", Id, sa.Identity(), primary_key=True),
    sa.Column("window_since", UtcDateTime(), nullable=False, comment="calls started from"),
    sa.Column("window_until", UtcDateTime(), nullable=False, comment="calls started before"),
    sa.Column("backfill", sa.Boolean(), nullable=False, comment="run with --backfill"),
    sa.Column("calls_seen", sa.Integer(), nullable=False, comment="calls Aircall listed"),
    sa.Column("missing", sa.Integer(), nullable=False, comment="ended calls with no outbox row"),
    sa.Column(
        "awaiting_call_ended",
        sa.Integer(),
        nullable=False,
        comment="ended calls past the grace with rows but no call.ended",
    ),
    sa.Column("not_yet_due", sa.Integer(), nullable=False, comment="ongoing or within grace"),
    sa.Column("backfilled", sa.Integer(), nullable=False, comment="call.ended rows stored"),
    sa.Column("errors", sa.Integer(), nullable=False, comment="calls that could not be judged"),
    sa.Column("started_at", UtcDateTime(), nullable=False),
    sa.Column("finished_at", UtcDateTime(), nullable=False),
    sa.Column(
        "outcome", sa.String(16), nullable=False, comment="complete, incomplete, errors, failed"
    ),
    sa.Column("error", sa.Text(), nullable=True, comment="why the run failed"),
    sa.Index("ix_reconcile_runs_started_at", "started_at"),
    sqlite_autoincrement=True,
)
