"""The scheduler without a server: batching, admission, deadlines, cancellation, priorities.

Deterministic: a gate holds the single execution instance busy while requests queue behind it;
no assertion depends on how long anything takes."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from edge_agent.errors import DeadlineExceeded, InvalidArgument, QueueFull, Unavailable
from edge_agent.scheduling.batching import collate, split, union_outputs
from edge_agent.scheduling.policy import QueuePolicy, SchedulerPolicy
from edge_agent.scheduling.scheduler import Scheduler
from edge_agent.scheduling.stats import ModelStats


class FakeModel:
    """y = x * 2 and rowsum = x.sum(axis=1); records each execution's batch; can be held."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []  # the ids (x[:, 0]) of every execution
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> Sequence[np.ndarray]:
        self.entered.set()
        self.gate.wait(30)
        x = feeds["x"]
        self.batches.append(x[:, 0].astype(int).tolist())
        results = {"y": x * 2, "rowsum": x.reshape(len(x), -1).sum(axis=1)}
        return [results[name] for name in outputs]


def make(policy: SchedulerPolicy) -> tuple[Scheduler, FakeModel, ModelStats]:
    model, stats = FakeModel(), ModelStats()
    return Scheduler("fake/1", policy, model, stats), model, stats


def request(ident: int, rows: int = 1, width: int = 3) -> dict[str, np.ndarray]:
    x = np.full((rows, width), float(ident), np.float32)
    x[:, 1] = np.arange(rows)  # distinguishes the rows of one request
    return {"x": x}


def identity(parts: list[np.ndarray]) -> list[np.ndarray]:
    return parts


async def hold(scheduler: Scheduler, model: FakeModel) -> asyncio.Task[Any]:
    """Occupy the only instance with request 0 until model.gate is set."""
    model.gate.clear()
    model.entered.clear()
    task = asyncio.ensure_future(scheduler.infer(request(0), ["y"], 1, identity))
    await asyncio.to_thread(model.entered.wait, 30)
    return task


BATCHING = SchedulerPolicy(max_batch_size=8, dynamic_batching=True)


def test_collate_split_pure() -> None:
    parts = [request(1, 2), request(2, 1)]
    batch = collate(parts)
    assert batch["x"].shape == (3, 3)
    names = union_outputs([["y"], ["rowsum", "y"]])
    assert names == ["y", "rowsum"]
    results = {"y": batch["x"] * 2, "rowsum": batch["x"].sum(axis=1)}
    first, second = split(results, [2, 1], [["y"], ["rowsum", "y"]])
    np.testing.assert_array_equal(first[0], parts[0]["x"] * 2)
    np.testing.assert_array_equal(second[0], parts[1]["x"].sum(axis=1))
    np.testing.assert_array_equal(second[1], parts[1]["x"] * 2)


async def test_batches_form_and_split_per_caller() -> None:
    scheduler, model, stats = make(BATCHING)
    held = await hold(scheduler, model)
    # Mixed batch sizes and shapes, queued behind the held execution.
    specs = [(1, 2, 3), (2, 1, 3), (3, 1, 5), (4, 3, 3), (5, 4, 3), (6, 2, 3)]
    calls = [
        asyncio.ensure_future(
            scheduler.infer(request(i, rows, width), ["y", "rowsum"], rows, identity)
        )
        for i, rows, width in specs
    ]
    await asyncio.sleep(0)
    assert scheduler.pending() == len(specs)
    model.gate.set()
    await held
    results = await asyncio.gather(*calls)
    for (ident, rows, width), (y, rowsum) in zip(specs, results, strict=True):
        sent = request(ident, rows, width)["x"]
        np.testing.assert_array_equal(y, sent * 2)  # exactly its own rows
        np.testing.assert_array_equal(rowsum, sent.sum(axis=1))
    # FIFO: a batch stops at the first request of another shape or one that does not fit.
    assert model.batches == [[0], [1, 1, 2], [3], [4, 4, 4, 5, 5, 5, 5], [6, 6]]
    snap = stats.snapshot()
    assert snap.execution_count == 5
    assert snap.inference_count == 1 + 2 + 1 + 1 + 3 + 4 + 2
    assert sorted(snap.batches) == [1, 2, 3, 7]
    assert snap.compute_infer.count == 7  # one per request
    assert snap.queue.count == 7


async def test_without_dynamic_batching_each_request_runs_alone() -> None:
    scheduler, model, _ = make(SchedulerPolicy(max_batch_size=8, dynamic_batching=False))
    held = await hold(scheduler, model)
    calls = [asyncio.ensure_future(scheduler.infer(request(i), ["y"], 1, identity)) for i in (1, 2)]
    await asyncio.sleep(0)
    model.gate.set()
    await asyncio.gather(held, *calls)
    assert model.batches == [[0], [1], [2]]


async def test_preferred_batch_size_dispatches_without_waiting_for_more() -> None:
    policy = SchedulerPolicy(
        max_batch_size=8, dynamic_batching=True, max_queue_delay_s=60, preferred_batch_sizes=(2,)
    )
    scheduler, model, _ = make(policy)
    calls = [asyncio.ensure_future(scheduler.infer(request(i), ["y"], 1, identity)) for i in (1, 2)]
    # With a 60 s queue delay, only the preferred size can have sent these two off.
    await asyncio.wait_for(asyncio.gather(*calls), 30)
    assert model.batches == [[1, 2]]


async def test_full_queue_is_refused_at_once() -> None:
    policy = SchedulerPolicy(
        max_batch_size=8, dynamic_batching=True, levels=(QueuePolicy(max_queue_size=2),)
    )
    scheduler, model, _ = make(policy)
    held = await hold(scheduler, model)
    queued = [
        asyncio.ensure_future(scheduler.infer(request(i), ["y"], 1, identity)) for i in (1, 2)
    ]
    await asyncio.sleep(0)
    with pytest.raises(QueueFull, match="queue full"):
        await scheduler.infer(request(3), ["y"], 1, identity)
    model.gate.set()
    await asyncio.gather(held, *queued)
    assert [i for b in model.batches for i in b] == [0, 1, 2]


async def test_expired_deadline_is_not_executed() -> None:
    scheduler, model, stats = make(BATCHING)
    held = await hold(scheduler, model)
    loop = asyncio.get_running_loop()
    with pytest.raises(DeadlineExceeded, match="deadline passed before queueing"):
        await scheduler.infer(request(7), ["y"], 1, identity, deadline=loop.time() - 1)
    doomed = asyncio.ensure_future(
        scheduler.infer(request(8), ["y"], 1, identity, deadline=loop.time() + 0.05)
    )
    with pytest.raises(DeadlineExceeded, match="deadline passed while queued"):
        await doomed  # fails while the instance is still held
    assert scheduler.pending() == 0
    model.gate.set()
    await held
    assert model.batches == [[0]]  # neither 7 nor 8 ever ran
    assert stats.snapshot().execution_count == 1


async def test_queue_policy_timeout() -> None:
    policy = SchedulerPolicy(
        max_batch_size=8,
        dynamic_batching=True,
        levels=(QueuePolicy(max_queue_size=8, default_timeout_s=0.05),),
    )
    scheduler, model, _ = make(policy)
    model.gate.clear()
    model.entered.clear()
    # The held request itself started in time; the next one times out in the queue.
    held = asyncio.ensure_future(scheduler.infer(request(0), ["y"], 1, identity))
    await asyncio.to_thread(model.entered.wait, 30)
    with pytest.raises(DeadlineExceeded):
        await scheduler.infer(request(1), ["y"], 1, identity)
    model.gate.set()
    await held
    assert model.batches == [[0]]


async def test_cancelled_request_leaves_the_queue() -> None:
    scheduler, model, _ = make(BATCHING)
    held = await hold(scheduler, model)
    gone = asyncio.ensure_future(scheduler.infer(request(1), ["y"], 1, identity))
    kept = asyncio.ensure_future(scheduler.infer(request(2), ["y"], 1, identity))
    await asyncio.sleep(0)
    assert scheduler.pending() == 2
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert scheduler.pending() == 1
    model.gate.set()
    await asyncio.gather(held, kept)
    assert model.batches == [[0], [2]]


async def test_priorities_order_the_queue() -> None:
    policy = SchedulerPolicy(
        max_batch_size=8,
        dynamic_batching=False,
        levels=(QueuePolicy(max_queue_size=8), QueuePolicy(max_queue_size=8)),
        default_level=1,
    )
    scheduler, model, _ = make(policy)
    held = await hold(scheduler, model)
    order = [(1, 0), (2, 2), (3, 1), (4, 0), (5, 1)]  # (id, priority); 0 = default = level 2
    calls = [
        asyncio.ensure_future(scheduler.infer(request(i), ["y"], 1, identity, priority=p))
        for i, p in order
    ]
    await asyncio.sleep(0)
    model.gate.set()
    await asyncio.gather(held, *calls)
    assert model.batches == [[0], [3], [5], [1], [2], [4]]
    with pytest.raises(InvalidArgument, match=r"priority 3 is outside 1\.\.2"):
        await scheduler.infer(request(9), ["y"], 1, identity, priority=3)


async def test_execution_errors_reach_every_caller_of_the_batch() -> None:
    def broken(feeds: dict[str, np.ndarray], outputs: list[str]) -> Sequence[np.ndarray]:
        raise Unavailable("boom")

    scheduler = Scheduler("broken/1", BATCHING, broken, ModelStats())
    results = await asyncio.gather(
        *(scheduler.infer(request(i), ["y"], 1, identity) for i in (1, 2)), return_exceptions=True
    )
    assert [str(r) for r in results] == ["boom", "boom"]


async def test_close_drains_then_refuses() -> None:
    scheduler, model, _ = make(BATCHING)
    held = await hold(scheduler, model)
    queued = asyncio.ensure_future(scheduler.infer(request(1), ["y"], 1, identity))
    await asyncio.sleep(0)
    closing = asyncio.ensure_future(scheduler.close())
    await asyncio.sleep(0)
    with pytest.raises(Unavailable, match="shutting down"):
        await scheduler.infer(request(2), ["y"], 1, identity)
    model.gate.set()
    await asyncio.gather(held, queued, closing)
    assert model.batches == [[0], [1]]
