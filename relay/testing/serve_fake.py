"""Serve a fake from the command line (`aircall-relay fake-segment`, `fake-aircall`) until SIGTERM
or SIGINT."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from typing import Protocol


class _Fake(Protocol):
    @property
    def base_url(self) -> str: ...

    def start(self) -> object: ...

    def stop(self) -> None: ...


def serve_until_signalled(
    fake: _Fake, name: str, host: str, port: int, on_ready: Callable[[], None] | None = None
) -> int:
    """Start `fake`, print `NAME listening on http://HOST:PORT`, run `on_ready`, then serve until
    SIGTERM or SIGINT and exit 0 (1 when the address cannot be bound)."""
    try:
        fake.start()
    except OSError as error:
        print(f"{name}: cannot listen on {host}:{port}: {error}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signal_number, lambda *_: stop.set())
    print(f"{name} listening on {fake.base_url}", flush=True)
    if on_ready is not None:
        on_ready()
    while not stop.wait(1.0):
        pass
    fake.stop()
    return 0
