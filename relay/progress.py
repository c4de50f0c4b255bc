"""Progress of a long command (`outbox copy`, `outbox purge`), on stderr, never on stdout.

The work reports `(what, done, total)` after each batch (`ProgressCallback`); `ProgressDisplay`
shows it: on a terminal, one line per kind of work rewritten in place (a bar and the count);
otherwise (a pipe, a file, the journal) a plain line when the work starts, one every
`interval` seconds, and one when it ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final, TextIO

# (what, done so far, total or None when unknown), after each batch and once before the first.
ProgressCallback = Callable[[str, int, int | None], None]

PLAIN_INTERVAL_SECONDS: Final[float] = 10.0
_REDRAW_SECONDS: Final[float] = 0.1
_BAR_CELLS: Final[int] = 20


class ProgressDisplay:
    """A ProgressCallback that writes to `stream`; `close()` ends its last line."""

    def __init__(
        self,
        stream: TextIO,
        *,
        terminal: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        interval: float = PLAIN_INTERVAL_SECONDS,
    ) -> None:
        self.stream = stream
        self.terminal = stream.isatty() if terminal is None else terminal
        self.clock = clock
        self.interval = _REDRAW_SECONDS if self.terminal else interval
        self._what: str | None = None
        self._latest = ""  # the last state reported for `_what`
        self._shown = ""  # the last state shown (the line on a terminal)
        self._last = 0.0

    def __call__(self, what: str, done: int, total: int | None) -> None:
        now = self.clock()
        if what != self._what:
            self.close()
            self._what = what
            due = True
        else:  # the end of the work (done == total) is always shown
            due = done == total or now - self._last >= self.interval
        self._latest = _describe(what, done, total, bar=self.terminal)
        if due:
            self._show(now)

    def close(self) -> None:
        """Show the last state reported if it was not, and end a terminal's line, so that what
        follows starts on a line of its own."""
        if self._latest != self._shown:
            self._show(self.clock())
        if self.terminal and self._shown:
            self.stream.write("\n")
            self.stream.flush()
        self._what = None
        self._shown = self._latest = ""

    def _show(self, now: float) -> None:
        text = self._latest
        if text == self._shown:
            return
        self._last = now
        if self.terminal:  # back to the start of the line (a count only grows: no blanks needed)
            self.stream.write("\r" + text)
        else:
            self.stream.write(text + "\n")
        self._shown = text
        self.stream.flush()


def _describe(what: str, done: int, total: int | None, *, bar: bool) -> str:
    if total is None:
        return f"{what}: {done:,}"
    fraction = 1.0 if total <= 0 else min(done / total, 1.0)
    count = f"{what}: {done:,} of {total:,} ({int(fraction * 100)}%)"
    if not bar:
        return count
    filled = int(fraction * _BAR_CELLS)
    return f"[{'#' * filled}{'.' * (_BAR_CELLS - filled)}] {count}"
