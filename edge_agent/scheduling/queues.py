"""What both ways of driving a version's scheduler share: the bounded priority queues, admission,
batch formation and the instance count, under one lock (scheduling/scheduler.py draws the
whole).

The lock: the event loop's batcher (scheduling/loop_batcher.py) and caller threads
(scheduling/caller_threads.py) both take requests from the queues and instances from `free`,
so every change of either happens while holding `BatchQueues.lock`. It is held for list and
counter updates only, never across a model run or a wait on anything but `arrived` (which
releases it). Re-entrant, because the queue walks (`take_compatible` -> `take`) run both inside
and outside it.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import numpy as np

from edge_agent.errors import DeadlineExceeded, QueueFull, Unavailable
from edge_agent.scheduling.batching import shape_key
from edge_agent.scheduling.policy import SchedulerPolicy
from edge_agent.scheduling.stats import ModelStats

# A request's own outputs -> its result (e.g. the encoded response). Runs on the execution thread.
Finish = Callable[[list[np.ndarray]], Any]
# (succeeded, the result or the exception): how a run answers each request of its batch.
Outcome = tuple[bool, Any]

QUEUED, TAKEN = "queued", "taken"


@dataclasses.dataclass(frozen=True, slots=True)
class Job:
    """One request as a caller hands it to the scheduler (`infer` from the loop, `submit` from
    a caller's thread); the scheduler keeps its own record of it (Pending) while it waits."""

    feeds: dict[str, np.ndarray]
    outputs: list[str]
    rows: int  # what it adds to a batch
    finish: Finish  # its outputs -> its answer (the encoded response)
    priority: int = 0
    deadline: float | None = None  # time.monotonic() (= loop.time()) seconds
    sequence: Any = None  # a stateful model's SequenceFlags (scheduling/sequences.py)


class ThreadFuture:
    """The result slot of a request queued by a caller on another thread (the sync front end):
    the same calls the scheduler makes on an asyncio.Future, and `wait()` blocks. The first
    outcome wins (an execution thread and the loop may race to set one). Instead of a result,
    the waiting thread may be handed a batch to run itself (`lead`: see CallerThreads.submit).

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


# Guards ThreadFuture's first-outcome-wins check (held for two assignments: never contended long).
_SETTLING = threading.Lock()


def complete(future: asyncio.Future[Any] | ThreadFuture, outcome: Outcome) -> None:
    """Answer one request, unless it was answered (or cancelled) already. An asyncio future
    only on its loop's thread (`BatchQueues.answer` sees to that)."""
    if future.done():
        return
    ok, value = outcome
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


def _complete_all(answers: list[tuple[asyncio.Future[Any], Outcome]]) -> None:
    for future, outcome in answers:
        complete(future, outcome)


def answer_threads(batch: list[Pending], outcomes: list[Outcome]) -> None:
    """Answer the requests of caller threads in `batch` (from any thread); the others are left
    to the loop."""
    for request, outcome in zip(batch, outcomes, strict=True):
        if isinstance(request.future, ThreadFuture):
            complete(request.future, outcome)


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


class BatchQueues:
    """One version's queues (one per priority level), its free instances, and the rules for
    taking from them: admission, service order, batch formation, expiry."""

    def __init__(self, label: str, policy: SchedulerPolicy, stats: ModelStats) -> None:
        self.label = label  # "model/version", for messages
        self.policy = policy
        self.stats = stats
        self.levels: list[collections.deque[Pending]] = [collections.deque() for _ in policy.levels]
        self.free = policy.instances
        self.lock = threading.RLock()  # see the module doc
        # A thread leading a batch waits on this for more arrivals (a positive queue delay).
        self.arrived = threading.Condition(self.lock)
        self.loop: asyncio.AbstractEventLoop | None = None  # set when the batcher starts
        self.closing = False

    def pending(self) -> int:
        return sum(len(q) for q in self.levels)

    def busy(self) -> int:
        """Requests queued or running now (read without the lock: a sample, for pacing)."""
        return self.pending() + self.policy.instances - self.free

    def idle(self) -> bool:
        return not self.pending() and self.free == self.policy.instances

    def admission(
        self, priority: int, deadline: float | None, now: float
    ) -> tuple[int, float | None]:
        """(queue level, deadline with the queue policy's timeout), or the refusal: a full
        queue, a deadline already passed."""
        level = self.policy.level_of(priority)
        queue_policy = self.policy.levels[level]
        if len(self.levels[level]) >= queue_policy.max_queue_size:
            raise QueueFull(
                f"model {self.label}: queue full ({queue_policy.max_queue_size} requests waiting"
                + (f" at priority {level + 1}" if len(self.levels) > 1 else "")
                + "); retry later"
            )
        if queue_policy.default_timeout_s is not None and queue_policy.reject_on_timeout:
            policy_deadline = now + queue_policy.default_timeout_s
            deadline = policy_deadline if deadline is None else min(deadline, policy_deadline)
        if deadline is not None and deadline <= now:
            raise DeadlineExceeded(f"model {self.label}: the deadline passed before queueing")
        return level, deadline

    def enqueue(self, request: Pending) -> None:
        with self.lock:
            self.levels[request.level].append(request)
            self.arrived.notify_all()

    def take(self, level: int, on_loop: bool = True) -> Pending:
        with self.lock:
            request = self.levels[level].popleft()
            request.state = TAKEN
        if on_loop and request.timer is not None:
            # Off the loop a timer is left to fire: expiry ignores a request already taken.
            request.timer.cancel()
        return request

    def take_first(self) -> Pending | None:
        """The next request in service order, or None (a caller thread may have emptied the
        queues since an instance was reserved)."""
        with self.lock:
            level = next((i for i, q in enumerate(self.levels) if q), None)
            return None if level is None else self.take(level)

    def queued(self) -> Iterator[tuple[int, Pending]]:
        """The queued requests in service order: by level, FIFO within one."""
        for level, waiting in enumerate(self.levels):
            for request in waiting:
                yield level, request

    def target_rows(self, rows: int, key: Hashable) -> int:
        """How many rows to take now: the largest preferred batch size the queue can fill, else
        max_batch_size. Only the compatible prefix of the queue counts (see take_compatible)."""
        preferred = self.policy.preferred_batch_sizes
        limit = self.policy.max_batch_size
        if not preferred:
            return limit
        reachable = rows
        for _, request in self.queued():
            if request.key != key or reachable + request.rows > limit:
                break
            reachable += request.rows
        fitting = [size for size in preferred if rows < size <= reachable]
        return max(fitting) if fitting else limit

    def take_compatible(
        self, batch: list[Pending], rows: int, key: Hashable, on_loop: bool = True
    ) -> int:
        """Add to `batch` what follows in queue order with the same shapes, up to the target
        rows; stops at the first request that differs or does not fit, so no request is
        overtaken within its level. Returns the batch's rows."""
        limit = self.target_rows(rows, key)
        for level, waiting in enumerate(self.levels):
            while waiting and waiting[0].key == key and rows + waiting[0].rows <= limit:
                request = self.take(level, on_loop)
                batch.append(request)
                rows += request.rows
            if waiting:
                break
        return rows

    def full(self, rows: int) -> bool:
        """Whether a batch of `rows` goes now, without waiting out the queue delay."""
        return rows >= self.policy.max_batch_size or rows in self.policy.preferred_batch_sizes

    def head(self, failed: list[Pending]) -> Pending | None:
        """Under the lock: the next request to serve, dropping from the front what was settled
        meanwhile and moving what expired to `failed`."""
        now = time.monotonic()
        for waiting in self.levels:
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

    def admit(self, batch: list[Pending]) -> list[Pending]:
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
            self.stats.record_queue(now_ns - request.enqueued_ns)
            admitted.append(request)
        self.fail_expired(expired)
        return admitted

    def expired(self) -> DeadlineExceeded:
        return DeadlineExceeded(f"model {self.label}: the deadline passed while queued")

    def fail_expired(self, requests: list[Pending]) -> None:
        if requests:
            self.answer(requests, [(False, self.expired())] * len(requests))

    def expire(self, request: Pending) -> None:
        """A queued request's deadline passed (its loop timer, or its caller thread's wait)."""
        with self.lock:
            if request.state != QUEUED or request.future.done():
                return
            self.levels[request.level].remove(request)
            request.state = TAKEN
        complete(request.future, (False, self.expired()))

    def withdraw(self, request: Pending) -> None:
        """The caller went away: a request still queued leaves the queue. On the loop, or on
        any thread for a caller thread's request (it has no timer)."""
        with self.lock:
            if request.state != QUEUED:
                return
            self.levels[request.level].remove(request)
            request.state = TAKEN
        if request.timer is not None:
            request.timer.cancel()
        if isinstance(request.future, ThreadFuture):
            request.future.cancel()

    def answer(self, batch: list[Pending], outcomes: list[Outcome]) -> None:
        """Answer each request from any thread; asyncio futures are answered on their loop."""
        on_loop = []
        for request, outcome in zip(batch, outcomes, strict=True):
            if isinstance(request.future, ThreadFuture):
                complete(request.future, outcome)
            else:
                on_loop.append((request.future, outcome))
        if on_loop and self.loop is not None:
            self.loop.call_soon_threadsafe(_complete_all, on_loop)
