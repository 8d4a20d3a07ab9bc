"""The per-version scheduler: bounded priority queues -> a dynamic batcher -> a bounded pool of
execution threads (the concurrency limiter).

Two kinds of callers share the queues and instances. Callers on the event loop (`infer`: the
asyncio gRPC and HTTP front ends) are served by the batcher task, which forms a batch only when
an instance is free: while all instances are busy, requests pile up and the next batch takes as
many as fit (batching under load even with no queue delay); execution threads run it
(`session.run` releases the GIL) or, for a cheap model, the loop itself. Callers on their own
threads (`submit`: the sync front end) run their request themselves when an instance is idle,
else queue and are handed a whole batch to run by the thread that frees an instance
(leader/follower). Queue and instance changes happen under one lock.

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
from edge_agent.scheduling.policy import InlineJudge, SchedulerPolicy
from edge_agent.scheduling.stats import ModelStats

log = get_logger(__name__)

# (feeds, output names) -> one array per output name. Runs on an execution thread.
Execute = Callable[[dict[str, np.ndarray], list[str]], Sequence[np.ndarray]]
# A request's own outputs -> its result (e.g. the encoded response). Runs on the execution thread.
Finish = Callable[[list[np.ndarray]], Any]

QUEUED, TAKEN = "queued", "taken"


class ThreadFuture:
    """The result slot of a request queued by a caller on another thread (the sync front end):
    the same calls the scheduler makes on an asyncio.Future, and `wait()` blocks. The first
    outcome wins (an execution thread and the loop may race to set one). Instead of a result,
    the waiting thread may be handed a batch to run itself (`lead`: see Scheduler.submit).

    The waiter is a held lock that the outcome releases: much cheaper to make than an Event,
    and one is made per request."""

    __slots__ = ("_done", "_error", "_value", "_waiter", "batch")

    def __init__(self) -> None:
        self._waiter = threading.Lock()
        self._waiter.acquire()
        self._done = False
        self._value: Any = None
        self._error: BaseException | None = None
        self.batch: list[Pending] | None = None

    def done(self) -> bool:
        return self._done

    def _settle(self, value: Any, error: BaseException | None, batch: list[Pending] | None) -> None:
        with _SETTLING:
            if self._done:
                return
            self._done = True
            self._value, self._error, self.batch = value, error, batch
        self._waiter.release()

    def set_result(self, value: Any) -> None:
        self._settle(value, None, None)

    def set_exception(self, error: BaseException) -> None:
        self._settle(None, error, None)

    def lead(self, batch: list[Pending]) -> None:
        """Wake the waiting thread to run `batch` (its own request first) itself."""
        self._settle(None, None, batch)

    def cancel(self) -> None:
        self.set_exception(Unavailable("the request was cancelled"))

    def wait(self, timeout: float | None = None) -> bool:
        """True once settled; False when `timeout` seconds passed first."""
        # gRPC's time_remaining() without a deadline is huge: beyond what a lock can wait.
        if timeout is not None and timeout > threading.TIMEOUT_MAX:
            timeout = None
        if not self._waiter.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
            return False
        self._waiter.release()  # settled for good: later waits return at once
        return True

    def result(self) -> Any:
        self.wait()
        if self._error is not None:
            raise self._error
        return self._value


def _settle_all(outcomes: list[tuple[Any, bool, Any]]) -> None:
    """On the loop: settle asyncio futures answered by a caller thread's batch."""
    for future, ok, value in outcomes:
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


# Guards ThreadFuture's first-outcome-wins check (held for two assignments: never contended long).
_SETTLING = threading.Lock()


@dataclasses.dataclass(frozen=True, slots=True)
class Job:
    """One request as a caller hands it to the scheduler (`infer` from the loop, `submit` from
    a caller's thread); the scheduler keeps its own record of it while it is queued."""

    feeds: dict[str, np.ndarray]
    outputs: list[str]
    rows: int  # what it adds to a batch
    finish: Finish  # its outputs -> its answer (the encoded response)
    priority: int = 0
    deadline: float | None = None  # time.monotonic() (= loop.time()) seconds


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

    @classmethod
    def of(
        cls,
        job: Job,
        future: asyncio.Future[Any] | ThreadFuture,
        level: int,
        now: float,
        deadline: float | None,
    ) -> Pending:
        return cls(
            job.feeds, job.outputs, job.rows, shape_key(job.feeds), job.finish, future, level,
            time.monotonic_ns(), now, deadline,
        )  # fmt: skip


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
        # Whether it runs inline, judged on its runs; a version inline at its build only.
        self._judge = InlineJudge(policy.inline_limit_s) if policy.inline else None
        # Callers on other threads (the sync front end) read and take `_free` too: every change
        # of it, and of the queues, happens under this lock (uncontended on the loop's side).
        # Reentrant: the queue walks (_take_compatible -> _take) run both inside and outside it.
        self._lock = threading.RLock()
        # A thread leading a batch waits on this for more arrivals (a positive queue delay).
        self._arrived = threading.Condition(self._lock)

    # -- callers ---------------------------------------------------------------------------------

    def pending(self) -> int:
        return sum(len(q) for q in self._queues)

    def busy(self) -> int:
        """Requests queued or running now (read without the lock: a sample, for pacing)."""
        return self.pending() + self.policy.instances - self._free

    async def infer(self, job: Job) -> Any:
        """Queue one request from the event loop and wait for its result."""
        loop = self._start(asyncio.get_running_loop())
        if self._closing:
            raise Unavailable(f"model {self.label} is shutting down")
        level, deadline = self._admission(job.priority, job.deadline, loop.time())
        waiting = self._queues[level]
        request = Pending.of(job, future := loop.create_future(), level, loop.time(), deadline)
        if self.policy.inline and self._take_idle():
            # Fast path: nothing waits and the run is cheaper than a trip through the batcher
            # (each extra event-loop iteration is a syscall): run it here, now.
            return self._run_now(request)
        if deadline is not None:
            request.timer = loop.call_at(deadline, self._expire, request)
        with self._lock:
            waiting.append(request)
            self._arrived.notify_all()
        self._signal()
        try:
            return await future
        except asyncio.CancelledError:
            # The caller went away (client cancel, gRPC deadline): leave the queue.
            self._withdraw(request)
            raise

    def _take_idle(self) -> bool:
        """Take an instance if one is free and nothing waits (checked and taken at once:
        caller threads take instances too)."""
        with self._lock:
            if self._free and not self.pending():
                self._free -= 1
                return True
            return False

    def _run_now(self, request: Pending) -> Any:
        """On the loop, holding an instance (_take_idle): run one request inline."""
        request.state = TAKEN
        self._stats.record_queue(0)
        try:
            ((ok, value),) = self._compute_inline([request])
        finally:
            with self._lock:
                self._free += 1
                queued = bool(self.pending())
            if queued:  # caller threads queued meanwhile: the batcher takes them
                self._signal()
        if ok:
            return value
        raise value

    # -- callers on other threads (the sync front end) ---------------------------------------

    @property
    def started(self) -> bool:
        return self._task is not None

    def start_on(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the batcher and the execution threads (on the loop's thread)."""
        self._start(loop)

    def submit(
        self, job: Job, on_queued: Callable[[Callable[[], None]], object] | None = None
    ) -> Any:
        """From a caller's thread (its future a ThreadFuture): the request's result, or what its
        run raised, or the refusal (QueueFull, DeadlineExceeded, Retiring when shutting down).

        Leader/follower, with no other thread in between: when an instance is free and nothing
        waits, the caller runs the request itself, as a naive server would. Otherwise it queues
        (same bounded queues, priorities and admission as the loop's callers) and sleeps until
        either its answer arrives, or the thread that frees an instance hands it the next batch
        (its own request first, then what queued behind it that fits): it runs that batch,
        answers the others and hands the instance on. One wake-up per request, no trip through
        the event loop or an execution thread. `on_queued(cb)` registers `cb` to run if the
        caller goes away (gRPC's context.add_callback): a queued request then leaves the queue.
        """
        now = time.monotonic()  # loop.time() is this clock: deadlines carry over
        level = self.policy.level_of(job.priority)  # refuses a priority outside the levels
        if job.deadline is not None and job.deadline <= now:
            raise DeadlineExceeded(f"model {self.label}: the deadline passed before queueing")
        request = Pending.of(job, ThreadFuture(), level, now, job.deadline)
        with self._lock:
            if self._closing or self._loop is None:
                raise Retiring(f"model {self.label} is shutting down")
            if self._free and not self.pending():
                self._free -= 1
                request.state = TAKEN
                batch: list[Pending] | None = [request]
            else:
                request.level, request.deadline = self._admission(job.priority, job.deadline, now)
                self._queues[request.level].append(request)
                self._arrived.notify_all()
                batch = None
        if batch is None:
            if on_queued is not None:
                on_queued(lambda: self._withdraw(request))
            batch = self._follow(request)
            if batch is None:
                return request.future.result()
        else:
            self._stats.record_queue(0)
        return self._lead(batch)

    def _follow(self, request: Pending) -> list[Pending] | None:
        """Wait for the answer (None) or for a batch to lead; the deadline ends the wait of a
        request still queued."""
        future = request.future
        assert isinstance(future, ThreadFuture)
        timeout = None if request.deadline is None else request.deadline - time.monotonic()
        if not future.wait(timeout):
            with self._lock:
                expired = request.state == QUEUED
                if expired:
                    self._queues[request.level].remove(request)
                    request.state = TAKEN
            if expired:
                raise self._expired()
            future.wait()  # taken meanwhile: its batch runs
        return future.batch

    def _lead(self, batch: list[Pending]) -> Any:
        """On the caller's thread, holding an instance: (wait out the queue delay,) run `batch`,
        answer the others, hand the instance on; then the own (first) request's outcome."""
        try:
            if self.policy.dynamic_batching and self.policy.max_queue_delay_s > 0:
                self._gather(batch)
            values = self._compute(batch)
        except BaseException as exc:  # nothing may leave followers waiting forever
            values = [(False, exc)] * len(batch)
            raise
        finally:
            self._answer(batch[1:], values[1:])
            self._hand_on()
        ok, value = values[0]
        if ok:
            return value
        raise value

    def _gather(self, batch: list[Pending]) -> None:
        """Take what arrives within the queue delay (from the first request's arrival)."""
        first = batch[0]
        rows = sum(r.rows for r in batch)
        wait_until = first.enqueued_at + self.policy.max_queue_delay_s
        taken = len(batch)
        enough = self.policy.preferred_batch_sizes
        with self._lock:
            while rows < self.policy.max_batch_size and rows not in enough:
                remaining = wait_until - time.monotonic()
                if remaining <= 0:
                    break
                self._arrived.wait(remaining)
                rows = self._take_compatible(
                    batch, rows, first.key, self._target_rows(rows, first.key), on_loop=False
                )
        batch[taken:] = self._admit(batch[taken:])

    def _answer(self, batch: list[Pending], values: list[tuple[bool, Any]]) -> None:
        """Settle each request from any thread; asyncio futures are settled on their loop."""
        on_loop = []
        for request, (ok, value) in zip(batch, values, strict=True):
            future = request.future
            if isinstance(future, ThreadFuture):
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)
            else:
                on_loop.append((future, ok, value))
        if on_loop and self._loop is not None:
            self._loop.call_soon_threadsafe(_settle_all, on_loop)

    def _hand_on(self) -> None:
        """Give the instance back, or straight to the next queued caller thread with its batch.
        A request queued by the loop's callers at the head is the loop batcher's to take."""
        batch: list[Pending] = []
        failed: list[Pending] = []
        with self._lock:
            self._free += 1
            head = self._head(failed)
            if head is not None and isinstance(head.future, ThreadFuture):
                self._free -= 1
                batch = [self._take(head.level, on_loop=False)]
                if self.policy.dynamic_batching:
                    self._take_compatible(
                        batch, head.rows, head.key, self._target_rows(head.rows, head.key), False
                    )
            wake_loop = (head is not None and not batch) or self._closing
        if failed:
            self._answer(failed, [(False, self._expired())] * len(failed))
        if batch:
            self._stats.record_queue(time.monotonic_ns() - batch[0].enqueued_ns)
            rest = self._admit(batch[1:])
            batch[0].future.lead([batch[0], *rest])  # type: ignore[union-attr]
        if wake_loop and self._loop is not None:
            # The loop's batcher takes a request queued by the loop's callers; close() waits.
            self._loop.call_soon_threadsafe(self._released)

    def _head(self, failed: list[Pending]) -> Pending | None:
        """Under the lock: the next request to serve, dropping from the front what was settled
        meanwhile and moving what expired to `failed`."""
        now = time.monotonic()
        for waiting in self._queues:
            while waiting:
                head = waiting[0]
                if head.future.done() or (head.deadline is not None and head.deadline <= now):
                    waiting.popleft()
                    head.state = TAKEN
                    if not head.future.done():
                        failed.append(head)
                    continue
                return head
        return None

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

    def _released(self) -> None:
        """On the loop, after a caller's thread gave back an instance."""
        self._signal()
        if self._idle is not None and not self.pending() and self._free == self.policy.instances:
            self._idle.set()

    @property
    def demotions(self) -> int:
        """How often this version was moved off the event loop (a metric)."""
        return self._judge.demotions if self._judge is not None else 0

    def _compute_inline(self, batch: list[Pending]) -> list[tuple[bool, Any]]:
        """_compute on the event loop, timed: slow runs demote the version (InlineJudge)."""
        started = time.perf_counter()
        values = self._compute(batch)
        took = time.perf_counter() - started
        judge = self._judge
        if judge is not None and not self.policy.inline_forced and judge.inline_run(took):
            self._demote(took, judge.slow_runs)
        return values

    def _demote(self, took: float, slow_runs: int) -> None:
        """Off the event loop: this version runs on execution threads, so that slow requests
        cannot go on holding the loop (every model's requests, health checks and the watchdog)
        behind them."""
        self.policy = dataclasses.replace(self.policy, inline=False)
        self._start_threads()
        log.warning(
            "model.inline_demoted",
            model=self.label,
            run_seconds=round(took, 6),
            slow_runs=slow_runs,
            limit_seconds=self.policy.inline_limit_s,
        )

    def _promote(self) -> None:
        """Back on the event loop: its runs on threads have been cheap for a long streak (the
        slow ones were the first runs after a swap, or inputs that no longer come). The threads
        finish what they hold, then stop."""
        self.policy = dataclasses.replace(self.policy, inline=True)
        for _ in self._threads:
            self._jobs.put(None)
        self._threads = []
        log.info("model.inline_promoted", model=self.label)

    def _start_threads(self) -> None:
        if self._loop is None:
            return
        for i in range(self.policy.instances):
            thread = threading.Thread(target=self._work, name=f"exec-{self.label}-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

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
                self._start_threads()
        return loop

    def _signal(self) -> None:
        assert self._wakeup is not None
        self._wakeup.set()

    async def _run(self) -> None:
        assert self._wakeup is not None and self._loop is not None
        while True:
            # The instance is reserved before the batch is collected: callers on other threads
            # (submit) take instances too, and the collection may wait out the queue delay.
            while not self._reserve():
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = await self._collect()
            if not batch:
                with self._lock:
                    self._free += 1
                continue
            if self.policy.inline:
                # Cheaper than any thread handoff (see SchedulerPolicy.inline); then let the
                # handlers whose futures just resolved run before the next batch.
                self._complete(batch, self._compute_inline(batch))
                await asyncio.sleep(0)
            else:
                self._jobs.put(batch)

    def _reserve(self) -> bool:
        with self._lock:
            if self._free and self.pending():
                self._free -= 1
                return True
            return False

    def _complete(
        self, batch: list[Pending], values: list[tuple[bool, Any]], took: float | None = None
    ) -> None:
        """On the loop: answer each request of an executed batch and free its instance; a run
        on a thread (`took`) of a demoted version counts towards its promotion."""
        judge = self._judge
        if (
            judge is not None
            and took is not None
            and not (self.policy.inline or self._closing)
            and judge.thread_run(took)
        ):
            self._promote()
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

    def _take(self, level: int, on_loop: bool = True) -> Pending:
        with self._lock:
            request = self._queues[level].popleft()
            request.state = TAKEN
        if on_loop and request.timer is not None:
            # Off the loop a timer is left to fire: _expire ignores a request already taken.
            request.timer.cancel()
        return request

    async def _collect(self) -> list[Pending]:
        """Highest priority first, FIFO within a level; then, with dynamic batching, every
        following request of the same shapes that fits, waiting up to the queue delay."""
        assert self._loop is not None and self._wakeup is not None
        with self._lock:  # a caller thread may have emptied the queues since the reservation
            first_level = next((i for i, q in enumerate(self._queues) if q), None)
            if first_level is None:
                return []
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

    def _take_compatible(
        self, batch: list[Pending], rows: int, key: Hashable, limit: int, on_loop: bool = True
    ) -> int:
        # In queue order; stops at the first request that differs or does not fit, so no request
        # is overtaken within its level.
        for level, waiting in enumerate(self._queues):
            while waiting and waiting[0].key == key and rows + waiting[0].rows <= limit:
                request = self._take(level, on_loop)
                batch.append(request)
                rows += request.rows
            if waiting:
                break
        return rows

    def _admit(self, batch: list[Pending]) -> list[Pending]:
        """Drop what was settled meanwhile (cancelled); fail what expired: neither is executed.
        On the loop or a caller thread (loop.time() is time.monotonic())."""
        now, now_ns = time.monotonic(), time.monotonic_ns()
        admitted, expired = [], []
        for request in batch:
            if request.future.done():
                continue
            if request.deadline is not None and request.deadline <= now:
                expired.append(request)
                continue
            self._stats.record_queue(now_ns - request.enqueued_ns)
            admitted.append(request)
        if expired:
            self._answer(expired, [(False, self._expired())] * len(expired))
        return admitted

    def _expired(self) -> DeadlineExceeded:
        return DeadlineExceeded(f"model {self.label}: the deadline passed while queued")

    def _expire(self, request: Pending) -> None:
        with self._lock:
            if request.state != QUEUED or request.future.done():
                return
            self._queues[request.level].remove(request)
            request.state = TAKEN
        request.future.set_exception(self._expired())

    def _withdraw(self, request: Pending) -> None:
        """The caller went away: a request still queued leaves the queue. On the loop, or on
        any thread for a caller thread's request (it has no timer)."""
        with self._lock:
            if request.state != QUEUED:
                return
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
            started = time.perf_counter()
            values = self._compute(batch)
            took = time.perf_counter() - started
            # Callers waiting on a thread get their answer from here, without a trip through
            # the loop; the loop then frees the instance and answers the others.
            for request, (ok, value) in zip(batch, values, strict=True):
                if isinstance(request.future, ThreadFuture):
                    if ok:
                        request.future.set_result(value)
                    else:
                        request.future.set_exception(value)
            self._loop.call_soon_threadsafe(self._complete, batch, values, took)

    def _compute(self, batch: list[Pending]) -> list[tuple[bool, Any]]:
        """Collate, run, split, finish: on an execution thread (or inline on the loop, or on a
        caller's thread)."""
        if len(batch) == 1:
            return [self._compute_one(batch[0])]
        try:
            started = time.perf_counter_ns()
            feeds = collate([r.feeds for r in batch])
            names = union_outputs([r.outputs for r in batch])
            collated = time.perf_counter_ns()
            results = dict(zip(names, self._execute_fn(feeds, names), strict=True))
            ran = time.perf_counter_ns()
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

    def _compute_one(self, request: Pending) -> tuple[bool, Any]:
        """_compute for a batch of one (the common case at low load): nothing to collate."""
        try:
            started = time.perf_counter_ns()
            arrays = self._execute_fn(request.feeds, request.outputs)
            ran = time.perf_counter_ns()
            try:
                value: tuple[bool, Any] = (True, request.finish(list(arrays)))
            except Exception as exc:
                value = (False, exc)
            self._stats.record_execution(
                request.rows, 1, 0, ran - started, time.perf_counter_ns() - ran
            )
        except Exception as exc:  # the execute function translates ORT's errors into ours
            value = (False, exc)
        return value
