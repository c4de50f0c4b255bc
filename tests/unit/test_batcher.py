"""Group commit: batches form under concurrency; each waiter gets its own outcome or the error."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from relay.receiver.batcher import BatcherClosed, BatcherOverloaded, CommitBatcher

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
