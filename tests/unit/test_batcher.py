"""Group commit: batches form under concurrency; each waiter gets its own outcome or the error;
a row refused fails only itself; the writer is supervised and no wait is unbounded."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from relay.receiver.batcher import (
    BatcherClosed,
    BatcherOverloaded,
    BatcherTimedOut,
    CommitBatcher,
    WriterCrashed,
)

pytestmark = pytest.mark.anyio


class Recorder:
    """A write function that records the batches it was given and can be made to fail."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.fail_next = False
        self.gate = asyncio.Event()
        self.gate.set()

    async def write(self, items: Sequence[int]) -> list[str]:
        await self.gate.wait()
        self.batches.append(list(items))
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("database is locked")
        return [f"row-{item}" for item in items]


async def test_concurrent_submissions_share_a_write_and_get_their_own_outcome() -> None:
    recorder = Recorder()
    batcher: CommitBatcher[int, str] = CommitBatcher(recorder.write, max_batch=100)
    batcher.start()
    recorder.gate.clear()
    first = asyncio.create_task(batcher.submit(0))
    await asyncio.sleep(0)  # the writer takes item 0 and waits on the gate
    others = [asyncio.create_task(batcher.submit(n)) for n in range(1, 30)]
    await asyncio.sleep(0)
    recorder.gate.set()
    results = await asyncio.gather(first, *others)
    assert results == [f"row-{n}" for n in range(30)]
    assert recorder.batches == [[0], list(range(1, 30))]
    await batcher.close()


async def test_max_batch_splits_large_queues() -> None:
    recorder = Recorder()
    batcher: CommitBatcher[int, str] = CommitBatcher(recorder.write, max_batch=10)
    batcher.start()
    results = await asyncio.gather(*(batcher.submit(n) for n in range(35)))
    assert results == [f"row-{n}" for n in range(35)]
    assert all(len(batch) <= 10 for batch in recorder.batches)
    assert sorted(item for batch in recorder.batches for item in batch) == list(range(35))
    await batcher.close()


async def test_a_failed_write_fails_every_waiter_of_that_batch_only() -> None:
    recorder = Recorder()
    batcher: CommitBatcher[int, str] = CommitBatcher(recorder.write)
    batcher.start()
    recorder.fail_next = True
    with pytest.raises(RuntimeError, match="locked"):
        await batcher.submit(1)
    assert await batcher.submit(2) == "row-2"
    await batcher.close()


async def test_close_finishes_queued_work_then_refuses() -> None:
    recorder = Recorder()
    batcher: CommitBatcher[int, str] = CommitBatcher(recorder.write)
    batcher.start()
    recorder.gate.clear()
    pending = [asyncio.create_task(batcher.submit(n)) for n in range(5)]
    await asyncio.sleep(0)
    closing = asyncio.create_task(batcher.close())
    await asyncio.sleep(0)
    recorder.gate.set()
    await closing
    assert [task.result() for task in pending] == [f"row-{n}" for n in range(5)]
    with pytest.raises(BatcherClosed):
        await batcher.submit(9)


async def test_overload_is_refused_not_queued_without_bound() -> None:
    recorder = Recorder()
    batcher: CommitBatcher[int, str] = CommitBatcher(recorder.write, max_batch=1, max_waiting=3)
    batcher.start()
    recorder.gate.clear()
    tasks = [asyncio.create_task(batcher.submit(n)) for n in range(3)]
    while batcher.waiting != 2:  # the writer took one and is held at the gate
        await asyncio.sleep(0)
    tasks.append(asyncio.create_task(batcher.submit(3)))
    while batcher.waiting != 3:
        await asyncio.sleep(0)
    with pytest.raises(BatcherOverloaded):
        await batcher.submit(99)
    recorder.gate.set()
    await asyncio.gather(*tasks)
    await batcher.close()


async def test_a_cancelled_waiter_does_not_cancel_the_shared_write() -> None:
    recorder = Recorder()
    batcher: CommitBatcher[int, str] = CommitBatcher(recorder.write)
    batcher.start()
    recorder.gate.clear()
    doomed = asyncio.create_task(batcher.submit(1))
    survivor = asyncio.create_task(batcher.submit(2))
    await asyncio.sleep(0)
    doomed.cancel()
    recorder.gate.set()
    assert await survivor == "row-2"
    assert [1] in recorder.batches or [1, 2] in recorder.batches
    await batcher.close()


# --- one row the database refuses fails only itself (issue 10, fault 1) -----------------------


class RowError(Exception):
    """Stands for an error of one row's values (a constraint)."""


class DatabaseError(Exception):
    """Stands for an error of the database as a whole (locked, read-only, full)."""


class Table:
    """A write function over a dict, one transaction per call: refuses the whole call when one
    of its items is poisoned (`RowError`) or while `down` (`DatabaseError`), and then writes
    nothing of it; counts copies of one item like the store (new exactly when the count after
    the write equals the copies written in it)."""

    def __init__(self, poisoned: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.poisoned = poisoned
        self.counts: dict[str, int] = {}
        self.calls: list[list[str]] = []
        self.down_after: int | None = None  # calls made before the database goes down

    async def write(self, items: Sequence[str]) -> list[tuple[str, bool, int]]:
        self.calls.append(list(items))
        await asyncio.sleep(0)
        if self.down_after is not None and len(self.calls) > self.down_after:
            raise DatabaseError("attempt to write a readonly database")
        bad = [item for item in items if item in self.poisoned]
        if bad:
            raise RowError(f"refused {bad[0]}")
        copies: dict[str, int] = {}
        for item in items:
            copies[item] = copies.get(item, 0) + 1
        for item, n in copies.items():
            self.counts[item] = self.counts.get(item, 0) + n
        seen: set[str] = set()
        outcomes = []
        for item in items:
            new = item not in seen and self.counts[item] == copies[item]
            seen.add(item)
            outcomes.append((item, new, self.counts[item]))
        return outcomes


def row_error(error: Exception) -> bool:
    return isinstance(error, RowError)


def table_batcher(table: Table, **options: Any) -> CommitBatcher[str, tuple[str, bool, int]]:
    return CommitBatcher(
        table.write, key=lambda item: item, row_specific=row_error, linger_seconds=0, **options
    )


async def submit_together(
    batcher: CommitBatcher[str, tuple[str, bool, int]], items: list[str]
) -> list[Any]:
    """Submit `items` at once: they are all queued before the writer, woken by the first,
    runs, so they form one batch."""
    return await asyncio.gather(*(batcher.submit(item) for item in items), return_exceptions=True)


async def test_a_row_refused_in_a_batch_fails_alone_and_the_others_are_written() -> None:
    table = Table(poisoned={"bad"})
    batcher = table_batcher(table)
    batcher.start()
    items = ["a", "b", "bad", "a", "c", "bad", "a"]
    results = await submit_together(batcher, items)
    assert await batcher.writable() is None  # a row's error says nothing of the database
    await batcher.close()
    assert table.calls[0] == items  # one batch, refused as a whole
    # then each event alone, its copies together, in order of first appearance
    assert table.calls[1:] == [["a", "a", "a"], ["b"], ["bad", "bad"], ["c"]]
    assert results[0] == ("a", True, 3)
    assert results[3] == results[6] == ("a", False, 3)  # duplicates of the first copy
    assert results[1] == ("b", True, 1)
    assert results[4] == ("c", True, 1)
    for index in (2, 5):
        assert isinstance(results[index], RowError)
    assert table.counts == {"a": 3, "b": 1, "c": 1}


async def test_an_error_of_the_database_is_not_retried_row_by_row() -> None:
    table = Table()
    table.down_after = 0
    batcher = table_batcher(table)
    batcher.start()
    results = await submit_together(batcher, ["a", "b", "c"])
    assert [type(result) for result in results] == [DatabaseError] * 3
    assert table.calls == [["a", "b", "c"]]
    assert await batcher.writable() == "DatabaseError: attempt to write a readonly database"
    await batcher.close()


async def test_the_row_by_row_pass_stops_at_an_error_of_the_database() -> None:
    table = Table(poisoned={"bad"})
    table.down_after = 2  # the batch, then "a" alone; then the database goes down
    batcher = table_batcher(table)
    batcher.start()
    results = await submit_together(batcher, ["a", "bad", "b", "c"])
    await batcher.close()
    assert table.calls == [["a", "bad", "b", "c"], ["a"], ["bad"]]
    assert results[0] == ("a", True, 1)
    assert [type(result) for result in results[1:]] == [DatabaseError] * 3
    assert table.counts == {"a": 1}


async def test_the_row_by_row_pass_skips_events_nobody_waits_for_any_more() -> None:
    table = Table(poisoned={"bad"})
    batcher = table_batcher(table)
    batcher.start()
    tasks = [asyncio.create_task(batcher.submit(item)) for item in ("bad", "gone", "b")]
    await asyncio.sleep(0)  # all three queued; the writer has not run yet
    tasks[1].cancel()  # its client went away
    results = await asyncio.gather(*tasks, return_exceptions=True)
    await batcher.close()
    assert table.calls == [["bad", "gone", "b"], ["bad"], ["b"]]
    assert isinstance(results[0], RowError)
    assert results[2] == ("b", True, 1)
    assert "gone" not in table.counts


# --- supervision and bounded waits (issue 10, fault 3) ----------------------------------------


class Crash(BaseException):
    """Anything other than an Exception, out of a write."""


@pytest.mark.parametrize("crash", [Crash("boom"), asyncio.CancelledError()], ids=repr)
async def test_a_write_raising_something_other_than_an_exception_fails_its_batch_only(
    crash: BaseException,
) -> None:
    recorder = Recorder()
    calls = 0

    async def write(items: Sequence[int]) -> list[str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise crash
        return await recorder.write(items)

    batcher: CommitBatcher[int, str] = CommitBatcher(write, restart_seconds=0.05)
    batcher.start()
    with pytest.raises(WriterCrashed):
        await batcher.submit(1)
    while batcher.writer_restarts == 0:  # the task ends just after failing its batch
        await asyncio.sleep(0)
    assert await batcher.writable() == "the commit writer is not running (it is being restarted)"
    assert await batcher.submit(2) == "row-2"  # waits for the restarted writer
    assert batcher.running
    assert await batcher.writable() is None
    await batcher.close()


async def test_a_failing_on_batch_callback_changes_nothing_else() -> None:
    recorder = Recorder()

    def on_batch(count: int, seconds: float) -> None:
        raise ZeroDivisionError("metrics broke")

    batcher: CommitBatcher[int, str] = CommitBatcher(recorder.write, on_batch=on_batch)
    batcher.start()
    assert await batcher.submit(1) == "row-1"
    assert await batcher.submit(2) == "row-2"
    assert batcher.running and batcher.writer_restarts == 0
    await batcher.close()


async def test_no_request_waits_longer_than_the_bound() -> None:
    recorder = Recorder()
    recorder.gate.clear()  # the write hangs
    batcher: CommitBatcher[int, str] = CommitBatcher(recorder.write, wait_seconds=0.2)
    batcher.start()
    first = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0)  # the writer takes item 1 and hangs in its write
    second = asyncio.create_task(batcher.submit(2))
    with pytest.raises(BatcherTimedOut, match="may still be committed"):
        await first
    with pytest.raises(BatcherTimedOut, match="was not written"):
        await second
    assert batcher.waiting == 0  # item 2 left the queue: it will never be written
    recorder.gate.set()
    assert await batcher.submit(3) == "row-3"
    await batcher.close()
    assert recorder.batches == [[1], [3]]


async def test_until_a_write_succeeds_readiness_asks_the_probe() -> None:
    recorder = Recorder()
    probes: list[str] = []
    probe_fails = True

    async def probe() -> None:
        probes.append("probe")
        if probe_fails:
            raise RuntimeError("attempt to write a readonly database")

    batcher: CommitBatcher[int, str] = CommitBatcher(recorder.write, probe=probe)
    batcher.start()
    assert await batcher.writable() == "RuntimeError: attempt to write a readonly database"
    probe_fails = False
    assert await batcher.writable() is None
    assert await batcher.writable() is None  # known good: no probe
    assert probes == ["probe", "probe"]
    recorder.fail_next = True
    with pytest.raises(RuntimeError):
        await batcher.submit(1)
    assert await batcher.writable() is None  # the probe says writes work again
    assert probes == ["probe"] * 3
    await batcher.close()
