"""The receiver's batch insert converts values exactly as SQLAlchemy's type processors would."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.dialects import sqlite

from relay.db.outbox_insert import sqlite_moment as _sqlite_moment
from relay.db.tables import outbox

_DIALECT = sqlite.dialect()
_PROCESSOR = outbox.c.received_at.type.dialect_impl(_DIALECT).bind_processor(_DIALECT)


@given(
    moment=st.datetimes(
        min_value=datetime(2, 1, 1),
        max_value=datetime(9998, 12, 31),
        timezones=st.sampled_from(
            [UTC, timezone(timedelta(hours=-7)), timezone(timedelta(hours=9))]
        ),
    )
)
def test_sqlite_moment_is_the_text_sqlalchemy_would_store(moment: datetime) -> None:
    assert _PROCESSOR is not None
    assert _sqlite_moment(moment) == _PROCESSOR(moment)


def test_sqlite_moment_refuses_a_naive_datetime() -> None:
    with pytest.raises(ValueError, match="naive"):
        _sqlite_moment(datetime(2026, 1, 1))
