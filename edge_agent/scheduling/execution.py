"""Running one batch: collate the requests' inputs, run the model once, split the outputs by
request and finish each (encode its response), with the execution statistics. Whoever holds an
instance calls it: an execution thread, the event loop (inline), or a caller's thread."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from edge_agent.scheduling.batching import collate, split, union_outputs
from edge_agent.scheduling.queues import Outcome, Pending
from edge_agent.scheduling.stats import ModelStats

# (feeds, output names) -> one array per output name. Runs on an execution thread.
Execute = Callable[[dict[str, np.ndarray], list[str]], Sequence[np.ndarray]]


class Execution:
    def __init__(self, execute: Execute, stats: ModelStats) -> None:
        self._execute = execute
        self._stats = stats

    def compute(self, batch: list[Pending]) -> list[Outcome]:
        """One outcome per request of `batch`, in its order; never raises (the execute
        function translates ONNX Runtime's errors into ours; anything else fails the batch)."""
        if len(batch) == 1:
            return [self._compute_one(batch[0])]
        try:
            started = time.perf_counter_ns()
            feeds = collate([r.feeds for r in batch])
            names = union_outputs([r.outputs for r in batch])
            collated = time.perf_counter_ns()
            results = dict(zip(names, self._execute(feeds, names), strict=True))
            ran = time.perf_counter_ns()
            parts = split(results, [r.rows for r in batch], [r.outputs for r in batch])
            outcomes = [_finish(request, part) for part, request in zip(parts, batch, strict=True)]
            finished = time.perf_counter_ns()
            self._stats.record_execution(
                sum(r.rows for r in batch),
                len(batch),
                collated - started,
                ran - collated,
                finished - ran,
            )
        except Exception as exc:
            outcomes = [(False, exc)] * len(batch)
        return outcomes

    def _compute_one(self, request: Pending) -> Outcome:
        """`compute` for a batch of one (the common case at low load): nothing to collate."""
        try:
            started = time.perf_counter_ns()
            arrays = self._execute(request.feeds, request.outputs)
            ran = time.perf_counter_ns()
            outcome = _finish(request, list(arrays))
            self._stats.record_execution(
                request.rows, 1, 0, ran - started, time.perf_counter_ns() - ran
            )
        except Exception as exc:
            outcome = (False, exc)
        return outcome


def _finish(request: Pending, outputs: list[np.ndarray]) -> Outcome:
    try:
        return True, request.finish(outputs)
    except Exception as exc:  # e.g. an output larger than its shared memory region
        return False, exc
