"""Per-version statistics: the one source of the ModelStatistics RPC and the Prometheus metrics.

Durations are nanoseconds from time.monotonic_ns / perf_counter_ns. Updated from the event loop
and the execution threads, so every update takes the lock (a few additions: cheap)."""

from __future__ import annotations

import bisect
import collections
import copy
import dataclasses
import threading
import time

from edge_agent.errors import (
    DeadlineExceeded,
    EdgeAgentError,
    ExecutionError,
    QueueFull,
    Unavailable,
)


@dataclasses.dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclasses.dataclass
class BatchStats:
    compute_input: Duration = dataclasses.field(default_factory=Duration)
    compute_infer: Duration = dataclasses.field(default_factory=Duration)
    compute_output: Duration = dataclasses.field(default_factory=Duration)


# Request latency buckets (upper bounds, milliseconds) of the health a device reports to its
# control plane (sync/health.py): fixed, so that counts from many devices add up exactly.
# At most 1.5x apart, so a p99 read from them (interpolated within a bucket) tells a version 30%
# slower from the one before it.
LATENCY_BUCKETS_MS = (
    0.5, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 150, 200, 300, 500, 750, 1000,
    1500, 2000, 3000, 5000,
)  # fmt: skip
_BUCKET_BOUNDS_NS = tuple(int(ms * 1_000_000) for ms in LATENCY_BUCKETS_MS)

# Triton's failure reasons for nv_inference_request_failure.
REJECTED, CANCELED, BACKEND, OTHER = "REJECTED", "CANCELED", "BACKEND", "OTHER"


class ModelStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.success = Duration()
        self.fail = Duration()
        self.queue = Duration()
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self.batches: dict[int, BatchStats] = {}
        self.failures: collections.Counter[str] = collections.Counter()  # by Triton reason
        self.rejections: collections.Counter[str] = collections.Counter()  # by our cause
        # Requests (successes and failures) by latency: LATENCY_BUCKETS_MS, then one beyond.
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS_MS) + 1)

    def record_execution(
        self, rows: int, requests: int, input_ns: int, infer_ns: int, output_ns: int
    ) -> None:
        """One batch ran: each of its requests is charged the batch's compute time (Triton's
        convention, so ns / count is the compute time a request saw)."""
        with self._lock:
            self.inference_count += rows
            self.execution_count += 1
            self.last_inference_ms = time.time_ns() // 1_000_000
            for total, ns in (
                (self.compute_input, input_ns),
                (self.compute_infer, infer_ns),
                (self.compute_output, output_ns),
            ):
                total.count += requests
                total.ns += ns * requests
            batch = self.batches.get(rows)
            if batch is None:
                batch = self.batches[rows] = BatchStats()
            batch.compute_input.add(input_ns)
            batch.compute_infer.add(infer_ns)
            batch.compute_output.add(output_ns)

    def record_queue(self, ns: int) -> None:
        with self._lock:
            self.queue.add(ns)

    def record_success(self, ns: int) -> None:
        bucket = bisect.bisect_left(_BUCKET_BOUNDS_NS, ns)
        with self._lock:
            self.success.add(ns)
            self.latency_buckets[bucket] += 1

    def record_failure(self, ns: int, reason: str, cause: str | None = None) -> None:
        """A failed request; `cause` (queue_full, deadline, cancelled, draining) also counts it
        as a rejection."""
        bucket = bisect.bisect_left(_BUCKET_BOUNDS_NS, ns)
        with self._lock:
            self.fail.add(ns)
            self.latency_buckets[bucket] += 1
            self.failures[reason] += 1
            if cause is not None:
                self.rejections[cause] += 1

    def snapshot(self) -> ModelStats:
        """A consistent copy for a reader (RPC or scrape)."""
        with self._lock:
            state = copy.deepcopy({k: v for k, v in vars(self).items() if k != "_lock"})
        snap = ModelStats()
        vars(snap).update(state)
        return snap


def failure_kind(exc: BaseException) -> tuple[str, str | None]:
    """(Triton's failure reason, our rejection cause or None) for the metrics."""
    if isinstance(exc, QueueFull):
        return REJECTED, "queue_full"
    if isinstance(exc, DeadlineExceeded):
        return REJECTED, "deadline"
    if isinstance(exc, Unavailable):
        return REJECTED, "unavailable"
    if isinstance(exc, ExecutionError) or not isinstance(exc, EdgeAgentError):
        return BACKEND, None
    return OTHER, None
