"""Log redaction: secrets never reach the output, by key or by value."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os

import pytest

from relay.logs import REDACTED, Redactor, configure_logging, get_logger
from relay.receiver.serve import bind_socket, hypercorn_config
from relay.settings import Settings


def test_redactor_by_key_and_by_value() -> None:
    redactor = Redactor(["s3cr3t-token-value"])
    event = redactor(
        None,
        "info",
        {
            "event": "x",
            "token": "anything",
            "detail": "bad token s3cr3t-token-value here",
            "nested": {"write_key": "k", "list": ["s3cr3t-token-value"]},
        },
    )
    assert event["token"] == REDACTED
    assert event["detail"] == f"bad token {REDACTED} here"
    assert event["nested"] == {"write_key": REDACTED, "list": [REDACTED]}


def test_configured_logging_writes_json_without_secrets() -> None:
    stream = io.StringIO()
    configure_logging("json", "info", secrets=["tok-abcdefghijklmnop"], stream=stream)
    get_logger("test").info("webhook", detail="tok-abcdefghijklmnop leaked", token="x")
    logging.getLogger("hypercorn.error").warning("stdlib says tok-abcdefghijklmnop")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["event"] == "webhook"
    assert lines[0]["level"] == "info"
    assert "tok-abcdefghijklmnop" not in stream.getvalue()
    assert len(lines) == 2


def test_a_library_traceback_is_redacted() -> None:
    """A standard-library record with a traceback (asyncio's, Hypercorn's): the traceback is
    rendered before the redactor runs, so a secret in the exception's message is redacted."""
    secret = "wk_traceback_secret_0123456789"
    for log_format in ("json", "console"):
        stream = io.StringIO()
        configure_logging(log_format, "info", secrets=[secret], stream=stream)
        try:
            raise RuntimeError(f"the database said {secret}")
        except RuntimeError:
            logging.getLogger("asyncio").exception("Task exception was never retrieved")
        output = stream.getvalue()
        assert secret not in output, log_format
        assert f"RuntimeError: the database said {REDACTED}" in output, log_format
        assert "Traceback (most recent call last)" in output, log_format


def test_hypercorn_errors_are_written_once_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    """Hypercorn's error log goes through the relay's handler only: one JSON line, redacted,
    traceback included; never a second, plain copy of its own on stderr."""
    secret = "wk_hypercorn_secret_0123456789"
    stream = io.StringIO()
    configure_logging("json", "info", secrets=[secret], stream=stream)
    sock = bind_socket("127.0.0.1", 0)
    config = hypercorn_config(Settings(), sock)
    try:
        error = RuntimeError(f"a request carried {secret}")
        asyncio.run(config.log.exception("Error in ASGI Framework", exc_info=error))
    finally:
        for bind in config.bind:  # the socket, detached into Hypercorn's configuration
            os.close(int(bind.removeprefix("fd://")))
    assert capsys.readouterr() == ("", "")  # nothing besides the relay's own output
    output = stream.getvalue()
    assert secret not in output
    [line] = [json.loads(line) for line in output.splitlines()]
    assert line["event"] == "Error in ASGI Framework"
    assert line["level"] == "error"
    assert f"RuntimeError: a request carried {REDACTED}" in line["exception"]
