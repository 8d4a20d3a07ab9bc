"""The per-version scheduler: bounded priority queues -> a dynamic batcher -> a bounded pool of
execution threads (the concurrency limiter).

Everything but the execution itself runs on the event loop, so the queues need no locks. The
batcher forms a batch only when an instance is free: while all instances are busy, requests pile
up and the next batch takes as many as fit (batching under load even with no queue delay).
`session.run` releases the GIL, so the execution threads run in parallel with the loop.

Admission is explicit: a full queue answers QueueFull at once; a request whose deadline passes
while it waits is answered DeadlineExceeded and never executed; a cancelled request leaves the
queue.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import numpy as np

from edge_agent.errors import DeadlineExceeded, QueueFull, Retiring, Unavailable
from edge_agent.observability.logging import get_logger
from edge_agent.scheduling.batching import collate, shape_key, split, union_outputs
from edge_agent.scheduling.policy import SchedulerPolicy
from edge_agent.scheduling.stats import ModelStats

log = get_logger(__name__)

# (feeds, output names) -> one array per output name. Runs on an execution thread.
Execute = Callable[[dict[str, np.ndarray], list[str]], Sequence[np.ndarray]]
# A request's own outputs -> its result (e.g. the encoded response). Runs on the execution thread.
Finish = Callable[[list[np.ndarray]], Any]

QUEUED, TAKEN = "queued", "taken"


class ThreadFuture:
    """The result slot of a request queued by a caller on another thread (the sync front end):
    the same calls the scheduler makes on an asyncio.Future, and `result()` blocks. The first
    outcome wins (an execution thread and the loop may race to set one)."""

    __slots__ = ("_error", "_event", "_lock", "_value")

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._value: Any = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        return self._event.is_set()

    def set_result(self, value: Any) -> None:
        with self._lock:
            if not self._event.is_set():
                self._value = value
                self._event.set()

    def set_exception(self, error: BaseException) -> None:
        with self._lock:
            if not self._event.is_set():
                self._error = error
                self._event.set()

    def cancel(self) -> None:
        self.set_exception(Unavailable("the request was cancelled"))

    def result(self) -> Any:
        self._event.wait()
        if self._error is not None:
            raise self._error
        return self._value


@dataclasses.dataclass(eq=False)  # identity equality: deque.remove finds this very request
class Pending:
    feeds: dict[str, np.ndarray]
    outputs: list[str]
    rows: int
    key: Hashable
    finish: Finish
    future: asyncio.Future[Any] | ThreadFuture
    level: int
    enqueued_ns: int  # time.monotonic_ns(), for the queue statistics
    enqueued_at: float  # loop.time(), for the queue delay
    deadline: float | None  # loop.time() after which it must not run
    state: str = QUEUED
    timer: asyncio.TimerHandle | None = None


class Scheduler:
    def __init__(
        self, label: str, policy: SchedulerPolicy, execute: Execute, stats: ModelStats
    ) -> None:
        self.label = label  # "model/version", for messages
        self.policy = policy
        self._execute_fn = execute
        self._stats = stats
        self._queues: list[collections.deque[Pending]] = [
            collections.deque() for _ in policy.levels
        ]
        # Execution threads, started with the batcher; fed batches through a queue, each answers
        # with one call_soon_threadsafe (cheaper than run_in_executor's chained futures).
        self._jobs: queue.SimpleQueue[list[Pending] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._free = policy.instances
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._idle: asyncio.Event | None = None
        self.demotions = 0  # inline runs that took too long (0 or 1: a version demotes once)
        # Callers on other threads (the sync front end) read and take `_free` too: every change
        # of it, and of the queues, happens under this lock (uncontended on the loop's side).
        self._lock = threading.Lock()

    # -- callers ---------------------------------------------------------------------------------

    def pending(self) -> int:
        return sum(len(q) for q in self._queues)

    async def infer(
        self,
        feeds: dict[str, np.ndarray],
        outputs: list[str],
        rows: int,
        finish: Finish,
        priority: int = 0,
        deadline: float | None = None,
    ) -> Any:
        """Queue one request and wait for its result. `deadline` is in loop.time() seconds."""
        loop = self._start(asyncio.get_running_loop())
        if self._closing:
            raise Unavailable(f"model {self.label} is shutting down")
        level, deadline = self._admission(priority, deadline, loop.time())
        waiting = self._queues[level]
        request = Pending(
            feeds,
            outputs,
            rows,
            shape_key(feeds),
            finish,
            future := loop.create_future(),
            level,
            time.monotonic_ns(),
            loop.time(),
            deadline,
        )
        if self.policy.inline and self._free and not self.pending():
            # Fast path: nothing waits and the run is cheaper than a trip through the batcher
            # (each extra event-loop iteration is a syscall): run it here, now.
            return self._run_now(request)
        if deadline is not None:
            request.timer = loop.call_at(deadline, self._expire, request)
        with self._lock:
            waiting.append(request)
        self._signal()
        try:
            return await future
        except asyncio.CancelledError:
            # The caller went away (client cancel, gRPC deadline): leave the queue.
            self._withdraw(request)
            raise

    def _run_now(self, request: Pending) -> Any:
        request.state = TAKEN
        self._stats.record_queue(0)
        with self._lock:
            self._free -= 1
        try:
            ((ok, value),) = self._compute_inline([request])
        finally:
            with self._lock:
                self._free += 1
        if ok:
            return value
        raise value

    # -- callers on other threads (the sync front end) ---------------------------------------

    def run_here(self, request: Pending) -> tuple[bool, Any]:
        """From a caller's thread: when an instance is free and nothing waits, run the request
        on that very thread (no hand-off at all: what a naive server does); (False, None)
        otherwise, and the caller queues it (`queue_from_thread`). Raises what the run raised."""
        if request.deadline is not None and request.deadline <= time.monotonic():
            # loop.time() is time.monotonic(): the same clock as the loop's checks.
            raise DeadlineExceeded(f"model {self.label}: the deadline passed before queueing")
        with self._lock:
            if self._closing or self._loop is None or not self._free or self.pending():
                return False, None
            self._free -= 1
        request.state = TAKEN
        try:
            self._stats.record_queue(0)
            ((ok, value),) = self._compute([request])
        finally:
            with self._lock:
                self._free += 1
                wake = bool(self.pending()) or self._closing
            if wake:  # a request queued meanwhile waits for this instance; close() for idle
                self._loop.call_soon_threadsafe(self._released)
        if ok:
            return True, value
        raise value

    @property
    def started(self) -> bool:
        return self._task is not None

    def start_on(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the batcher and the execution threads (on the loop's thread)."""
        self._start(loop)

    def queue_from_thread(self, request: Pending, priority: int) -> None:
        """From a caller's thread: queue `request` (its future a ThreadFuture) on the loop; its
        outcome, or QueueFull / DeadlineExceeded / shutting down, arrives in the future."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._admit_queued, request, priority)

    def withdraw_from_thread(self, request: Pending) -> None:
        """The caller went away (the client cancelled): leave the queue, if still in it."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._withdraw, request)

    def _admission(
        self, priority: int, deadline: float | None, now: float
    ) -> tuple[int, float | None]:
        """(queue level, deadline with the queue policy's timeout), or the refusal: a full
        queue, a deadline already passed."""
        level = self.policy.level_of(priority)
        queue_policy = self.policy.levels[level]
        if len(self._queues[level]) >= queue_policy.max_queue_size:
            raise QueueFull(
                f"model {self.label}: queue full ({queue_policy.max_queue_size} requests waiting"
                + (f" at priority {level + 1}" if len(self._queues) > 1 else "")
                + "); retry later"
            )
        if queue_policy.default_timeout_s is not None and queue_policy.reject_on_timeout:
            policy_deadline = now + queue_policy.default_timeout_s
            deadline = policy_deadline if deadline is None else min(deadline, policy_deadline)
        if deadline is not None and deadline <= now:
            raise DeadlineExceeded(f"model {self.label}: the deadline passed before queueing")
        return level, deadline

    def _admit_queued(self, request: Pending, priority: int) -> None:
        assert self._loop is not None
        try:
            if self._closing:
                raise Retiring(f"model {self.label} is shutting down")
            level, deadline = self._admission(priority, request.deadline, self._loop.time())
            waiting = self._queues[level]
        except Exception as exc:
            request.future.set_exception(exc)
            return
        if request.future.done():  # cancelled before it reached the loop
            return
        request.level, request.deadline = level, deadline
        request.enqueued_at = self._loop.time()
        if deadline is not None:
            request.timer = self._loop.call_at(deadline, self._expire, request)
        with self._lock:
            waiting.append(request)
        self._signal()

    def _released(self) -> None:
        """On the loop, after a caller's thread gave back an instance."""
        self._signal()
        if self._idle is not None and not self.pending() and self._free == self.policy.instances:
            self._idle.set()

    def _compute_inline(self, batch: list[Pending]) -> list[tuple[bool, Any]]:
        """_compute on the event loop, timed: a run over the limit demotes the version."""
        started = time.perf_counter()
        values = self._compute(batch)
        took = time.perf_counter() - started
        if took > self.policy.inline_limit_s and not self.policy.inline_forced:
            self._demote(took)
        return values

    def _demote(self, took: float) -> None:
        """Inline no more: from now on this version runs on execution threads, so that one slow
        request can never again hold the event loop (every model's requests, health checks and
        the watchdog) behind it."""
        self.policy = dataclasses.replace(self.policy, inline=False)
        self.demotions += 1
        if self._loop is not None:
            for i in range(self.policy.instances):
                thread = threading.Thread(
                    target=self._work, name=f"exec-{self.label}-{i}", daemon=True
                )
                thread.start()
                self._threads.append(thread)
        log.warning(
            "model.inline_demoted",
            model=self.label,
            run_seconds=round(took, 6),
            limit_seconds=self.policy.inline_limit_s,
        )

    async def close(self) -> None:
        """Refuse new requests, let queued and running ones finish, stop the threads."""
        self._closing = True
        if self._loop is not None and self._idle is not None:
            while self.pending() or self._free < self.policy.instances:
                self._idle.clear()
                await self._idle.wait()
        if self._task is not None:
            self._task.cancel()
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            await asyncio.to_thread(thread.join)

    # -- the batcher (event loop) ----------------------------------------------------------------

    def _start(self, loop: asyncio.AbstractEventLoop) -> asyncio.AbstractEventLoop:
        if self._task is None:
            self._loop = loop
            self._wakeup = asyncio.Event()
            self._idle = asyncio.Event()
            self._task = loop.create_task(self._run(), name=f"batcher-{self.label}")
            if not self.policy.inline:
                for i in range(self.policy.instances):
                    thread = threading.Thread(
                        target=self._work, name=f"exec-{self.label}-{i}", daemon=True
                    )
                    thread.start()
                    self._threads.append(thread)
        return loop

    def _signal(self) -> None:
        assert self._wakeup is not None
        self._wakeup.set()

    async def _run(self) -> None:
        assert self._wakeup is not None and self._loop is not None
        while True:
            while self._free == 0 or not self.pending():
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = await self._collect()
            if not batch:
                continue
            with self._lock:
                self._free -= 1
            if self.policy.inline:
                # Cheaper than any thread handoff (see SchedulerPolicy.inline); then let the
                # handlers whose futures just resolved run before the next batch.
                self._complete(batch, self._compute_inline(batch))
                await asyncio.sleep(0)
            else:
                self._jobs.put(batch)

    def _complete(self, batch: list[Pending], values: list[tuple[bool, Any]]) -> None:
        """On the loop: answer each request of an executed batch and free its instance."""
        for request, (ok, value) in zip(batch, values, strict=True):
            if request.future.done():  # cancelled while running (or answered by its thread)
                continue
            if ok:
                request.future.set_result(value)
            else:
                request.future.set_exception(value)
        with self._lock:
            self._free += 1
        self._signal()
        if self._idle is not None and not self.pending() and self._free == self.policy.instances:
            self._idle.set()

    def _take(self, level: int) -> Pending:
        with self._lock:
            request = self._queues[level].popleft()
        request.state = TAKEN
        if request.timer is not None:
            request.timer.cancel()
        return request

    async def _collect(self) -> list[Pending]:
        """Highest priority first, FIFO within a level; then, with dynamic batching, every
        following request of the same shapes that fits, waiting up to the queue delay."""
        assert self._loop is not None and self._wakeup is not None
        first_level = next(i for i, q in enumerate(self._queues) if q)
        first = self._take(first_level)
        batch, rows = [first], first.rows
        if self.policy.dynamic_batching:
            # The delay counts from the oldest request's arrival, like Triton's.
            wait_until = first.enqueued_at + self.policy.max_queue_delay_s
            while True:
                target = self._target_rows(rows, first.key)
                rows = self._take_compatible(batch, rows, first.key, target)
                if rows >= self.policy.max_batch_size or rows in self.policy.preferred_batch_sizes:
                    break
                remaining = wait_until - self._loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
        return self._admit(batch)

    def _queued(self) -> Iterator[tuple[int, Pending]]:
        """The queued requests in service order: by level, FIFO within one."""
        for level, waiting in enumerate(self._queues):
            for request in waiting:
                yield level, request

    def _target_rows(self, rows: int, key: Hashable) -> int:
        """How many rows to take now: the largest preferred batch size the queue can fill, else
        max_batch_size. Only the compatible prefix of the queue counts (see _take_compatible)."""
        preferred = self.policy.preferred_batch_sizes
        limit = self.policy.max_batch_size
        if not preferred:
            return limit
        reachable = rows
        for _, request in self._queued():
            if request.key != key or reachable + request.rows > limit:
                break
            reachable += request.rows
        fitting = [size for size in preferred if rows < size <= reachable]
        return max(fitting) if fitting else limit

    def _take_compatible(self, batch: list[Pending], rows: int, key: Hashable, limit: int) -> int:
        # In queue order; stops at the first request that differs or does not fit, so no request
        # is overtaken within its level.
        for level, waiting in enumerate(self._queues):
            while waiting and waiting[0].key == key and rows + waiting[0].rows <= limit:
                request = self._take(level)
                batch.append(request)
                rows += request.rows
            if waiting:
                break
        return rows

    def _admit(self, batch: list[Pending]) -> list[Pending]:
        """Drop what was cancelled meanwhile; fail what expired: neither is executed."""
        assert self._loop is not None
        now, now_ns = self._loop.time(), time.monotonic_ns()
        admitted = []
        for request in batch:
            if request.future.done():
                continue
            if request.deadline is not None and request.deadline <= now:
                request.future.set_exception(self._expired())
                continue
            self._stats.record_queue(now_ns - request.enqueued_ns)
            admitted.append(request)
        return admitted

    def _expired(self) -> DeadlineExceeded:
        return DeadlineExceeded(f"model {self.label}: the deadline passed while queued")

    def _expire(self, request: Pending) -> None:
        if request.state == QUEUED and not request.future.done():
            with self._lock:
                self._queues[request.level].remove(request)
            request.future.set_exception(self._expired())

    def _withdraw(self, request: Pending) -> None:
        if request.state == QUEUED and request in self._queues[request.level]:
            with self._lock:
                self._queues[request.level].remove(request)
            request.state = TAKEN
            if request.timer is not None:
                request.timer.cancel()
            if isinstance(request.future, ThreadFuture):
                request.future.cancel()

    # -- execution (a pool thread) ---------------------------------------------------------------

    def _work(self) -> None:
        assert self._loop is not None
        while (batch := self._jobs.get()) is not None:
            values = self._compute(batch)
            # Callers waiting on a thread get their answer from here, without a trip through
            # the loop; the loop then frees the instance and answers the others.
            for request, (ok, value) in zip(batch, values, strict=True):
                if isinstance(request.future, ThreadFuture):
                    if ok:
                        request.future.set_result(value)
                    else:
                        request.future.set_exception(value)
            self._loop.call_soon_threadsafe(self._complete, batch, values)

    def _compute(self, batch: list[Pending]) -> list[tuple[bool, Any]]:
        """Collate, run, split, finish: on an execution thread (or inline on the loop)."""
        try:
            started = time.perf_counter_ns()
            feeds = collate([r.feeds for r in batch])
            names = union_outputs([r.outputs for r in batch])
            collated = time.perf_counter_ns()
            results = dict(zip(names, self._execute_fn(feeds, names), strict=True))
            ran = time.perf_counter_ns()
            if len(batch) == 1:
                parts = [[results[name] for name in batch[0].outputs]]
            else:
                parts = split(results, [r.rows for r in batch], [r.outputs for r in batch])
            values: list[tuple[bool, Any]] = []
            for part, request in zip(parts, batch, strict=True):
                try:
                    values.append((True, request.finish(part)))
                except Exception as exc:
                    values.append((False, exc))
            finished = time.perf_counter_ns()
            self._stats.record_execution(
                sum(r.rows for r in batch),
                len(batch),
                collated - started,
                ran - collated,
                finished - ran,
            )
        except Exception as exc:  # the execute function translates ORT's errors into ours
            values = [(False, exc)] * len(batch)
        return values
