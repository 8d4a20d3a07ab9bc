"""The per-version scheduler: bounded priority queues -> a dynamic batcher -> a bounded number of
instances running batches (the concurrency limiter).

Two kinds of callers share the queues and instances, each driven by its own part:

    scheduling/queues.py          the queues, admission, batch formation, the instance count
                                  and the one lock over them (shared)
    scheduling/loop_batcher.py    callers on the event loop (`infer`: the asyncio gRPC and HTTP
                                  front ends): a batcher task, execution threads or inline runs
    scheduling/caller_threads.py  callers on their own threads (`submit`: the sync front end):
                                  leader/follower, the caller runs the batch itself
    scheduling/execution.py       running one batch (collate, run, split, finish), whoever
                                  holds the instance

Admission is explicit: a full queue answers QueueFull at once; a request whose deadline passes
while it waits is answered DeadlineExceeded and never executed; a cancelled request leaves the
queue.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from edge_agent.scheduling.caller_threads import CallerThreads
from edge_agent.scheduling.execution import Execute, Execution
from edge_agent.scheduling.loop_batcher import LoopBatcher
from edge_agent.scheduling.policy import SchedulerPolicy
from edge_agent.scheduling.queues import BatchQueues, Finish, Job, ThreadFuture
from edge_agent.scheduling.stats import ModelStats

__all__ = [
    "Execute",
    "Finish",
    "Job",
    "OnQueued",
    "Scheduler",
    "ThreadFuture",
    "VersionScheduler",
    "submit_to_loop",
]

# How a caller's thread learns it may be cancelled: gRPC's context.add_callback.
OnQueued = Callable[[Callable[[], None]], object]


def submit_to_loop(
    loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, Any], on_queued: OnQueued | None
) -> Any:
    """Run `coroutine` on `loop` from a caller's thread and wait for its result: how a
    scheduler that lives on the event loop (an ensemble's, a sequence model's) serves the sync
    front end. If the caller goes away, the coroutine is cancelled."""
    future = asyncio.run_coroutine_threadsafe(coroutine, loop)
    if on_queued is not None:

        def cancel() -> None:
            future.cancel()

        on_queued(cancel)
    try:
        return future.result()
    except concurrent.futures.CancelledError:
        raise asyncio.CancelledError from None  # the caller went away: not the model's failure


class VersionScheduler(Protocol):
    """What a model version's scheduler offers its callers: `Scheduler` for a model that runs
    on ONNX Runtime, an ensemble's own (repository/ensemble.py) for a pipeline of models, and
    SequenceScheduler (scheduling/sequences.py) around a stateful model's `Scheduler`."""

    label: str

    @property
    def policy(self) -> SchedulerPolicy: ...
    def pending(self) -> int: ...
    def busy(self) -> int: ...
    async def infer(self, job: Job) -> Any: ...
    def submit(self, job: Job, on_queued: OnQueued | None = None) -> Any: ...
    @property
    def started(self) -> bool: ...
    def start_on(self, loop: asyncio.AbstractEventLoop) -> None: ...
    @property
    def demotions(self) -> int: ...
    async def close(self) -> None: ...


class Scheduler:
    def __init__(
        self, label: str, policy: SchedulerPolicy, execute: Execute, stats: ModelStats
    ) -> None:
        self.label = label  # "model/version", for messages
        self._stats = stats
        self._queues = BatchQueues(label, policy, stats)
        execution = Execution(execute, stats)
        self._batcher = LoopBatcher(self._queues, execution)
        self._callers = CallerThreads(self._queues, execution, self._batcher)

    @property
    def policy(self) -> SchedulerPolicy:
        """The policy in force (a demotion off the event loop replaces it)."""
        return self._queues.policy

    def pending(self) -> int:
        return self._queues.pending()

    def busy(self) -> int:
        """Requests queued or running now (read without the lock: a sample, for pacing)."""
        return self._queues.busy()

    async def infer(self, job: Job) -> Any:
        """From the event loop: queue one request and wait for its result."""
        return await self._batcher.infer(job)

    def submit(self, job: Job, on_queued: OnQueued | None = None) -> Any:
        """From a caller's thread: its result (see CallerThreads.submit)."""
        return self._callers.submit(job, on_queued)

    @property
    def started(self) -> bool:
        return self._batcher.started

    def start_on(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the batcher and the execution threads (on the loop's thread)."""
        self._batcher.start(loop)

    @property
    def demotions(self) -> int:
        """How often this version was moved off the event loop (a metric)."""
        return self._batcher.demotions

    async def close(self) -> None:
        """Refuse new requests, let queued and running ones finish, stop the threads."""
        await self._batcher.close()
