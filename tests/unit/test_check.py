"""What start-up and `check` say about a database: its error's own message, the password
redacted, and why a schema is not usable (issue 10, items 9 and 10)."""

from __future__ import annotations

import sqlite3

from sqlalchemy import exc as sa_exc

from relay.check import schema_problem
from relay.db.errors import error_message
from relay.db.migrate import head_revision, known_revisions
from relay.db.store import SchemaState
from relay.logs import REDACTED


def test_a_database_error_is_the_drivers_message_without_sqlalchemys_wrapping() -> None:
    wrapped = sa_exc.OperationalError(
        "SELECT version_num FROM alembic_version",
        None,
        sqlite3.OperationalError("unable to open database file"),
    )
    assert "[SQL:" in str(wrapped)  # what the message was before: statement, link, class
    assert error_message(wrapped) == "unable to open database file"


def test_an_error_without_a_driver_keeps_its_class_and_the_password_is_redacted() -> None:
    password = "Pw-Zk29Lq7Xv3"
    error = ConnectionRefusedError(f"connect to relay:{password}@db:5432\nfailed")
    assert error_message(error, password) == (
        f"ConnectionRefusedError: connect to relay:{REDACTED}@db:5432 failed"
    )
    assert error_message(TimeoutError()) == "TimeoutError"


def test_schema_problems_say_what_to_do() -> None:
    head = head_revision()
    assert schema_problem(SchemaState(reachable=True, revision=head)) is None
    unmigrated = schema_problem(SchemaState(reachable=True, revision=None))
    assert unmigrated == "the database has no outbox schema yet: run `aircall-relay migrate`"
    older = min(known_revisions())
    assert schema_problem(SchemaState(reachable=True, revision=older)) == (
        f"the schema is at revision {older}, older than this version's {head}: run "
        "`aircall-relay migrate`"
    )
    newer = schema_problem(SchemaState(reachable=True, revision="9999"))
    assert newer is not None
    assert newer.startswith("the schema is at revision 9999, newer than this version knows")
    assert "aircall-relay migrate" not in newer
