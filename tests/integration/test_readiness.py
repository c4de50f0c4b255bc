"""`/readyz` says why the database does not answer: the driver's message, the password
redacted, not only an exception's class (issue 10, item 10)."""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy.engine import make_url

from tests.conftest import make_settings
from tests.support import OutboxDatabase, running_receiver

PASSWORD = "Pw-Zk29Lq7Xv3"


def _readyz(settings: object) -> httpx.Response:
    with running_receiver(settings) as receiver:
        return httpx.get(receiver.url + "/readyz")


def test_readyz_shows_why_the_database_does_not_answer(sqlite_database: OutboxDatabase) -> None:
    # Port 9 on loopback: nothing listens there, the connection is refused at once.
    url = f"postgresql+asyncpg://relay:{PASSWORD}@127.0.0.1:9/none"
    response = _readyz(make_settings(sqlite_database, database_url=url))
    assert response.status_code == 503
    database = response.json()["database"]
    assert database.startswith("unreachable (ConnectionRefusedError: "), database
    assert "Connect call failed" in database
    assert PASSWORD not in response.text


@pytest.mark.postgres
def test_readyz_names_a_missing_database(postgres_database: OutboxDatabase) -> None:
    missing = postgres_database.url.rsplit("/", 1)[1] + "_missing"
    url = make_url(postgres_database.url).set(password=PASSWORD, database=missing)
    settings = make_settings(postgres_database, database_url=url.render_as_string(False))
    response = _readyz(settings)
    assert response.status_code == 503
    assert response.json()["database"] == f'unreachable (database "{missing}" does not exist)'
    assert PASSWORD not in response.text
