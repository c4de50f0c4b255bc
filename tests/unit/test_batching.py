"""Batch planning: key runs stay whole, limits hold, what does not fit is given back."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from relay.drainer.batching import plan_batches


def _plan(runs: list[list[int]], max_events: int = 100, max_bytes: int = 10_000, batches: int = 4):
    return plan_batches(
        runs, size_of=lambda size: size, max_events=max_events, max_bytes=max_bytes,
        max_batches=batches, overhead_bytes=10,
    )  # fmt: skip


def test_runs_share_batches_first_fit() -> None:
    plan = _plan([[100, 100], [100], [100, 100, 100]], max_events=4)
    assert [batch.items for batch in plan.batches] == [[100, 100, 100], [100, 100, 100]]
    assert plan.left_over == []


def test_a_run_never_spans_two_batches() -> None:
    plan = _plan([[1] * 3, [2] * 3, [3] * 3], max_events=4, batches=4)
    assert plan.left_over == []
    for run_value in (1, 2, 3):
        holders = [i for i, batch in enumerate(plan.batches) if run_value in batch.items]
        assert len(holders) == 1


def test_a_run_longer_than_a_batch_is_cut_and_the_rest_given_back() -> None:
    plan = _plan([list(range(1, 8))], max_events=3)
    assert [batch.items for batch in plan.batches] == [[1, 2, 3]]
    assert plan.left_over == [4, 5, 6, 7]


def test_bytes_limit_with_overhead_and_separators() -> None:
    # 10 overhead + (99 + 1) * n <= 310 -> 3 per batch
    plan = _plan([[99]] * 7, max_bytes=310, batches=10)
    assert [len(batch.items) for batch in plan.batches] == [3, 3, 1]


def test_runs_beyond_the_free_slots_are_given_back() -> None:
    plan = _plan([[5000], [5000], [5000]], max_bytes=6000, batches=2)
    assert len(plan.batches) == 2
    assert plan.left_over == [5000]


def test_a_single_oversized_item_travels_alone() -> None:
    plan = _plan([[50_000], [10]], max_bytes=10_000)
    assert [batch.items for batch in plan.batches] == [[50_000], [10]]


@given(
    runs=st.lists(st.lists(st.integers(1, 500), min_size=1, max_size=8), max_size=30),
    max_events=st.integers(1, 20),
    max_bytes=st.integers(600, 5000),
    slots=st.integers(1, 6),
)
def test_planning_loses_nothing_and_respects_limits(
    runs: list[list[int]], max_events: int, max_bytes: int, slots: int
) -> None:
    tagged = [
        [(index, position, size) for position, size in enumerate(run)]
        for index, run in enumerate(runs)
    ]
    plan = plan_batches(
        tagged, size_of=lambda item: item[2], max_events=max_events, max_bytes=max_bytes,
        max_batches=slots, overhead_bytes=48,
    )  # fmt: skip
    planned = [item for batch in plan.batches for item in batch.items]
    assert sorted(planned + plan.left_over) == sorted(item for run in tagged for item in run)
    assert len(plan.batches) <= slots
    for batch in plan.batches:
        assert len(batch.items) <= max_events
        if len(batch.items) > 1:
            assert 48 + sum(item[2] + 1 for item in batch.items) <= max_bytes
        # within a batch, each run's items keep their order and are a prefix of the run
        for index in {item[0] for item in batch.items}:
            positions = [item[1] for item in batch.items if item[0] == index]
            assert positions == list(range(len(positions)))
    # no run is in two batches
    for index in range(len(tagged)):
        assert sum(any(item[0] == index for item in batch.items) for batch in plan.batches) <= 1
