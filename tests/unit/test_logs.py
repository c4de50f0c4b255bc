"""Log redaction: secrets never reach the output, by key or by value."""

from __future__ import annotations

import io
import json
import logging

from relay.logs import REDACTED, Redactor, configure_logging, get_logger


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
