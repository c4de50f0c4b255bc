"""Database errors told apart: one row's values, or the database's; and what an operator reads
of one. For every writer of the relay, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import sqlite3
from typing import Final

from sqlalchemy import exc as sa_exc

from relay.logs import REDACTED

# Errors that concern the values of one row, not the database: SQLite's primary result codes
# CONSTRAINT (a constraint or a trigger's RAISE), TOOBIG and MISMATCH; PostgreSQL's SQLSTATE
# classes 22 (data exception: a NUL byte, a value too long for its column), 23 (integrity
# constraint violation), 54 (program limit exceeded: an index entry too large) and P0 (a
# PL/pgSQL RAISE). Anything else (locked, busy, read-only, full, I/O, connection, timeout, a
# missing table, an unknown error) is taken as the database's, for every row alike.
_SQLITE_ROW_CODES: Final = frozenset(
    {sqlite3.SQLITE_CONSTRAINT, sqlite3.SQLITE_TOOBIG, sqlite3.SQLITE_MISMATCH}
)
_POSTGRES_ROW_CLASSES: Final = frozenset({"22", "23", "54", "P0"})


def row_specific_error(error: BaseException) -> bool:
    """Whether a failed write failed because of one row's values (another group of rows could
    succeed), rather than because of the database (every write fails alike)."""
    if isinstance(error, sa_exc.DBAPIError):
        if isinstance(error.orig, sqlite3.Error):
            return sqlite_row_specific(error.orig)
        code = sqlstate(error)
        return code is not None and code[:2] in _POSTGRES_ROW_CLASSES
    # A value that the driver cannot convert, raised before anything reached the database.
    return isinstance(error, ValueError)


def sqlite_row_specific(error: sqlite3.Error) -> bool:
    """`row_specific_error` for an error of the `sqlite3` module itself."""
    code = getattr(error, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF in _SQLITE_ROW_CODES


def sqlstate(error: sa_exc.DBAPIError) -> str | None:
    """PostgreSQL's SQLSTATE of a driver error (None for another database's)."""
    code = getattr(error.orig, "sqlstate", None)
    return code if isinstance(code, str) else None


def error_message(error: BaseException, password: str | None = None) -> str:
    """What an operator needs of a database error, on one line: the driver's own message
    (`database "x" does not exist`), without SQLAlchemy's wrapping (class, statement, link),
    and with `password` (the URL's) replaced wherever it appears."""
    cause = error.orig if isinstance(error, sa_exc.DBAPIError) else None
    if cause is not None and str(cause):
        text = str(cause)
    else:
        text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    if password:
        text = text.replace(password, REDACTED)
    return " ".join(text.split())
