"""Triton's sequence batcher with implicit state, for a stateful model (a recurrent network, a
voice-activity detector, a keyword spotter) served a chunk of a stream per request.

A request names its sequence (`sequence_id`, an integer or a string) and marks the first and
last request of it (`sequence_start`, `sequence_end`). The agent keeps each live sequence's state
tensors: a request runs with its sequence's state as the model's state inputs, and the model's
state outputs become the next request's (the client sends neither; they are not in the served
config). Optional control inputs tell the model about the sequence (START, END, READY, CORRID).

One request of a sequence runs at a time, in arrival order (the next one needs its state);
requests of different sequences go through the version's own scheduler together, so they batch
with each other (the state rows gathered with the batch and scattered back with its outputs).
On one device Triton's Direct and Oldest strategies come to this: every live sequence may join
any batch, with the strategy's max_queue_delay.

Bounded: at most `max_sequences` live sequences and `max_state_bytes` of their state (a start
beyond either is refused, UNAVAILABLE), MAX_WAITING requests of one sequence in progress; a
sequence idle for `idle_s` is dropped and its slot freed (a later continuation is refused,
saying it expired). A request waits its sequence's turn within its deadline.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from typing import Any

import numpy as np

from edge_agent.errors import (
    DeadlineExceeded,
    ExecutionError,
    InvalidArgument,
    QueueFull,
    Retiring,
    Unavailable,
)
from edge_agent.scheduling.policy import SchedulerPolicy
from edge_agent.scheduling.queues import Job
from edge_agent.scheduling.scheduler import OnQueued, VersionScheduler, submit_to_loop

SequenceId = int | str

# Triton's default max_sequence_idle_microseconds: one second.
DEFAULT_IDLE_S = 1.0
# Per model version, unless its config's parameters say otherwise (max_sequences,
# max_sequence_state_bytes): a bound on what clients that never end their sequences can hold.
DEFAULT_MAX_SEQUENCES = 1024
DEFAULT_MAX_STATE_BYTES = 256 << 20
# Expired sequence ids remembered (per version) to tell a late continuation why it is refused.
REMEMBERED_EXPIRED = 4096
# Requests of one sequence in progress at once (one runs, the others wait their turn): a client
# streams its requests one after another, so more is a runaway client.
MAX_WAITING = 64
START, END, READY, CORRID = "START", "END", "READY", "CORRID"


@dataclasses.dataclass(frozen=True, slots=True)
class SequenceFlags:
    """A request's place in its sequence (Triton's sequence_id / sequence_start / sequence_end)."""

    id: SequenceId
    start: bool = False
    end: bool = False


@dataclasses.dataclass(frozen=True)
class StateSpec:
    """One implicit state: the model input it feeds and the model output it comes back from."""

    input: str
    output: str
    initial: np.ndarray  # a sequence's first state (with its batch dimension of 1, if batched)


@dataclasses.dataclass(frozen=True)
class ControlSpec:
    """A control input: a tensor the agent fills in for each request."""

    input: str
    kind: str  # START | END | READY | CORRID
    dtype: np.dtype[Any]
    shape: tuple[int, ...]  # one request's tensor
    false_true: tuple[Any, Any] = (0, 1)  # START / END / READY: the values for no and yes

    def check(self, flags: SequenceFlags) -> None:
        """Refuse a sequence id this control cannot carry (before the sequence starts)."""
        if self.kind == CORRID and self.dtype != np.object_:
            if isinstance(flags.id, str):
                raise InvalidArgument(
                    f"sequence_id {flags.id!r}: this model's CORRID control input takes a number"
                )
            limits = np.iinfo(self.dtype)
            if not limits.min <= flags.id <= limits.max:
                raise InvalidArgument(f"sequence_id {flags.id} does not fit {self.dtype}")

    def value(self, flags: SequenceFlags) -> np.ndarray:
        if self.kind == CORRID:
            if self.dtype == np.object_:
                return np.full(self.shape, str(flags.id).encode(), dtype=object)
            return np.full(self.shape, flags.id, dtype=self.dtype)
        on = {START: flags.start, END: flags.end, READY: True}[self.kind]
        return np.full(self.shape, self.false_true[on], dtype=self.dtype)


@dataclasses.dataclass(frozen=True)
class SequencePolicy:
    states: tuple[StateSpec, ...]
    controls: tuple[ControlSpec, ...]
    batched: bool  # max_batch_size > 0: a request is one row of a batch
    idle_s: float = DEFAULT_IDLE_S
    max_sequences: int = DEFAULT_MAX_SEQUENCES
    max_state_bytes: int = DEFAULT_MAX_STATE_BYTES

    @property
    def state_bytes(self) -> int:
        """What one sequence's state occupies."""
        return sum(s.initial.nbytes for s in self.states)


class Sequence:
    __slots__ = ("busy", "id", "last_used", "ran", "state", "turn")

    def __init__(self, sequence_id: SequenceId, state: dict[str, np.ndarray], now: float) -> None:
        self.id = sequence_id
        self.state = state  # state input name -> its tensor for the next request
        self.turn = asyncio.Lock()  # its requests one at a time; asyncio's lock is FIFO
        self.busy = 0  # its requests in progress (waiting their turn or running)
        self.ran = False  # a request of it has run (its start did not fail)
        self.last_used = now


class SequenceTable:
    """The live sequences of one model version, least recently used first; counts for the
    metrics. Used on the event loop only."""

    def __init__(self, label: str, policy: SequencePolicy) -> None:
        self._label = label
        self._policy = policy
        self._live: collections.OrderedDict[SequenceId, Sequence] = collections.OrderedDict()
        self._expired: collections.OrderedDict[SequenceId, None] = collections.OrderedDict()
        # started, ended, expired, restarted (a start for a live id), failed_start
        self.counts: collections.Counter[str] = collections.Counter()
        self.refusals: collections.Counter[str] = collections.Counter()  # by cause

    @property
    def live(self) -> int:
        return len(self._live)

    @property
    def state_bytes(self) -> int:
        return len(self._live) * self._policy.state_bytes

    def begin(self, flags: SequenceFlags, now: float) -> Sequence:
        """The request's sequence, marked busy; raises the error Triton answers misuse with.

        A start makes a new sequence. A start for a live one ends that one early, as Triton
        does (its requests already queued still run on it; this request and those after it
        run on the new one, from the initial state). An end takes the id out at once: a later
        request of the id is refused or, with a start, begins a new sequence."""
        self.sweep(now)
        sequence = self._live.get(flags.id)
        if flags.start:
            if sequence is not None:
                del self._live[flags.id]
                self.counts["restarted"] += 1
            sequence = self._start(flags.id, now)
        elif sequence is None:
            self._refuse("unknown")
            why = (
                f"expired after {self._policy.idle_s:g} s idle"
                if flags.id in self._expired
                else "is not started (or has ended)"
            )
            raise InvalidArgument(
                f"model '{self._label}': sequence {flags.id!r} {why}; its first request must "
                "set sequence_start"
            )
        if sequence.busy >= MAX_WAITING:
            self._refuse("waiting")
            raise QueueFull(
                f"model '{self._label}': sequence {flags.id!r} has {sequence.busy} requests in "
                "progress already; send its next one after an answer"
            )
        sequence.busy += 1
        sequence.last_used = now
        self._live.move_to_end(flags.id)
        if flags.end:  # ended on arrival: the id is free for a new start
            del self._live[flags.id]
            self.counts["ended"] += 1
        return sequence

    def _start(self, sequence_id: SequenceId, now: float) -> Sequence:
        policy = self._policy
        if len(self._live) >= policy.max_sequences:
            self._refuse("too_many")
            raise Unavailable(
                f"model '{self._label}' holds {len(self._live)} live sequences, its limit "
                "(max_sequences): end some, or retry once idle ones expire"
            )
        if self.state_bytes + policy.state_bytes > policy.max_state_bytes:
            self._refuse("state_bytes")
            raise Unavailable(
                f"model '{self._label}': the state of its live sequences would pass "
                f"{policy.max_state_bytes} bytes (max_sequence_state_bytes); retry later"
            )
        state = {spec.input: spec.initial for spec in policy.states}
        sequence = self._live[sequence_id] = Sequence(sequence_id, state, now)
        self._expired.pop(sequence_id, None)
        self.counts["started"] += 1
        return sequence

    def done(self, sequence: Sequence, ok: bool, now: float) -> None:
        """A request of `sequence` finished, or failed (`ok` False). A sequence none of whose
        requests ran (its start failed) is dropped: the client's retry starts it again."""
        sequence.busy -= 1
        sequence.last_used = now
        sequence.ran = sequence.ran or ok
        if self._live.get(sequence.id) is sequence:
            self._live.move_to_end(sequence.id)
            if not sequence.ran and not sequence.busy:
                del self._live[sequence.id]
                self.counts["failed_start"] += 1

    def sweep(self, now: float) -> None:
        """Drop the sequences idle for longer than the limit (none with a request under way)."""
        for _ in range(len(self._live)):
            sequence_id, sequence = next(iter(self._live.items()))
            if now - sequence.last_used < self._policy.idle_s:
                return
            if sequence.busy:  # waiting its turn: not idle
                self._live.move_to_end(sequence_id)
                continue
            del self._live[sequence_id]
            self._expired[sequence_id] = None
            if len(self._expired) > REMEMBERED_EXPIRED:
                self._expired.popitem(last=False)
            self.counts["expired"] += 1

    def clear(self) -> None:
        self._live.clear()

    def _refuse(self, cause: str) -> None:
        self.refusals[cause] += 1


class SequenceScheduler:
    """A stateful version's scheduler: the sequence bookkeeping around the version's own
    scheduler (`inner`), which queues, batches and runs the requests."""

    def __init__(self, inner: VersionScheduler, policy: SequencePolicy) -> None:
        self.label = inner.label
        self._inner = inner
        self._sequence_policy = policy
        self.sequences = SequenceTable(inner.label, policy)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def policy(self) -> SchedulerPolicy:
        return self._inner.policy

    def pending(self) -> int:
        return self._inner.pending()

    def busy(self) -> int:
        return self._inner.busy()

    @property
    def started(self) -> bool:
        return self._loop is not None and self._inner.started

    def start_on(self, loop: asyncio.AbstractEventLoop) -> None:
        self._inner.start_on(loop)
        if self._loop is None:
            self._loop = loop
            self._schedule_sweep()

    @property
    def demotions(self) -> int:
        return self._inner.demotions

    async def infer(self, job: Job) -> Any:
        """From the event loop: the request with its sequence's state, in its sequence's turn."""
        flags = job.sequence
        if flags is None:
            raise InvalidArgument(
                f"model '{self.label}' is stateful (sequence batching): a request needs a "
                "sequence_id, and the first of a sequence sequence_start"
            )
        if self._sequence_policy.batched and job.rows != 1:
            raise InvalidArgument(
                f"model '{self.label}': a request of a sequence carries one row, got {job.rows}"
            )
        for control in self._sequence_policy.controls:
            control.check(flags)
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self.start_on(loop)
        if self._closed:
            raise Retiring(f"model '{self.label}' is being replaced; retry")
        sequence = self.sequences.begin(flags, loop.time())
        ok = False
        try:
            await self._turn(sequence, job.deadline, loop)
            try:
                answer = await self._run(job, flags, sequence)
                ok = True
                return answer
            finally:
                sequence.turn.release()
        finally:
            self.sequences.done(sequence, ok, loop.time())

    async def _turn(
        self, sequence: Sequence, deadline: float | None, loop: asyncio.AbstractEventLoop
    ) -> None:
        """Wait for the sequence's earlier requests, within the request's deadline."""
        timeout = None if deadline is None else max(0.0, deadline - loop.time())
        try:
            await asyncio.wait_for(sequence.turn.acquire(), timeout)
        except TimeoutError:
            raise DeadlineExceeded(
                f"model '{self.label}': the deadline passed while sequence {sequence.id!r}'s "
                "earlier requests ran"
            ) from None
        if self._closed:
            sequence.turn.release()
            raise Retiring(f"model '{self.label}' is being replaced; retry")

    async def _run(self, job: Job, flags: SequenceFlags, sequence: Sequence) -> Any:
        policy = self._sequence_policy
        feeds = {**job.feeds, **sequence.state}
        for control in policy.controls:
            feeds[control.input] = control.value(flags)
        names = [*job.outputs, *(spec.output for spec in policy.states)]
        mine = len(job.outputs)

        def finish(arrays: list[np.ndarray]) -> tuple[Any, list[np.ndarray]]:
            # On the execution thread: the client's answer encoded, the state rows copied out of
            # the batch's outputs (a view would keep the whole batch alive).
            return job.finish(arrays[:mine]), [np.array(a) for a in arrays[mine:]]

        answer, states = await self._inner.infer(
            Job(feeds, names, job.rows, finish, job.priority, job.deadline)
        )
        sequence.state = _next_state(self.label, policy.states, states)
        return answer

    def submit(self, job: Job, on_queued: OnQueued | None = None) -> Any:
        """From a caller's thread (the sync front end): through the event loop, where the
        sequences are kept."""
        if self._loop is None:
            raise Unavailable(f"model '{self.label}' is not started yet; retry")
        return submit_to_loop(self._loop, self.infer(job), on_queued)

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self._inner.close()
        self.sequences.clear()

    def _schedule_sweep(self) -> None:
        """Expired sequences freed even while no request comes (a request sweeps too)."""
        assert self._loop is not None
        interval = min(max(self._sequence_policy.idle_s / 2, 0.05), 30.0)

        def sweep() -> None:
            assert self._loop is not None
            self.sequences.sweep(self._loop.time())
            self._sweeper = self._loop.call_later(interval, sweep)

        self._sweeper = self._loop.call_later(interval, sweep)


def _next_state(
    label: str, specs: tuple[StateSpec, ...], arrays: list[np.ndarray]
) -> dict[str, np.ndarray]:
    state: dict[str, np.ndarray] = {}
    for spec, array in zip(specs, arrays, strict=True):
        if array.shape != spec.initial.shape or array.dtype != spec.initial.dtype:
            raise ExecutionError(
                f"model '{label}': state output '{spec.output}' came back {array.dtype} "
                f"{list(array.shape)}, its state is {spec.initial.dtype} {list(spec.initial.shape)}"
            )
        state[spec.input] = array
    return state
