"""Prometheus metrics on --metrics-address (/metrics), drawn at scrape time from the same
ModelStats that the ModelStatistics RPC reports, so the two never disagree.

Triton's names and labels (model, version). Triton's counters carry no `_total` suffix, and
prometheus-client writes every `counter` family with one, so Triton's cumulative series are
exposed as `untyped` under their exact names (rate() works on them all the same); our own
counters follow the client's convention (`edge_agent_..._total`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import start_http_server
from prometheus_client.core import CollectorRegistry, Metric

from edge_agent.errors import ConfigError
from edge_agent.scheduling.stats import ModelStats
from edge_agent.settings import parse_address

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Served(Protocol):
    """What a collector needs of a loaded model version."""

    name: str
    version: int
    stats: ModelStats

    @property
    def provider(self) -> str: ...

    @property
    def scheduler(self) -> Any: ...


def _add(family: Metric, labels: dict[str, str], value: float, **extra: str) -> None:
    """One sample named after its family (Triton's series carry no suffix)."""
    family.add_sample(family.name, {**labels, **extra}, value)


def _add_version(f: dict[str, Metric], model: Served) -> None:
    """One model version's samples into each of the per-version families."""
    labels = {"model": model.name, "version": str(model.version)}
    s = model.stats.snapshot()
    _add(f["nv_inference_request_success"], labels, s.success.count)
    for reason in ("REJECTED", "CANCELED", "BACKEND", "OTHER"):
        _add(f["nv_inference_request_failure"], labels, s.failures[reason], reason=reason)
    _add(f["nv_inference_count"], labels, s.inference_count)
    _add(f["nv_inference_exec_count"], labels, s.execution_count)
    _add(f["nv_inference_request_duration_us"], labels, (s.success.ns + s.fail.ns) // 1000)
    _add(f["nv_inference_queue_duration_us"], labels, s.queue.ns // 1000)
    _add(f["nv_inference_compute_input_duration_us"], labels, s.compute_input.ns // 1000)
    _add(f["nv_inference_compute_infer_duration_us"], labels, s.compute_infer.ns // 1000)
    _add(f["nv_inference_compute_output_duration_us"], labels, s.compute_output.ns // 1000)
    for cause in ("queue_full", "deadline", "cancelled", "unavailable"):
        f["edge_agent_rejected_requests"].add_sample(
            "edge_agent_rejected_requests_total",
            {**labels, "cause": cause},
            s.rejections.get(cause, 0),
        )
    _add(f["nv_inference_pending_request_count"], labels, model.scheduler.pending())
    _add(f["edge_agent_requests_in_flight"], labels, model.scheduler.busy())
    f["edge_agent_inline_demotions"].add_sample(
        "edge_agent_inline_demotions_total", labels, model.scheduler.demotions
    )
    _add(f["edge_agent_execution_provider"], labels, 1, provider=model.provider)
    counts = {size: b.compute_infer.count for size, b in s.batches.items()}
    _add_histogram(f["edge_agent_batch_size"], labels, counts)
    sequences = getattr(model.scheduler, "sequences", None)  # a stateful model's (sequences.py)
    if sequences is not None:
        _add(f["edge_agent_sequences_live"], labels, sequences.live)
        _add(f["edge_agent_sequence_state_bytes"], labels, sequences.state_bytes)
        for outcome in ("started", "ended", "expired", "restarted", "failed_start"):
            f["edge_agent_sequences"].add_sample(
                "edge_agent_sequences_total",
                {**labels, "outcome": outcome},
                sequences.counts[outcome],
            )
        for cause in ("too_many", "state_bytes", "unknown", "waiting"):
            f["edge_agent_sequence_refusals"].add_sample(
                "edge_agent_sequence_refusals_total",
                {**labels, "cause": cause},
                sequences.refusals[cause],
            )


def _add_histogram(family: Metric, labels: dict[str, str], counts: Mapping[int, int]) -> None:
    """A histogram over BATCH_BUCKETS from exact counts per batch size."""
    name = family.name
    for bound in BATCH_BUCKETS:
        cumulative = sum(c for size, c in counts.items() if size <= bound)
        family.add_sample(f"{name}_bucket", {**labels, "le": str(bound)}, cumulative)
    total = sum(counts.values())
    family.add_sample(f"{name}_bucket", {**labels, "le": "+Inf"}, total)
    family.add_sample(f"{name}_count", labels, total)
    family.add_sample(f"{name}_sum", labels, sum(size * c for size, c in counts.items()))


def _per_key(family: Any, values: Mapping[Any, float]) -> Any:
    """`family` with one sample per key of `values`, in key order, the key as its label."""
    for key, value in sorted(dict(values).items()):
        family.add_metric([str(key)], value)
    return family


def _single(family: Any, value: float) -> Any:
    """`family` with its one unlabelled sample."""
    family.add_metric([], value)
    return family


class Lifecycled(Protocol):
    """What a collector needs of a model's lifecycle (repository/registry.py ModelEntry)."""

    name: str

    @property
    def lifecycle(self) -> Any: ...


# Triton's cumulative series, written as "unknown" to keep their names free of `_total`.
TRITON_COUNTERS = {
    "nv_inference_request_success": "Successful inference requests",
    "nv_inference_request_failure": "Failed inference requests, by reason",
    "nv_inference_count": "Inferences performed (batch rows)",
    "nv_inference_exec_count": "Model executions (batches)",
    "nv_inference_request_duration_us": "Cumulative request duration, microseconds",
    "nv_inference_queue_duration_us": "Cumulative time requests waited, microseconds",
    "nv_inference_compute_input_duration_us": "Cumulative input preparation, microseconds",
    "nv_inference_compute_infer_duration_us": "Cumulative model execution, microseconds",
    "nv_inference_compute_output_duration_us": "Cumulative output handling, microseconds",
}
# The other per-version families: (name, help, type), in the order a scrape lists them.
VERSION_FAMILIES = (
    (
        "edge_agent_rejected_requests",
        "Requests refused or dropped unexecuted, by cause",
        "counter",
    ),
    ("nv_inference_pending_request_count", "Requests waiting in the queue", "gauge"),
    ("edge_agent_requests_in_flight", "Requests of the version queued or executing now", "gauge"),
    (
        "edge_agent_execution_provider",
        "1 for the execution provider a model version actually runs on",
        "gauge",
    ),
    ("edge_agent_batch_size", "Rows per model execution", "histogram"),
    (
        "edge_agent_inline_demotions",
        "Times the version was moved from inline to threaded execution by slow runs",
        "counter",
    ),
    # Stateful models only (sequence batching).
    ("edge_agent_sequences_live", "Sequences whose state the version holds now", "gauge"),
    ("edge_agent_sequence_state_bytes", "Bytes of state the live sequences hold", "gauge"),
    (
        "edge_agent_sequences",
        "Sequences started, ended, expired (idle too long), restarted (a start for a live id) "
        "and dropped because their start failed",
        "counter",
    ),
    (
        "edge_agent_sequence_refusals",
        "Sequence requests refused: too many live sequences, state bytes, an unknown or "
        "expired sequence, too many requests of one sequence waiting",
        "counter",
    ),
)


class AgentCollector:
    def __init__(
        self,
        versions: Callable[[], Iterable[Served]],
        entries: Callable[[], Iterable[Lifecycled]] = lambda: (),
    ) -> None:
        self._versions = versions
        self._entries = entries

    def collect(self) -> Iterator[Metric]:
        families = {name: Metric(name, doc, "unknown") for name, doc in TRITON_COUNTERS.items()}
        families.update((name, Metric(name, doc, kind)) for name, doc, kind in VERSION_FAMILIES)
        for model in self._versions():
            _add_version(families, model)
        yield from families.values()
        yield from self._lifecycle()

    def _lifecycle(self) -> Iterator[Metric]:
        swaps = Metric("edge_agent_model_swaps", "Version swaps completed, by policy", "counter")
        failures = Metric(
            "edge_agent_model_load_failures",
            "Model or version loads that failed (the serving version stayed)",
            "counter",
        )
        pause = Metric(
            "edge_agent_model_swap_pause_seconds",
            "How long requests waited during the last swap (drain_first; 0 with overlap)",
            "gauge",
        )
        peak = Metric(
            "edge_agent_model_swap_peak_rss_bytes",
            "Peak resident memory of the process during the last swap",
            "gauge",
        )
        for entry in self._entries():
            labels = {"model": entry.name}
            life = entry.lifecycle
            for policy, count in sorted(life.swaps.items()):
                swaps.add_sample(
                    "edge_agent_model_swaps_total", {**labels, "policy": policy}, count
                )
            failures.add_sample("edge_agent_model_load_failures_total", labels, life.load_failures)
            _add(pause, labels, life.last_pause_s)
            _add(peak, labels, life.last_peak_rss_bytes)
        yield from (swaps, failures, pause, peak)


class _StatsCollector:
    """A collector that reads one stats object, at scrape time."""

    def __init__(self, stats: Any) -> None:
        self._stats = stats


class SyncCollector(_StatsCollector):
    """edge_agent_sync_* from the sync task's stats (sync/reports.py SyncStats), read at scrape."""

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self._stats
        yield _single(
            CounterMetricFamily(
                "edge_agent_sync_bytes", "Blob bytes received from the control plane"
            ),
            stats.bytes_total,
        )
        yield _per_key(
            CounterMetricFamily(
                "edge_agent_sync_failures", "Failed sync steps by reason", labels=["reason"]
            ),
            stats.failures,
        )
        yield _single(
            GaugeMetricFamily(
                "edge_agent_sync_last_success_timestamp_seconds",
                "When the control plane last answered (unix time; 0 = never)",
            ),
            stats.last_success,
        )
        versions = GaugeMetricFamily(
            "edge_agent_sync_model_version",
            "Newest version installed by sync, and the version serving, per model",
            labels=["model", "kind"],
        )
        for model, version in sorted(dict(stats.installed).items()):
            versions.add_metric([model, "installed"], version)
        for model, version in sorted(dict(stats.serving).items()):
            versions.add_metric([model, "serving"], version)
        yield versions


class ConnectionCollector:
    """edge_agent_connections (open, per listener port) and edge_agent_connections_closed_total
    (by reason: peer_cap, no_request) from rpc/connections.py's GuardStats."""

    def __init__(self, stats: Any, prefix: str = "edge_agent") -> None:
        self._stats = stats
        self._prefix = prefix

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield _per_key(
            GaugeMetricFamily(
                f"{self._prefix}_connections",
                "Established connections per listener port (at the guard's last scan)",
                labels=["port"],
            ),
            self._stats.open,
        )
        yield _per_key(
            CounterMetricFamily(
                f"{self._prefix}_connections_closed",
                "Connections the guard shut: over the per-peer cap, or no call in time",
                labels=["reason"],
            ),
            self._stats.closed,
        )


class ExampleCollector(_StatsCollector):
    """edge_agent_examples_* from the example store (learn/examples.py), per model."""

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield _per_key(
            GaugeMetricFamily(
                "edge_agent_examples_stored",
                "Labelled examples kept for learning",
                labels=["model"],
            ),
            self._stats.stored,
        )
        for name, text, values in (
            ("dropped", "Examples dropped, oldest first, to stay within the store's size",
             self._stats.dropped),
            ("refused", "Submissions refused as malformed", self._stats.refused),
        ):  # fmt: skip
            yield _per_key(
                CounterMetricFamily(f"edge_agent_examples_{name}", text, labels=["model"]), values
            )


class LearningCollector(_StatsCollector):
    """edge_agent_learning_* from the learner (learn/participant.py)."""

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self._stats
        yield _per_key(
            CounterMetricFamily(
                "edge_agent_learning_runs", "Local training runs by result", labels=["result"]
            ),
            stats.runs,
        )
        for kind, name, text, value in (
            (CounterMetricFamily, "updates_sent", "Updates uploaded", stats.updates_sent),
            (CounterMetricFamily, "bytes_up", "Update bytes uploaded", stats.bytes_up),
            (GaugeMetricFamily, "last_run_seconds", "How long the last local run took",
             stats.last_run_seconds),
            (CounterMetricFamily, "paused_seconds",
             "Time local training waited for serving (train_when = idle)", stats.paused_seconds),
            (CounterMetricFamily, "pauses", "Times local training stopped for serving",
             stats.pauses),
            (CounterMetricFamily, "worker_starts", "Training worker processes started",
             stats.worker_starts),
        ):  # fmt: skip
            yield _single(kind(f"edge_agent_learning_{name}", text), value)


class MetricsServer:
    """The /metrics endpoint on its own thread (prometheus-client's HTTP server)."""

    def __init__(
        self,
        address: str,
        versions: Callable[[], Iterable[Served]],
        entries: Callable[[], Iterable[Lifecycled]] = lambda: (),
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(AgentCollector(versions, entries))
        self._address = address
        self._server: Any = None
        self.port: int | None = None

    def start(self) -> int:
        host, port = parse_address(self._address, "metrics_address")
        try:
            self._server, _ = start_http_server(port, addr=host.strip("[]"), registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"metrics_address: cannot listen on {self._address}: {exc}") from exc
        self.port = int(self._server.server_address[1])
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
