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


def test_json_lines_hold_what_orjson_refuses_and_stay_redacted() -> None:
    """Lines are written by orjson where it can (docs/performance.md); an integer beyond 64 bits,
    a lone surrogate or an object JSON has no type for is still written, by the standard
    library, and a secret inside any of them, or inside a str subclass, is still redacted."""

    class Text(str):
        pass

    secret = "tok-orjson-fallback-0123456789"
    stream = io.StringIO()
    configure_logging("json", "info", secrets=[secret], stream=stream)
    log = get_logger("test")
    log.info("big", id=2**70, detail=f"{secret} in a big line")
    log.info("surrogate", value="a\ud800b", detail=Text(f"sub {secret}"))
    log.info("object", value=object(), count=3, ratio=0.5, flag=True, nothing=None)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["id"] == 2**70
    assert lines[0]["detail"] == f"{REDACTED} in a big line"
    assert lines[1]["value"] == "a\ud800b"
    assert lines[1]["detail"] == f"sub {REDACTED}"
    assert lines[2]["value"].startswith("<object object at")
    assert (lines[2]["count"], lines[2]["ratio"], lines[2]["flag"]) == (3, 0.5, True)
    assert lines[2]["nothing"] is None
    assert secret not in stream.getvalue()
