"""The sequence batcher's bookkeeping (scheduling/sequences.py) without a server: starts, ends,
idle expiry, the caps, and the control inputs' values."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from edge_agent.errors import DeadlineExceeded, InvalidArgument, QueueFull, Unavailable
from edge_agent.scheduling.queues import Job
from edge_agent.scheduling.sequences import (
    CORRID,
    END,
    MAX_WAITING,
    READY,
    START,
    ControlSpec,
    SequenceFlags,
    SequencePolicy,
    SequenceScheduler,
    SequenceTable,
    StateSpec,
)


def policy(**limits: float) -> SequencePolicy:
    state = StateSpec("h_in", "h_out", np.zeros((1, 4), np.float32))  # 16 bytes a sequence
    return SequencePolicy((state,), (), True, **limits)  # type: ignore[arg-type]


def test_start_continue_end() -> None:
    table = SequenceTable("m/1", policy())
    first = table.begin(SequenceFlags(7, start=True), now=0.0)
    assert table.live == 1 and first.busy == 1
    assert first.state["h_in"].shape == (1, 4)
    table.done(first, ok=True, now=0.1)
    again = table.begin(SequenceFlags(7, end=True), now=0.2)  # ended on arrival
    assert again is first
    table.done(again, ok=True, now=0.3)
    assert table.live == 0 and table.counts["started"] == 1 and table.counts["ended"] == 1
    with pytest.raises(InvalidArgument, match="is not started"):
        table.begin(SequenceFlags(7), now=0.4)
    assert table.refusals["unknown"] == 1


def test_a_start_for_a_live_sequence_starts_it_again() -> None:
    table = SequenceTable("m/1", policy())
    old = table.begin(SequenceFlags("mic", start=True), now=0.0)
    table.done(old, ok=True, now=0.0)
    old.state = {"h_in": np.ones((1, 4), np.float32)}
    new = table.begin(SequenceFlags("mic", start=True), now=0.1)
    assert new is not old and not new.state["h_in"].any()
    assert table.live == 1 and table.counts["restarted"] == 1


def test_idle_sequences_expire_but_busy_ones_do_not() -> None:
    table = SequenceTable("m/1", policy(idle_s=1.0))
    idle = table.begin(SequenceFlags(1, start=True), now=0.0)
    table.done(idle, ok=True, now=0.0)
    busy = table.begin(SequenceFlags(2, start=True), now=0.0)  # its request still runs
    table.sweep(now=5.0)
    assert table.live == 1 and table.counts["expired"] == 1
    with pytest.raises(InvalidArgument, match="expired after 1 s idle"):
        table.begin(SequenceFlags(1), now=5.0)
    table.done(busy, ok=True, now=5.0)
    assert table.begin(SequenceFlags(2), now=5.5) is busy  # idle 0.5 s only
    # An expired id can start again.
    table.begin(SequenceFlags(1, start=True), now=6.0)


def test_caps_on_live_sequences_and_state_bytes() -> None:
    table = SequenceTable("m/1", policy(max_sequences=2))
    for n in (1, 2):
        table.done(table.begin(SequenceFlags(n, start=True), now=0.0), ok=True, now=0.0)
    with pytest.raises(Unavailable, match="2 live sequences"):
        table.begin(SequenceFlags(3, start=True), now=0.0)
    table.done(table.begin(SequenceFlags(1, end=True), now=0.0), ok=True, now=0.0)
    table.begin(SequenceFlags(3, start=True), now=0.0)
    assert table.refusals["too_many"] == 1
    tight = SequenceTable("m/1", policy(max_state_bytes=40))  # room for two 16-byte states
    for n in (1, 2):
        tight.begin(SequenceFlags(n, start=True), now=0.0)
    assert tight.state_bytes == 32
    with pytest.raises(Unavailable, match="40 bytes"):
        tight.begin(SequenceFlags(3, start=True), now=0.0)
    assert tight.refusals["state_bytes"] == 1


def test_control_values() -> None:
    start = ControlSpec("S", START, np.dtype(np.int32), (1, 1), (0, 1))
    end = ControlSpec("E", END, np.dtype(np.float32), (1, 1), (0.0, 1.0))
    ready = ControlSpec("R", READY, np.dtype(np.bool_), (1, 1), (False, True))
    corrid = ControlSpec("C", CORRID, np.dtype(np.uint64), (1, 1))
    flags = SequenceFlags(12, start=True)
    assert start.value(flags).tolist() == [[1]] and start.value(SequenceFlags(12)).tolist() == [[0]]
    assert end.value(flags).tolist() == [[0.0]]
    assert end.value(SequenceFlags(12, end=True)).tolist() == [[1.0]]
    assert ready.value(flags).tolist() == [[True]]
    assert corrid.value(flags).tolist() == [[12]] and corrid.value(flags).dtype == np.uint64
    with pytest.raises(InvalidArgument, match="takes a number"):
        corrid.check(SequenceFlags("mic", start=True))
    with pytest.raises(InvalidArgument, match="does not fit"):
        ControlSpec("C", CORRID, np.dtype(np.int32), (1,)).check(SequenceFlags(1 << 40))
    text = ControlSpec("C", CORRID, np.dtype(object), (1,))
    assert text.value(SequenceFlags("mic")).tolist() == [b"mic"]


class Inner:
    """A version's scheduler stand-in: answers each request with its feeds, or fails, or waits
    for `gate`."""

    label = "m/1"
    policy = None
    started = True
    demotions = 0

    def __init__(self) -> None:
        self.fail_next = False
        self.gate: asyncio.Event | None = None
        self.ran: list[dict[str, np.ndarray]] = []

    def pending(self) -> int:
        return 0

    def busy(self) -> int:
        return 0

    def start_on(self, loop: asyncio.AbstractEventLoop) -> None:
        pass

    async def infer(self, job: Job) -> Any:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise QueueFull("full")
        self.ran.append(job.feeds)
        h = job.feeds["h_in"] + job.feeds["x"]
        return job.finish([h, h])

    async def close(self) -> None:
        pass


def scheduler(inner: Inner) -> SequenceScheduler:
    return SequenceScheduler(inner, policy(idle_s=60.0))  # type: ignore[arg-type]


def request(sequence: SequenceFlags, x: float = 1.0, deadline: float | None = None) -> Job:
    feeds = {"x": np.full((1, 4), x, np.float32)}
    return Job(feeds, ["y"], 1, lambda arrays: float(arrays[0][0, 0]), 0, deadline, sequence)


async def test_a_failed_start_leaves_no_sequence_behind() -> None:
    inner = Inner()
    sequences = scheduler(inner)
    inner.fail_next = True
    with pytest.raises(QueueFull):
        await sequences.infer(request(SequenceFlags(1, start=True)))
    assert sequences.sequences.live == 0 and sequences.sequences.counts["failed_start"] == 1
    assert await sequences.infer(request(SequenceFlags(1, start=True))) == 1.0  # the retry
    assert await sequences.infer(request(SequenceFlags(1), 2.0)) == 3.0
    # A later failure keeps the sequence and its state.
    inner.fail_next = True
    with pytest.raises(QueueFull):
        await sequences.infer(request(SequenceFlags(1), 5.0))
    assert await sequences.infer(request(SequenceFlags(1, end=True), 1.0)) == 4.0


async def test_an_end_frees_the_id_on_arrival() -> None:
    inner = Inner()
    sequences = scheduler(inner)
    await sequences.infer(request(SequenceFlags(2, start=True)))
    inner.gate = asyncio.Event()
    ending = asyncio.ensure_future(sequences.infer(request(SequenceFlags(2, end=True))))
    await asyncio.sleep(0)
    assert sequences.sequences.live == 0  # ended on arrival, still running
    with pytest.raises(InvalidArgument, match="is not started"):
        await sequences.infer(request(SequenceFlags(2)))
    restart = asyncio.ensure_future(sequences.infer(request(SequenceFlags(2, start=True), 7.0)))
    inner.gate.set()
    assert await ending == 2.0 and await restart == 7.0


async def test_a_request_waits_its_turn_within_its_deadline() -> None:
    inner = Inner()
    sequences = scheduler(inner)
    await sequences.infer(request(SequenceFlags(3, start=True)))
    inner.gate = asyncio.Event()
    first = asyncio.ensure_future(sequences.infer(request(SequenceFlags(3))))
    await asyncio.sleep(0)
    soon = asyncio.get_running_loop().time() + 0.05
    with pytest.raises(DeadlineExceeded, match="earlier requests"):
        await sequences.infer(request(SequenceFlags(3), deadline=soon))
    inner.gate.set()
    assert await first == 2.0
    assert await sequences.infer(request(SequenceFlags(3))) == 3.0  # the late one never ran


async def test_too_many_requests_of_one_sequence_at_once_are_refused() -> None:
    inner = Inner()
    sequences = scheduler(inner)
    await sequences.infer(request(SequenceFlags(4, start=True)))
    inner.gate = asyncio.Event()
    waiting = [
        asyncio.ensure_future(sequences.infer(request(SequenceFlags(4))))
        for _ in range(MAX_WAITING)
    ]
    await asyncio.sleep(0)
    with pytest.raises(QueueFull, match="in progress already"):
        await sequences.infer(request(SequenceFlags(4)))
    inner.gate.set()
    assert sorted(await asyncio.gather(*waiting)) == [float(n) for n in range(2, MAX_WAITING + 2)]


def test_a_wide_corrid_takes_every_id_of_its_type() -> None:
    corrid = ControlSpec("C", CORRID, np.dtype(np.int64), (1, 1))
    corrid.check(SequenceFlags(1 << 40))
    assert corrid.value(SequenceFlags(1 << 40)).tolist() == [[1 << 40]]
    with pytest.raises(InvalidArgument, match="does not fit"):
        corrid.check(SequenceFlags(1 << 63))
