"""Driving a version's queues from callers' own threads (the sync front end): leader/follower.

When an instance is free and nothing waits, the caller runs its request itself, as a naive server
would. Otherwise it queues (the same bounded queues, priorities and admission as the loop's
callers) and sleeps until either its answer arrives, or the thread that frees an instance hands
it the next batch (its own request first, then what queued behind it that fits): it runs that
batch, answers the others and hands the instance on. One wake-up per request, no trip through
the event loop or an execution thread. A request queued by the loop's callers at the head of the
queue is left to the loop's batcher, which the instance is handed back to.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from edge_agent.errors import DeadlineExceeded, Retiring
from edge_agent.scheduling.execution import Execution
from edge_agent.scheduling.loop_batcher import LoopBatcher
from edge_agent.scheduling.queues import (
    QUEUED,
    TAKEN,
    BatchQueues,
    Job,
    Outcome,
    Pending,
    ThreadFuture,
)


class CallerThreads:
    def __init__(self, queues: BatchQueues, execution: Execution, batcher: LoopBatcher) -> None:
        self._queues = queues
        self._execution = execution
        self._batcher = batcher

    def submit(
        self, job: Job, on_queued: Callable[[Callable[[], None]], object] | None = None
    ) -> Any:
        """The request's result, or what its run raised, or the refusal (QueueFull,
        DeadlineExceeded, Retiring when shutting down). `on_queued(cb)` registers `cb` to run if
        the caller goes away (gRPC's context.add_callback): a queued request then leaves the
        queue."""
        queues = self._queues
        now = time.monotonic()  # loop.time() is this clock: deadlines carry over
        level = queues.policy.level_of(job.priority)  # refuses a priority outside the levels
        if job.deadline is not None and job.deadline <= now:
            raise DeadlineExceeded(f"model {queues.label}: the deadline passed before queueing")
        request = Pending.of(job, ThreadFuture(), level, now, job.deadline)
        with queues.lock:
            if queues.closing or queues.loop is None:
                raise Retiring(f"model {queues.label} is shutting down")
            if queues.free and not queues.pending():
                queues.free -= 1
                request.state = TAKEN
                batch: list[Pending] | None = [request]
            else:
                request.level, request.deadline = queues.admission(job.priority, job.deadline, now)
                queues.enqueue(request)
                batch = None
        if batch is None:
            if on_queued is not None:
                on_queued(lambda: queues.withdraw(request))
            batch = self._follow(request)
            if batch is None:
                return request.future.result()
        else:
            queues.stats.record_queue(0)
        return self._lead(batch)

    def _follow(self, request: Pending) -> list[Pending] | None:
        """Wait for the answer (None) or for a batch to lead; the deadline ends the wait of a
        request still queued."""
        queues, future = self._queues, request.future
        assert isinstance(future, ThreadFuture)
        timeout = None if request.deadline is None else request.deadline - time.monotonic()
        if not future.wait(timeout):
            with queues.lock:
                expired = request.state == QUEUED
                if expired:
                    queues.levels[request.level].remove(request)
                    request.state = TAKEN
            if expired:
                raise queues.expired()
            future.wait()  # taken meanwhile: its batch runs
        return future.batch

    def _lead(self, batch: list[Pending]) -> Any:
        """On the caller's thread, holding an instance: (wait out the queue delay,) run `batch`,
        answer the others, hand the instance on; then the own (first) request's outcome."""
        policy = self._queues.policy
        outcomes: list[Outcome] = []
        try:
            if policy.dynamic_batching and policy.max_queue_delay_s > 0:
                self._gather(batch)
            outcomes = self._execution.compute(batch)
        except BaseException as exc:  # nothing may leave followers waiting forever
            outcomes = [(False, exc)] * len(batch)
            raise
        finally:
            self._queues.answer(batch[1:], outcomes[1:])
            self._hand_on()
        ok, value = outcomes[0]
        if ok:
            return value
        raise value

    def _gather(self, batch: list[Pending]) -> None:
        """Take what arrives within the queue delay (from the first request's arrival)."""
        queues, first = self._queues, batch[0]
        rows = sum(r.rows for r in batch)
        wait_until = first.enqueued_at + queues.policy.max_queue_delay_s
        taken = len(batch)
        with queues.lock:
            while not queues.full(rows):
                remaining = wait_until - time.monotonic()
                if remaining <= 0:
                    break
                queues.arrived.wait(remaining)
                rows = queues.take_compatible(batch, rows, first.key, on_loop=False)
        batch[taken:] = queues.admit(batch[taken:])

    def _hand_on(self) -> None:
        """Give the instance back, or straight to the next queued caller thread with its batch.
        A request queued by the loop's callers at the head is the loop batcher's to take."""
        queues = self._queues
        batch: list[Pending] = []
        failed: list[Pending] = []
        with queues.lock:
            queues.free += 1
            head = queues.head(failed)
            if head is not None and isinstance(head.future, ThreadFuture):
                queues.free -= 1
                batch = [queues.take(head.level, on_loop=False)]
                if queues.policy.dynamic_batching:
                    queues.take_compatible(batch, head.rows, head.key, on_loop=False)
            wake_loop = (head is not None and not batch) or queues.closing
        queues.fail_expired(failed)
        if batch:
            queues.stats.record_queue(time.monotonic_ns() - batch[0].enqueued_ns)
            rest = queues.admit(batch[1:])
            batch[0].future.lead([batch[0], *rest])  # type: ignore[union-attr]
        if wake_loop and queues.loop is not None:
            # The loop's batcher takes a request queued by the loop's callers; close() waits.
            queues.loop.call_soon_threadsafe(self._batcher.released)
