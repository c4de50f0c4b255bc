"""Progress of long commands (issue 10, fault 15): a line rewritten in place on a terminal,
plain lines at an interval otherwise, each state of the work's end always shown."""

from __future__ import annotations

import io

from relay.progress import ProgressDisplay


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_at_the_start_every_interval_and_at_the_end() -> None:
    out, clock = io.StringIO(), Clock()
    progress = ProgressDisplay(out, terminal=False, clock=clock, interval=10)
    progress("outbox rows", 0, 3_000)
    clock.now = 4
    progress("outbox rows", 1_000, 3_000)  # not due
    clock.now = 10.5
    progress("outbox rows", 2_000, 3_000)
    clock.now = 11
    progress("outbox rows", 3_000, 3_000)  # the end: always shown
    progress("delivery requests", 0, 0)
    progress.close()
    assert out.getvalue().splitlines() == [
        "outbox rows: 0 of 3,000 (0%)",
        "outbox rows: 2,000 of 3,000 (66%)",
        "outbox rows: 3,000 of 3,000 (100%)",
        "delivery requests: 0 of 0 (100%)",
    ]


def test_without_a_total_the_last_count_is_shown_when_closed() -> None:
    out, clock = io.StringIO(), Clock()
    progress = ProgressDisplay(out, terminal=False, clock=clock, interval=10)
    progress("rows", 0, None)
    clock.now = 1
    progress("rows", 500, None)
    assert out.getvalue() == "rows: 0\n"
    progress.close()
    progress.close()  # nothing more to show
    assert out.getvalue() == "rows: 0\nrows: 500\n"


def test_a_terminal_line_is_rewritten_in_place_and_ended_once() -> None:
    out, clock = io.StringIO(), Clock()
    progress = ProgressDisplay(out, terminal=True, clock=clock)
    progress("outbox rows", 0, 40)
    clock.now = 0.05
    progress("outbox rows", 10, 40)  # redrawn at most every 0.1 s
    clock.now = 0.2
    progress("outbox rows", 20, 40)
    progress("outbox rows", 40, 40)
    progress("delivery requests", 5, 5)
    progress.close()
    assert out.getvalue() == (
        "\r[....................] outbox rows: 0 of 40 (0%)"
        "\r[##########..........] outbox rows: 20 of 40 (50%)"
        "\r[####################] outbox rows: 40 of 40 (100%)\n"
        "\r[####################] delivery requests: 5 of 5 (100%)\n"
    )


def test_a_terminal_is_recognised_by_the_stream() -> None:
    assert ProgressDisplay(io.StringIO()).terminal is False

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert ProgressDisplay(Terminal()).terminal is True
