"""The scheduler without a server: batching, admission, deadlines, cancellation, priorities,
for callers on the event loop and for callers on their own threads (Scheduler.submit).

Deterministic: a gate holds the single execution instance busy while requests queue behind it;
no assertion depends on how long anything takes."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from edge_agent.errors import DeadlineExceeded, InvalidArgument, QueueFull, Retiring, Unavailable
from edge_agent.scheduling.batching import collate, split, union_outputs
from edge_agent.scheduling.policy import (
    CEILING,
    DEMOTE_AFTER,
    DEMOTE_WINDOW,
    MAX_DEMOTIONS,
    PROMOTE_AFTER,
    InlineJudge,
    QueuePolicy,
    SchedulerPolicy,
)
from edge_agent.scheduling.scheduler import Job, Scheduler
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
    task = asyncio.ensure_future(scheduler.infer(Job(request(0), ["y"], 1, identity)))
    await asyncio.to_thread(model.entered.wait, 30)
    return task


BATCHING = SchedulerPolicy(max_batch_size=8, dynamic_batching=True)


def test_inline_is_judged_on_evidence_and_regained() -> None:
    judge = InlineJudge(limit_s=5e-3, budget_s=1e-3)
    # One outlier, even two, among cheap runs: still inline.
    assert not any(judge.inline_run(t) for t in [2e-4] * 10 + [0.03] + [2e-4] * 10 + [0.03])
    assert judge.inline_run(0.03)  # the third slow run in the window demotes
    assert judge.demotions == 1
    # Slow runs spread wider than the window never add up.
    judge = InlineJudge(limit_s=5e-3, budget_s=1e-3)
    spread = ([0.03] + [2e-4] * DEMOTE_WINDOW) * (DEMOTE_AFTER + 1)
    assert not any(judge.inline_run(t) for t in spread)
    # One run far over the limit demotes at once.
    assert judge.inline_run(CEILING * 5e-3 + 1e-3)
    # Back inline after a streak of cheap runs; a run over the limit restarts the streak.
    streak = [judge.thread_run(2e-4) for _ in range(PROMOTE_AFTER - 1)]
    assert not any(streak) and not judge.thread_run(0.01)
    assert not any(judge.thread_run(2e-4) for _ in range(PROMOTE_AFTER - 1))
    assert judge.thread_run(2e-4)
    # Each demotion doubles the streak needed; after MAX_DEMOTIONS it stays on threads.
    judge.inline_run(1.0)
    assert not any(judge.thread_run(2e-4) for _ in range(2 * PROMOTE_AFTER - 1))
    assert judge.thread_run(2e-4)
    while judge.demotions < MAX_DEMOTIONS:
        judge.inline_run(1.0)
    assert not any(judge.thread_run(2e-4) for _ in range(100 * PROMOTE_AFTER))


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
            scheduler.infer(Job(request(i, rows, width), ["y", "rowsum"], rows, identity))
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
    calls = [
        asyncio.ensure_future(scheduler.infer(Job(request(i), ["y"], 1, identity))) for i in (1, 2)
    ]
    await asyncio.sleep(0)
    model.gate.set()
    await asyncio.gather(held, *calls)
    assert model.batches == [[0], [1], [2]]


async def test_preferred_batch_size_dispatches_without_waiting_for_more() -> None:
    policy = SchedulerPolicy(
        max_batch_size=8, dynamic_batching=True, max_queue_delay_s=60, preferred_batch_sizes=(2,)
    )
    scheduler, model, _ = make(policy)
    calls = [
        asyncio.ensure_future(scheduler.infer(Job(request(i), ["y"], 1, identity))) for i in (1, 2)
    ]
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
        asyncio.ensure_future(scheduler.infer(Job(request(i), ["y"], 1, identity))) for i in (1, 2)
    ]
    await asyncio.sleep(0)
    with pytest.raises(QueueFull, match="queue full"):
        await scheduler.infer(Job(request(3), ["y"], 1, identity))
    model.gate.set()
    await asyncio.gather(held, *queued)
    assert [i for b in model.batches for i in b] == [0, 1, 2]


async def test_expired_deadline_is_not_executed() -> None:
    scheduler, model, stats = make(BATCHING)
    held = await hold(scheduler, model)
    loop = asyncio.get_running_loop()
    with pytest.raises(DeadlineExceeded, match="deadline passed before queueing"):
        await scheduler.infer(Job(request(7), ["y"], 1, identity, deadline=loop.time() - 1))
    doomed = asyncio.ensure_future(
        scheduler.infer(Job(request(8), ["y"], 1, identity, deadline=loop.time() + 0.05))
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
    held = asyncio.ensure_future(scheduler.infer(Job(request(0), ["y"], 1, identity)))
    await asyncio.to_thread(model.entered.wait, 30)
    with pytest.raises(DeadlineExceeded):
        await scheduler.infer(Job(request(1), ["y"], 1, identity))
    model.gate.set()
    await held
    assert model.batches == [[0]]


async def test_cancelled_request_leaves_the_queue() -> None:
    scheduler, model, _ = make(BATCHING)
    held = await hold(scheduler, model)
    gone = asyncio.ensure_future(scheduler.infer(Job(request(1), ["y"], 1, identity)))
    kept = asyncio.ensure_future(scheduler.infer(Job(request(2), ["y"], 1, identity)))
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
        asyncio.ensure_future(scheduler.infer(Job(request(i), ["y"], 1, identity, priority=p)))
        for i, p in order
    ]
    await asyncio.sleep(0)
    model.gate.set()
    await asyncio.gather(held, *calls)
    assert model.batches == [[0], [3], [5], [1], [2], [4]]
    with pytest.raises(InvalidArgument, match=r"priority 3 is outside 1\.\.2"):
        await scheduler.infer(Job(request(9), ["y"], 1, identity, priority=3))


async def test_execution_errors_reach_every_caller_of_the_batch() -> None:
    def broken(feeds: dict[str, np.ndarray], outputs: list[str]) -> Sequence[np.ndarray]:
        raise Unavailable("boom")

    scheduler = Scheduler("broken/1", BATCHING, broken, ModelStats())
    results = await asyncio.gather(
        *(scheduler.infer(Job(request(i), ["y"], 1, identity)) for i in (1, 2)),
        return_exceptions=True,
    )
    assert [str(r) for r in results] == ["boom", "boom"]


async def test_close_drains_then_refuses() -> None:
    scheduler, model, _ = make(BATCHING)
    held = await hold(scheduler, model)
    queued = asyncio.ensure_future(scheduler.infer(Job(request(1), ["y"], 1, identity)))
    await asyncio.sleep(0)
    closing = asyncio.ensure_future(scheduler.close())
    await asyncio.sleep(0)
    with pytest.raises(Unavailable, match="shutting down"):
        await scheduler.infer(Job(request(2), ["y"], 1, identity))
    model.gate.set()
    await asyncio.gather(held, queued, closing)
    assert model.batches == [[0], [1]]


# -- callers on their own threads (the sync front end's Scheduler.submit) ---------------------


def pending(ident: int, rows: int = 1, deadline: float | None = None, priority: int = 0) -> Job:
    return Job(request(ident, rows), ["y"], rows, identity, priority, deadline)


class Callers:
    """Caller threads submitting to a scheduler started on the test's loop."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.pool = ThreadPoolExecutor(16)
        self.leave: dict[int, Callable[[], None]] = {}  # on_queued callbacks by request id

    def submit(self, ident: int, priority: int = 0, **kwargs: Any) -> asyncio.Future[Any]:
        item = pending(ident, priority=priority, **kwargs)

        def call() -> Any:
            return self.scheduler.submit(item, lambda cb: self.leave.update({ident: cb}))

        return asyncio.wrap_future(self.pool.submit(call))

    async def until_pending(self, count: int) -> None:
        while self.scheduler.pending() != count:
            await asyncio.sleep(0.005)


class ThreadedModel(FakeModel):
    def __init__(self) -> None:
        super().__init__()
        self.threads: list[str] = []

    def __call__(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> Sequence[np.ndarray]:
        self.threads.append(threading.current_thread().name)
        return super().__call__(feeds, outputs)


async def threaded(policy: SchedulerPolicy) -> tuple[Scheduler, ThreadedModel, Callers]:
    model = ThreadedModel()
    scheduler = Scheduler("fake/1", policy, model, ModelStats())
    scheduler.start_on(asyncio.get_running_loop())
    return scheduler, model, Callers(scheduler)


async def hold_thread(callers: Callers, model: FakeModel) -> asyncio.Future[Any]:
    model.gate.clear()
    model.entered.clear()
    held = callers.submit(0)
    await asyncio.to_thread(model.entered.wait, 30)
    return held


async def test_callers_run_their_own_batches() -> None:
    scheduler, model, callers = await threaded(BATCHING)
    assert (await callers.submit(7))[0][0, 0] == 14  # idle: run at once
    held = await hold_thread(callers, model)
    calls = [callers.submit(i, rows=r) for i, r in ((1, 2), (2, 1), (3, 4), (4, 3))]
    await callers.until_pending(4)
    model.gate.set()
    await held
    specs = ((1, 2), (2, 1), (3, 4), (4, 3))
    for (ident, rows), result in zip(specs, await asyncio.gather(*calls), strict=True):
        np.testing.assert_array_equal(result[0], request(ident, rows)["x"] * 2)
    # The queued requests ran as batches (FIFO, up to max_batch_size 8) on caller threads: no
    # execution thread, no event loop in between.
    assert model.batches == [[7], [0], [1, 1, 2, 3, 3, 3, 3], [4, 4, 4]]
    assert all(name.startswith("ThreadPoolExecutor") for name in model.threads), model.threads
    snap = scheduler._stats.snapshot()
    assert (snap.execution_count, snap.inference_count, snap.queue.count) == (4, 12, 6)


async def test_callers_full_queue_and_deadline_and_leaving() -> None:
    policy = SchedulerPolicy(
        max_batch_size=8, dynamic_batching=True, levels=(QueuePolicy(max_queue_size=3),)
    )
    scheduler, model, callers = await threaded(policy)
    held = await hold_thread(callers, model)
    late = callers.submit(1, deadline=time.monotonic() + 0.2)
    gone = callers.submit(2)
    kept = callers.submit(3)
    await callers.until_pending(3)
    with pytest.raises(QueueFull, match="queue full"):
        await callers.submit(4)  # refused at once, while the instance is still held
    with pytest.raises(DeadlineExceeded, match="while queued"):
        await late  # its waiting thread leaves the queue at its deadline
    callers.leave[2]()  # the client went away
    with pytest.raises(Unavailable, match="cancelled"):
        await gone
    assert scheduler.pending() == 1
    model.gate.set()
    await asyncio.gather(held, kept)
    assert model.batches == [[0], [3]]  # neither the expired nor the cancelled one ran
    with pytest.raises(DeadlineExceeded, match="before queueing"):
        await callers.submit(5, deadline=time.monotonic() - 1)


async def test_callers_priorities_and_errors() -> None:
    policy = SchedulerPolicy(
        max_batch_size=8,
        dynamic_batching=False,
        levels=(QueuePolicy(max_queue_size=8), QueuePolicy(max_queue_size=8)),
        default_level=1,
    )
    _, model, callers = await threaded(policy)
    held = await hold_thread(callers, model)
    order = [(1, 0), (2, 2), (3, 1), (4, 0), (5, 1)]
    calls = []
    for count, (ident, priority) in enumerate(order, 1):
        calls.append(callers.submit(ident, priority))
        await callers.until_pending(count)  # queued in this order
    model.gate.set()
    await asyncio.gather(held, *calls)
    assert model.batches == [[0], [3], [5], [1], [2], [4]]

    def broken(feeds: dict[str, np.ndarray], outputs: list[str]) -> Sequence[np.ndarray]:
        raise Unavailable("boom")

    failing = Scheduler("broken/1", BATCHING, broken, ModelStats())
    failing.start_on(asyncio.get_running_loop())
    results = await asyncio.gather(
        *(Callers(failing).submit(i) for i in range(6)), return_exceptions=True
    )
    assert [str(r) for r in results] == ["boom"] * 6


async def test_loop_and_thread_callers_share_one_queue() -> None:
    scheduler, model, callers = await threaded(BATCHING)
    held = await hold_thread(callers, model)
    calls = [callers.submit(1)]
    await callers.until_pending(1)  # queued in this order
    calls.append(asyncio.ensure_future(scheduler.infer(Job(request(2), ["y"], 1, identity))))
    await callers.until_pending(2)
    calls.append(callers.submit(3))
    await callers.until_pending(3)
    model.gate.set()
    results = await asyncio.gather(held, *calls)
    for ident, result in zip((0, 1, 2, 3), results, strict=True):
        assert result[0][0, 0] == ident * 2
    assert model.batches == [[0], [1, 2, 3]]  # one batch, led by a caller thread
    # And the other way round: a loop request at the head is the loop batcher's to run, and
    # the thread request behind it rides along.
    model.gate.clear()
    model.entered.clear()
    first = asyncio.ensure_future(scheduler.infer(Job(request(4), ["y"], 1, identity)))
    await asyncio.to_thread(model.entered.wait, 30)
    calls = [asyncio.ensure_future(scheduler.infer(Job(request(5), ["y"], 1, identity)))]
    await callers.until_pending(1)
    calls.append(callers.submit(6))
    await callers.until_pending(2)
    model.gate.set()
    results = await asyncio.gather(first, *calls)
    assert [r[0][0, 0] for r in results] == [8, 10, 12]
    assert model.batches[-2:] == [[4], [5, 6]]


async def test_callers_refused_while_closing_queued_ones_finish() -> None:
    scheduler, model, callers = await threaded(BATCHING)
    held = await hold_thread(callers, model)
    queued = callers.submit(1)
    await callers.until_pending(1)
    closing = asyncio.ensure_future(scheduler.close())
    await asyncio.sleep(0.01)
    with pytest.raises(Retiring, match="shutting down"):
        await callers.submit(2)
    model.gate.set()
    await asyncio.gather(held, queued)
    await asyncio.wait_for(closing, 30)
    assert model.batches == [[0], [1]]


async def test_callers_under_churn_all_answered_nothing_lost() -> None:
    """Many caller threads and loop callers at once, two instances, a queue delay, deadlines that
    pass in the queue and callers that leave: every call ends with its own answer or a refusal,
    and the scheduler ends idle (no instance or request lost)."""
    policy = SchedulerPolicy(
        max_batch_size=8,
        dynamic_batching=True,
        max_queue_delay_s=0.0005,
        instances=2,
        levels=(QueuePolicy(max_queue_size=64), QueuePolicy(max_queue_size=64)),
    )
    model = ThreadedModel()
    scheduler = Scheduler("fake/1", policy, model, ModelStats())
    loop = asyncio.get_running_loop()
    scheduler.start_on(loop)
    rng = np.random.default_rng(7)
    plans = [(int(rng.integers(3)), int(rng.integers(2))) for _ in range(1200)]

    def caller(start: int) -> list[str]:
        outcomes = []
        for ident in range(start, len(plans), 24):
            kind, priority = plans[ident]
            deadline = time.monotonic() + 0.0002 if kind == 1 else None
            item = pending(ident, deadline=deadline, priority=priority)
            try:
                if kind == 2:  # the client goes away soon after it had to queue
                    result = scheduler.submit(
                        item, lambda leave: threading.Timer(0.0002, leave).start()
                    )
                else:
                    result = scheduler.submit(item)
                assert result[0][0, 0] == ident * 2
                outcomes.append("ok")
            except (DeadlineExceeded, QueueFull) as exc:
                assert kind == 1 or isinstance(exc, QueueFull)
                outcomes.append(type(exc).__name__)
            except Unavailable as exc:
                assert kind == 2 and "cancelled" in str(exc)
                outcomes.append("left")
        return outcomes

    async def loop_caller(ident: int) -> str:
        try:
            result = await scheduler.infer(Job(request(ident), ["y"], 1, identity))
        except QueueFull:
            return "QueueFull"
        assert result[0][0, 0] == ident * 2
        return "ok"

    with ThreadPoolExecutor(24) as pool:
        threads = [loop.run_in_executor(pool, caller, start) for start in range(24)]
        on_loop = [loop_caller(10_000 + i) for i in range(200)]
        results = await asyncio.wait_for(asyncio.gather(*threads, *on_loop), 120)
    outcomes = [o for r in results for o in (r if isinstance(r, list) else [r])]
    assert len(outcomes) == len(plans) + 200
    assert outcomes.count("ok") > 0 and len(model.batches) > 0
    assert scheduler.pending() == 0
    await asyncio.wait_for(scheduler.close(), 30)  # returns only with every instance back
