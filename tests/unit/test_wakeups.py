"""The drainer's wake-ups scheduled ahead, and which databases get a listener."""

from __future__ import annotations

import math

import anyio
import pytest

from relay.db.notify import connect_arguments, listener_for
from relay.drainer.wakeups import WakeSchedule

pytestmark = pytest.mark.anyio


async def test_each_moment_wakes_once_in_order_and_close_ones_are_merged() -> None:
    woken: list[float] = []
    schedule = WakeSchedule(lambda: woken.append(anyio.current_time()), resolution_seconds=0.05)
    async with anyio.create_task_group() as group:
        group.start_soon(schedule.run)
        started = anyio.current_time()
        schedule.wake_after(0.3)
        # Two moments in the same 50 ms step of the schedule, 0.15 to 0.2 s ahead, both earlier
        # than what `run` sleeps until: merged. (Chosen from the step's end, not as 0.1 and
        # 0.101 s from now, which straddle a step boundary one time in fifty.)
        step_end = math.ceil((anyio.current_time() + 0.1) / 0.05) * 0.05 + 0.05
        schedule.wake_after(step_end - 0.04 - anyio.current_time())
        schedule.wake_after(step_end - 0.01 - anyio.current_time())
        assert schedule.pending == 2
        await anyio.sleep(0.45)
        group.cancel_scope.cancel()
    offsets = [moment - started for moment in woken]
    assert len(offsets) == 2
    assert 0.1 <= offsets[0] < 0.25
    assert 0.3 <= offsets[1] < 0.45
    assert schedule.pending == 0


async def test_a_moment_in_the_past_wakes_at_once() -> None:
    woken = anyio.Event()
    schedule = WakeSchedule(woken.set)
    async with anyio.create_task_group() as group:
        group.start_soon(schedule.run)
        schedule.wake_after(-5)
        with anyio.fail_after(1):
            await woken.wait()
        group.cancel_scope.cancel()


def test_only_postgresql_gets_a_listener() -> None:
    assert listener_for("sqlite:///data/outbox.sqlite3", timeout_seconds=2.0) is None
    assert listener_for("postgresql://relay@db.internal/relay", timeout_seconds=2.0) is not None
    assert connect_arguments("postgresql://relay:pw@db.internal:6432/relay?ssl=require") == {
        "host": "db.internal",
        "port": 6432,
        "user": "relay",
        "password": "pw",
        "database": "relay",
        "ssl": "require",
    }
