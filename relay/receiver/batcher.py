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
the writer lingers `linger_seconds` (2 ms) for more to join before it begins: fewer commits,
so less CPU per webhook, for that much latency (docs/performance.md has the figures). It never
applies after an idle spell (that webhook is
written at once) nor when the queue is already long (the next commit is full anyway).

One row the database refuses must not fail its neighbours. When a batch's transaction fails
with an error that `row_specific` says concerns one row's values (a constraint, a value the
column cannot hold), the batch is written again one event at a time (`key` groups the copies of
one event, written together so that the duplicate accounting stays right), each in a
transaction of its own: only the events that fail alone get the error. An error of the
database as a whole (locked, unreachable, read-only, full) is not retried row by row: the whole
batch gets it at once, as would each of its rows. The row-by-row pass stops at the first such
error (that event and the ones after it get it), and skips the events whose every request has
already stopped waiting (timed out or gone): its cost is bounded by the requests' wait.

No request waits longer than `wait_seconds`: past that it gets `BatcherTimedOut` (503). An
event still queued is then taken out of the queue, so nothing of it is written; one whose
transaction was already running may still be committed, and Aircall's retry then finds it
(200, duplicate).

The writer task is supervised. An error of a write fails that batch's requests; anything else
that ends the task (a `BaseException` from a write, a bug) fails the requests of the batch in
hand, is logged at error level (`commit_writer_crashed`) and the task is started again after
`restart_seconds`, while queued requests wait (within their bound). A failing `on_batch`
callback (metrics) is logged and changes nothing else.

`writable()` tells readiness whether a write can happen: yes after a successful write; no while
the writer is down or since a write failed for a reason of the whole database. Until a write
has succeeded (at start, after a failure), it asks `probe`, a write of its own.

A request that is cancelled while it waits (its client went away) cancels only its own future:
the write belongs to the writer task, so the transaction it shares with others goes on, its
event included.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any, Generic, TypeVar

from relay.logs import get_logger

Item = TypeVar("Item")
Outcome = TypeVar("Outcome")

log = get_logger("relay.receiver")


class BatcherUnavailable(RuntimeError):
    """The batcher cannot take or finish this item now; nothing of it was written, or (a time
    out while its transaction ran) it may have been: either way the sender should retry."""


class BatcherClosed(BatcherUnavailable):
    """The batcher is stopping and takes no more work."""


class BatcherOverloaded(BatcherUnavailable):
    """More requests are waiting for a commit than the batcher accepts."""


class BatcherTimedOut(BatcherUnavailable):
    """The item waited `wait_seconds` for its commit."""


class WriterCrashed(BatcherUnavailable):
    """The writer task ended while it held the item's batch (it is being restarted)."""


class _Waiter(Generic[Item, Outcome]):
    """One submitted item and the future its request waits on (compared by identity)."""

    __slots__ = ("future", "item")

    def __init__(self, item: Item, future: asyncio.Future[Outcome]) -> None:
        self.item = item
        self.future = future


def describe(error: BaseException) -> str:
    """An error in one line for logs and `/readyz`: its class and the driver's message (a
    database error's own message, without SQLAlchemy's statement and link)."""
    message = str(getattr(error, "orig", None) or error).strip().splitlines()
    return f"{type(error).__name__}: {message[0]}" if message else type(error).__name__


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
        *,
        wait_seconds: float = 5.0,
        key: Callable[[Item], Hashable] | None = None,
        row_specific: Callable[[Exception], bool] | None = None,
        probe: Callable[[], Awaitable[None]] | None = None,
        restart_seconds: float = 1.0,
    ) -> None:
        self._write = write
        self._max_batch = max_batch
        self._max_waiting = max_waiting
        self._on_batch = on_batch
        self._linger_seconds = linger_seconds
        self._linger_below = linger_below
        self._wait_seconds = wait_seconds
        self._key: Callable[[Item], Hashable] = key or id
        self._row_specific = row_specific or _never
        self._probe = probe
        self._restart_seconds = restart_seconds
        self._queue: list[_Waiter[Item, Outcome]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._restart: asyncio.TimerHandle | None = None
        self._probing: asyncio.Task[str | None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        # Why writes fail for the database as a whole (None: the last write worked, or none was
        # made yet); `_verified` once a write has succeeded since the last such failure.
        self._failure: BaseException | None = None
        self._verified = False
        self.in_flight = 0  # items of the write under way
        self.batches_written = 0
        self.largest_batch = 0
        self.writer_restarts = 0

    @property
    def waiting(self) -> int:
        """Items submitted and not yet taken into a write."""
        return len(self._queue)

    @property
    def running(self) -> bool:
        """Whether the writer task is alive (False while it waits to be restarted)."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._start_writer()

    def _start_writer(self) -> None:
        assert self._loop is not None
        self._restart = None
        self._task = self._loop.create_task(self._run(), name="commit-batcher")
        self._task.add_done_callback(self._writer_ended)

    async def submit(self, item: Item) -> Outcome:
        if self._closing or self._loop is None:
            raise BatcherClosed("the receiver is shutting down")
        if len(self._queue) >= self._max_waiting:
            raise BatcherOverloaded(f"{len(self._queue)} webhooks already wait for a commit")
        future: asyncio.Future[Outcome] = self._loop.create_future()
        # If the waiting request is cancelled, nobody reads the outcome: mark it read.
        future.add_done_callback(_consume_exception)
        waiter = _Waiter(item, future)
        self._queue.append(waiter)
        if not self._wakeup.is_set():
            self._wakeup.set()
        try:
            async with asyncio.timeout(self._wait_seconds):
                return await future
        except TimeoutError:
            try:
                self._queue.remove(waiter)
            except ValueError:  # taken into a transaction that has not ended
                raise BatcherTimedOut(
                    f"no commit within {self._wait_seconds:g} s; the event may still be "
                    "committed, and is then found again as a duplicate"
                ) from None
            raise BatcherTimedOut(
                f"no commit within {self._wait_seconds:g} s; the event was not written"
            ) from None

    async def writable(self) -> str | None:
        """None when a write can happen, else why not (for readiness); see the module's doc."""
        if not self.running:
            return "the commit writer is not running (it is being restarted)"
        if self._failure is None and self._verified:
            return None
        if self._probe is None:
            return None if self._failure is None else describe(self._failure)
        if self._probing is None:  # one probe at a time, shared by the callers meanwhile
            assert self._loop is not None
            self._probing = self._loop.create_task(self._run_probe(), name="commit-probe")
        return await asyncio.shield(self._probing)

    async def _run_probe(self) -> str | None:
        assert self._probe is not None
        try:
            async with asyncio.timeout(self._wait_seconds):
                await self._probe()
        except Exception as error:  # readiness reports it, it never raises
            self._failure = error
            self._verified = False
            return describe(error)
        finally:
            self._probing = None
        self._written()
        return None

    def _written(self) -> None:
        self._failure = None
        self._verified = True

    def _failed(self, error: BaseException) -> None:
        self._failure = error
        self._verified = False

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
            self.in_flight = len(batch)
            try:
                await self._write_batch(batch)
            finally:  # whatever ended the write, no request of the batch waits on
                self.in_flight = 0
                _fail(batch, WriterCrashed("the commit writer failed while writing this event"))
            busy = True

    async def _write_batch(self, batch: list[_Waiter[Item, Outcome]]) -> None:
        started = time.perf_counter()
        try:
            outcomes = await self._write([waiter.item for waiter in batch])
        except Exception as error:
            if not self._row_specific(error):
                self._failed(error)
            elif len({self._key(waiter.item) for waiter in batch}) > 1:
                await self._write_one_by_one(batch, error)
                return
            _fail(batch, error)  # every waiter gets the error and answers 503
            return
        self._succeeded(batch, outcomes, started)

    def _succeeded(
        self, batch: list[_Waiter[Item, Outcome]], outcomes: Sequence[Outcome], started: float
    ) -> None:
        self._written()
        self.batches_written += 1
        if len(batch) > self.largest_batch:
            self.largest_batch = len(batch)
        for waiter, outcome in zip(batch, outcomes, strict=True):
            if not waiter.future.done():
                waiter.future.set_result(outcome)
        if self._on_batch is not None:
            try:
                self._on_batch(len(batch), time.perf_counter() - started)
            except Exception as error:  # metrics never stop the writes
                log.error("commit_metrics_failed", error=describe(error))

    async def _write_one_by_one(
        self, batch: list[_Waiter[Item, Outcome]], batch_error: Exception
    ) -> None:
        """After `batch_error` (one row's), each event of the batch in a transaction of its
        own; see the module's doc."""
        events: dict[Hashable, list[_Waiter[Item, Outcome]]] = {}
        for waiter in batch:
            events.setdefault(self._key(waiter.item), []).append(waiter)
        pending = list(events.values())
        failed = abandoned = 0
        stopped_by: Exception | None = None
        while pending:
            copies = pending.pop(0)
            if all(waiter.future.done() for waiter in copies):
                abandoned += 1  # nobody waits for it any more: it answered 503 already
                continue
            started = time.perf_counter()
            try:
                outcomes = await self._write([waiter.item for waiter in copies])
            except Exception as error:
                failed += 1
                _fail(copies, error)
                if not self._row_specific(error):
                    self._failed(error)
                    stopped_by = error
                    for rest in pending:
                        _fail(rest, error)
                    break
                continue
            self._succeeded(copies, outcomes, started)
        log.warning(
            "commit_split",
            error=describe(batch_error),
            webhooks=len(batch),
            events=len(events),
            failed=failed,
            not_attempted=len(pending) + abandoned,
            stopped_by=None if stopped_by is None else describe(stopped_by),
        )

    def _writer_ended(self, task: asyncio.Task[None]) -> None:
        """The supervisor: a writer task that ends before `close` is logged and restarted."""
        error: BaseException | None = (
            asyncio.CancelledError() if task.cancelled() else task.exception()
        )
        if error is None and self._closing:
            return  # `close` ended it
        if error is None:  # pragma: no cover - `_run` returns only when closing
            error = RuntimeError("the commit writer returned")
        self._failed(WriterCrashed(f"the commit writer stopped: {describe(error)}"))
        self.writer_restarts += 1
        log.error(
            "commit_writer_crashed",
            error=describe(error),
            waiting=len(self._queue),
            restart_in_seconds=self._restart_seconds,
        )
        if self._closing:
            _fail(self._queue, BatcherClosed("the receiver is shutting down"))
            self._queue.clear()
            return
        assert self._loop is not None
        self._restart = self._loop.call_later(self._restart_seconds, self._start_writer)

    async def close(self) -> None:
        """Take no more work, finish what is queued, and stop. A writer that does not end
        within twice the requests' wait (a write that hangs) is cancelled."""
        self._closing = True
        if self._restart is not None:  # down: start it now, to write what is queued
            self._restart.cancel()
            self._start_writer()
        self._wakeup.set()
        task = self._task
        if task is None:
            return
        done, _ = await asyncio.wait({task}, timeout=2 * self._wait_seconds)
        if not done:
            log.error("commit_writer_stuck", waiting=len(self._queue))
            task.cancel()
            await asyncio.wait({task})
        _fail(self._queue, BatcherClosed("the receiver is shutting down"))
        self._queue.clear()


def _fail(waiters: list[_Waiter[Any, Any]], error: BaseException) -> None:
    for waiter in waiters:
        if not waiter.future.done():
            waiter.future.set_exception(error)


def _never(error: Exception) -> bool:
    return False


def _consume_exception(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
