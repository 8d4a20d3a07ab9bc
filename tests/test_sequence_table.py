"""The sequence batcher's bookkeeping (scheduling/sequences.py) without a server: starts, ends,
idle expiry, the caps, and the control inputs' values."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.errors import InvalidArgument, Unavailable
from edge_agent.scheduling.sequences import (
    CORRID,
    END,
    READY,
    START,
    ControlSpec,
    SequenceFlags,
    SequencePolicy,
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
    table.done(first, end=False, now=0.1)
    again = table.begin(SequenceFlags(7), now=0.2)
    assert again is first
    table.done(again, end=True, now=0.3)
    assert table.live == 0 and table.counts["started"] == 1 and table.counts["ended"] == 1
    with pytest.raises(InvalidArgument, match="is not started"):
        table.begin(SequenceFlags(7), now=0.4)
    assert table.refusals["unknown"] == 1


def test_a_second_start_is_refused_and_the_first_goes_on() -> None:
    table = SequenceTable("m/1", policy())
    live = table.begin(SequenceFlags("mic", start=True), now=0.0)
    table.done(live, end=False, now=0.0)
    with pytest.raises(InvalidArgument, match="already started"):
        table.begin(SequenceFlags("mic", start=True), now=0.1)
    assert table.begin(SequenceFlags("mic"), now=0.2) is live
    assert table.refusals["second_start"] == 1


def test_idle_sequences_expire_but_busy_ones_do_not() -> None:
    table = SequenceTable("m/1", policy(idle_s=1.0))
    idle = table.begin(SequenceFlags(1, start=True), now=0.0)
    table.done(idle, end=False, now=0.0)
    busy = table.begin(SequenceFlags(2, start=True), now=0.0)  # its request still runs
    table.sweep(now=5.0)
    assert table.live == 1 and table.counts["expired"] == 1
    with pytest.raises(InvalidArgument, match="expired after 1 s idle"):
        table.begin(SequenceFlags(1), now=5.0)
    table.done(busy, end=False, now=5.0)
    assert table.begin(SequenceFlags(2), now=5.5) is busy  # idle 0.5 s only
    # An expired id can start again.
    table.begin(SequenceFlags(1, start=True), now=6.0)


def test_caps_on_live_sequences_and_state_bytes() -> None:
    table = SequenceTable("m/1", policy(max_sequences=2))
    for n in (1, 2):
        table.done(table.begin(SequenceFlags(n, start=True), now=0.0), end=False, now=0.0)
    with pytest.raises(Unavailable, match="2 live sequences"):
        table.begin(SequenceFlags(3, start=True), now=0.0)
    table.done(table.begin(SequenceFlags(1), now=0.0), end=True, now=0.0)
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
