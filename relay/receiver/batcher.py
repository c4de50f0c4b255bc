"""Group commit: concurrent webhooks share one transaction, each answered after that commit.

Requests put their event in a queue and wait on a future. One writer task takes whatever is
queued (up to `max_batch` events), writes it in one transaction, and resolves every future with
its row's outcome, or with the error that made the transaction fail, so that request can answer
503 knowing nothing of its event was written. While a transaction runs, new requests queue up
for the next one: under load, batches grow by themselves; when idle, a lone webhook is written
at once, with no added delay.

In between, at a steady moderate rate, a commit would often find only one or two requests that
arrived while the previous one ran, and pay a whole transaction (and its fsync) for each. So
when a commit has just ended, requests arrived meanwhile, and fewer than `linger_below` wait,
the writer lingers `linger_seconds` (2 ms) for more to join before it begins. At half the
saturating rate that halves the commits and cuts the receiver's CPU per webhook by a tenth or
more, for two milliseconds of latency. It never applies after an idle spell (that webhook is
written at once) nor when the queue is already long (the next commit is full anyway).

A request that is cancelled while it waits (its client went away) cancels only its own future:
the write belongs to the writer task, so the transaction it shares with others goes on, its
event included.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
Outcome = TypeVar("Outcome")


class BatcherClosed(RuntimeError):
    """The batcher is stopping and takes no more work."""


class BatcherOverloaded(RuntimeError):
    """More requests are waiting for a commit than the batcher accepts."""


class CommitBatcher(Generic[Item, Outcome]):
    """`on_batch`, if given, is called after each successful write with the number of items it
    held and the seconds it took (for metrics)."""

    def __init__(
        self,
        write: Callable[[Sequence[Item]], Awaitable[Sequence[Outcome]]],
        max_batch: int = 256,
        max_waiting: int = 10_000,
        on_batch: Callable[[int, float], None] | None = None,
        linger_seconds: float = 0.002,
        linger_below: int = 16,
    ) -> None:
        self._write = write
        self._max_batch = max_batch
        self._max_waiting = max_waiting
        self._on_batch = on_batch
        self._linger_seconds = linger_seconds
        self._linger_below = linger_below
        self._queue: list[tuple[Item, asyncio.Future[Outcome]]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self.batches_written = 0
        self.largest_batch = 0

    @property
    def waiting(self) -> int:
        """Items submitted and not yet taken into a write."""
        return len(self._queue)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run(), name="commit-batcher")

    async def submit(self, item: Item) -> Outcome:
        if self._closing or self._loop is None:
            raise BatcherClosed("the receiver is shutting down")
        if len(self._queue) >= self._max_waiting:
            raise BatcherOverloaded(f"{len(self._queue)} webhooks already wait for a commit")
        future: asyncio.Future[Outcome] = self._loop.create_future()
        # If the waiting request is cancelled, nobody reads the outcome: mark it read.
        future.add_done_callback(_consume_exception)
        self._queue.append((item, future))
        if not self._wakeup.is_set():
            self._wakeup.set()
        return await future

    async def _run(self) -> None:
        busy = False  # the previous commit just ended and requests arrived meanwhile
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                busy = False
                continue
            if (
                busy
                and self._linger_seconds > 0
                and len(self._queue) < self._linger_below
                and not self._closing
            ):
                await asyncio.sleep(self._linger_seconds)
            batch = self._queue[: self._max_batch]
            del self._queue[: self._max_batch]
            await self._write_batch(batch)
            busy = True

    async def _write_batch(self, batch: list[tuple[Item, asyncio.Future[Outcome]]]) -> None:
        started = time.perf_counter()
        try:
            outcomes = await self._write([item for item, _ in batch])
        except Exception as error:  # every waiter gets the error and answers 503
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        self.batches_written += 1
        if len(batch) > self.largest_batch:
            self.largest_batch = len(batch)
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if not future.done():
                future.set_result(outcome)
        if self._on_batch is not None:
            self._on_batch(len(batch), time.perf_counter() - started)

    async def close(self) -> None:
        """Take no more work, finish what is queued, and stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task


def _consume_exception(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
