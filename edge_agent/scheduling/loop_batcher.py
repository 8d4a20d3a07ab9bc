"""Driving a version's queues from the event loop: the callers of the asyncio gRPC and HTTP
front ends await `infer`, and one batcher task per version forms a batch only when an instance
is free (while all are busy, requests pile up and the next batch takes as many as fit: batching
under load even with no queue delay). Execution threads run the batch (`session.run` releases
the GIL) or, for a cheap model, the loop itself (inline, judged on its runs by InlineJudge)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import queue
import threading
import time
from typing import Any

from edge_agent.errors import Unavailable
from edge_agent.observability.logging import get_logger
from edge_agent.scheduling.execution import Execution
from edge_agent.scheduling.policy import InlineJudge
from edge_agent.scheduling.queues import (
    TAKEN,
    BatchQueues,
    Job,
    Outcome,
    Pending,
    answer_threads,
    complete,
)

log = get_logger(__name__)


class LoopBatcher:
    def __init__(self, queues: BatchQueues, execution: Execution) -> None:
        self._queues = queues
        self._execution = execution
        # Execution threads, started with the batcher; fed batches through a queue, each answers
        # with one call_soon_threadsafe (cheaper than run_in_executor's chained futures).
        self._jobs: queue.SimpleQueue[list[Pending] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._idle: asyncio.Event | None = None
        policy = queues.policy
        # Whether it runs inline, judged on its runs; a version inline at its build only.
        self._judge = InlineJudge(policy.inline_limit_s) if policy.inline else None

    @property
    def started(self) -> bool:
        return self._task is not None

    def start(self, loop: asyncio.AbstractEventLoop) -> asyncio.AbstractEventLoop:
        """Start the batcher task and the execution threads (on the loop's thread), once."""
        if self._task is None:
            self._queues.loop = loop
            self._wakeup = asyncio.Event()
            self._idle = asyncio.Event()
            self._task = loop.create_task(self._run(), name=f"batcher-{self._queues.label}")
            if not self._queues.policy.inline:
                self._start_threads()
        return loop

    async def infer(self, job: Job) -> Any:
        """Queue one request and wait for its result."""
        queues = self._queues
        loop = self.start(asyncio.get_running_loop())
        if queues.closing:
            raise Unavailable(f"model {queues.label} is shutting down")
        level, deadline = queues.admission(job.priority, job.deadline, loop.time())
        request = Pending.of(job, future := loop.create_future(), level, loop.time(), deadline)
        if queues.policy.inline and self._take_idle():
            # Fast path: nothing waits and the run is cheaper than a trip through the batcher
            # (each extra event-loop iteration is a syscall): run it here, now.
            return self._run_now(request)
        if deadline is not None:
            request.timer = loop.call_at(deadline, queues.expire, request)
        queues.enqueue(request)
        self.signal()
        try:
            return await future
        except asyncio.CancelledError:
            # The caller went away (client cancel, gRPC deadline): leave the queue.
            queues.withdraw(request)
            raise

    def _take_idle(self) -> bool:
        """Take an instance if one is free and nothing waits (checked and taken at once:
        caller threads take instances too)."""
        queues = self._queues
        with queues.lock:
            if queues.free and not queues.pending():
                queues.free -= 1
                return True
            return False

    def _run_now(self, request: Pending) -> Any:
        """On the loop, holding an instance (_take_idle): run one request inline."""
        queues = self._queues
        request.state = TAKEN
        queues.stats.record_queue(0)
        try:
            ((ok, value),) = self._compute_inline([request])
        finally:
            with queues.lock:
                queues.free += 1
                queued = bool(queues.pending())
            if queued:  # caller threads queued meanwhile: the batcher takes them
                self.signal()
        if ok:
            return value
        raise value

    def signal(self) -> None:
        assert self._wakeup is not None
        self._wakeup.set()

    def released(self) -> None:
        """On the loop, after a caller's thread gave back an instance."""
        self.signal()
        if self._idle is not None and self._queues.idle():
            self._idle.set()

    async def _run(self) -> None:
        assert self._wakeup is not None
        queues = self._queues
        while True:
            # The instance is reserved before the batch is collected: callers on other threads
            # (submit) take instances too, and the collection may wait out the queue delay.
            while not self._reserve():
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = await self._collect()
            if not batch:
                with queues.lock:
                    queues.free += 1
                continue
            if queues.policy.inline:
                # Cheaper than any thread handoff (see SchedulerPolicy.inline); then let the
                # handlers whose futures just resolved run before the next batch.
                self._complete(batch, self._compute_inline(batch))
                await asyncio.sleep(0)
            else:
                self._jobs.put(batch)

    def _reserve(self) -> bool:
        queues = self._queues
        with queues.lock:
            if queues.free and queues.pending():
                queues.free -= 1
                return True
            return False

    async def _collect(self) -> list[Pending]:
        """Highest priority first, FIFO within a level; then, with dynamic batching, every
        following request of the same shapes that fits, waiting up to the queue delay."""
        assert self._queues.loop is not None and self._wakeup is not None
        queues, loop = self._queues, self._queues.loop
        first = queues.take_first()
        if first is None:
            return []
        batch, rows = [first], first.rows
        if queues.policy.dynamic_batching:
            # The delay counts from the oldest request's arrival, like Triton's.
            wait_until = first.enqueued_at + queues.policy.max_queue_delay_s
            while True:
                rows = queues.take_compatible(batch, rows, first.key)
                if queues.full(rows):
                    break
                remaining = wait_until - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
        return queues.admit(batch)

    def _complete(
        self, batch: list[Pending], outcomes: list[Outcome], took: float | None = None
    ) -> None:
        """On the loop: answer each request of an executed batch and free its instance; a run
        on a thread (`took`) of a demoted version counts towards its promotion."""
        queues, judge = self._queues, self._judge
        if (
            judge is not None
            and took is not None
            and not (queues.policy.inline or queues.closing)
            and judge.thread_run(took)
        ):
            self._promote()
        for request, outcome in zip(batch, outcomes, strict=True):
            complete(request.future, outcome)  # a request cancelled while running is skipped
        with queues.lock:
            queues.free += 1
        self.released()

    async def close(self) -> None:
        """Refuse new requests, let queued and running ones finish, stop the threads."""
        queues = self._queues
        queues.closing = True
        if queues.loop is not None and self._idle is not None:
            while not queues.idle():
                self._idle.clear()
                await self._idle.wait()
        if self._task is not None:
            self._task.cancel()
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            await asyncio.to_thread(thread.join)

    # -- execution threads, and the inline judgement ---------------------------------------------

    def _start_threads(self) -> None:
        queues = self._queues
        if queues.loop is None:
            return
        for i in range(queues.policy.instances):
            name = f"exec-{queues.label}-{i}"
            thread = threading.Thread(target=self._work, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _work(self) -> None:
        loop = self._queues.loop
        assert loop is not None
        while (batch := self._jobs.get()) is not None:
            started = time.perf_counter()
            outcomes = self._execution.compute(batch)
            took = time.perf_counter() - started
            # Callers waiting on a thread get their answer from here, without a trip through
            # the loop; the loop then frees the instance and answers the others.
            answer_threads(batch, outcomes)
            loop.call_soon_threadsafe(self._complete, batch, outcomes, took)

    @property
    def demotions(self) -> int:
        """How often this version was moved off the event loop (a metric)."""
        return self._judge.demotions if self._judge is not None else 0

    def _compute_inline(self, batch: list[Pending]) -> list[Outcome]:
        """compute on the event loop, timed: slow runs demote the version (InlineJudge)."""
        started = time.perf_counter()
        outcomes = self._execution.compute(batch)
        took = time.perf_counter() - started
        judge = self._judge
        if judge is not None and not self._queues.policy.inline_forced and judge.inline_run(took):
            self._demote(took, judge.slow_runs)
        return outcomes

    def _demote(self, took: float, slow_runs: int) -> None:
        """Off the event loop: this version runs on execution threads, so that slow requests
        cannot go on holding the loop (every model's requests, health checks and the watchdog)
        behind them."""
        queues = self._queues
        queues.policy = dataclasses.replace(queues.policy, inline=False)
        self._start_threads()
        log.warning(
            "model.inline_demoted",
            model=queues.label,
            run_seconds=round(took, 6),
            slow_runs=slow_runs,
            limit_seconds=queues.policy.inline_limit_s,
        )

    def _promote(self) -> None:
        """Back on the event loop: its runs on threads have been cheap for a long streak (the
        slow ones were the first runs after a swap, or inputs that no longer come). The threads
        finish what they hold, then stop."""
        queues = self._queues
        queues.policy = dataclasses.replace(queues.policy, inline=True)
        for _ in self._threads:
            self._jobs.put(None)
        self._threads = []
        log.info("model.inline_promoted", model=queues.label)
