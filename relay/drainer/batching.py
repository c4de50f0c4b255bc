"""Batches: what one holds (`Prepared`: a claimed row and its message's bytes), and the pure
planning of claimed runs of events (one run per ordering key, in order) into requests under
Segment's limits.

A key's run always travels whole in one request, so that no key is ever in two requests at once
and its events reach Segment in order. A run larger than one request is cut: its head goes now,
the rest is given back and waits behind it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from relay.db.delivery import ClaimedEvent

Item = TypeVar("Item")


@dataclass(frozen=True, slots=True)
class Prepared:
    """A claimed row and its message's bytes. Only the bytes are kept (not the message's dict,
    nor the parsed payload it shares values with): a batch waiting for its answer then holds a
    few objects per event, not hundreds for the garbage collector to walk."""

    row: ClaimedEvent
    encoded: bytes


def encoded_size(item: Prepared) -> int:
    return len(item.encoded)


@dataclass
class Batch(Generic[Item]):
    items: list[Item] = field(default_factory=list)
    size_bytes: int = 0


@dataclass(frozen=True)
class Plan(Generic[Item]):
    batches: list[Batch[Item]]
    left_over: list[Item]  # claimed but not planned: to be released


def plan_batches(
    runs: Sequence[Sequence[Item]],
    size_of: Callable[[Item], int],
    max_events: int,
    max_bytes: int,
    max_batches: int,
    overhead_bytes: int = 0,
) -> Plan[Item]:
    """Pack runs, first fit in the given order, into at most `max_batches` batches.

    Each item costs `size_of(item)` bytes plus one separator; a batch never exceeds `max_events`
    items nor `max_bytes` bytes (with `overhead_bytes` for the envelope), unless a single item
    alone is larger, which then travels alone (mapping keeps items far below the limit).
    """
    batches: list[Batch[Item]] = []
    left_over: list[Item] = []
    for run in runs:
        if not run:
            continue
        placed = False
        for batch in batches:
            if _fits(batch, run, size_of, max_events, max_bytes, overhead_bytes):
                _add(batch, run, size_of)
                placed = True
                break
        if placed:
            continue
        if len(batches) >= max_batches:
            left_over.extend(run)
            continue
        opened: Batch[Item] = Batch()
        head = _head_that_fits(run, size_of, max_events, max_bytes, overhead_bytes)
        _add(opened, head, size_of)
        batches.append(opened)
        left_over.extend(run[len(head) :])
    return Plan(batches=batches, left_over=left_over)


def _cost(items: Sequence[Item], size_of: Callable[[Item], int]) -> int:
    return sum(size_of(item) + 1 for item in items)


def _fits(
    batch: Batch[Item],
    run: Sequence[Item],
    size_of: Callable[[Item], int],
    max_events: int,
    max_bytes: int,
    overhead_bytes: int,
) -> bool:
    return (
        len(batch.items) + len(run) <= max_events
        and overhead_bytes + batch.size_bytes + _cost(run, size_of) <= max_bytes
    )


def _head_that_fits(
    run: Sequence[Item],
    size_of: Callable[[Item], int],
    max_events: int,
    max_bytes: int,
    overhead_bytes: int,
) -> list[Item]:
    head: list[Item] = []
    size = overhead_bytes
    for item in run:
        cost = size_of(item) + 1
        if head and (len(head) >= max_events or size + cost > max_bytes):
            break
        head.append(item)
        size += cost
    return head


def _add(batch: Batch[Item], items: Sequence[Item], size_of: Callable[[Item], int]) -> None:
    batch.items.extend(items)
    batch.size_bytes += _cost(items, size_of)
