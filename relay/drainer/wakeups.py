"""Wake-ups scheduled ahead for the drainer's claim loop: the moment rows announced by a
notification have settled, the moment a retry falls due. One background task sleeps until the
earliest and calls `wake`; the loop otherwise waits its poll interval.

Moments are rounded up to `resolution_seconds` and kept once each, so a stream of
notifications (one per receiver commit) keeps at most settle / resolution moments pending,
and each wake-up comes at most that late.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable

import anyio


class WakeSchedule:
    def __init__(self, wake: Callable[[], None], resolution_seconds: float = 0.05) -> None:
        self._wake = wake
        self._resolution = resolution_seconds
        self._moments: list[float] = []  # a heap of anyio.current_time() values
        self._pending: set[float] = set()
        self._changed = anyio.Event()

    @property
    def pending(self) -> int:
        return len(self._moments)

    def wake_after(self, seconds: float) -> None:
        """Call `wake` in `seconds` (at once for 0 or less). Call it on the event loop."""
        at = anyio.current_time() + max(seconds, 0.0)
        at = math.ceil(at / self._resolution) * self._resolution
        if at in self._pending:
            return
        self._pending.add(at)
        heapq.heappush(self._moments, at)
        if self._moments[0] == at:  # earlier than what `run` sleeps until
            self._changed.set()

    async def run(self) -> None:
        """Call `wake` at each scheduled moment, until cancelled."""
        while True:
            self._changed = anyio.Event()
            now = anyio.current_time()
            due = False
            while self._moments and self._moments[0] <= now:
                self._pending.discard(heapq.heappop(self._moments))
                due = True
            if due:
                self._wake()
            delay = self._moments[0] - now if self._moments else math.inf
            with anyio.move_on_after(delay):
                await self._changed.wait()
