"""Prometheus metrics on --metrics-address (/metrics), drawn at scrape time from the same
ModelStats that the ModelStatistics RPC reports, so the two never disagree.

Triton's names and labels (model, version). Triton's counters carry no `_total` suffix, and
prometheus-client writes every `counter` family with one, so Triton's cumulative series are
exposed as `untyped` under their exact names (rate() works on them all the same); our own
counters follow the client's convention (`edge_agent_..._total`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
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


class Lifecycled(Protocol):
    """What a collector needs of a model's lifecycle (repository/registry.py ModelEntry)."""

    name: str

    @property
    def lifecycle(self) -> Any: ...


class AgentCollector:
    def __init__(
        self,
        versions: Callable[[], Iterable[Served]],
        entries: Callable[[], Iterable[Lifecycled]] = lambda: (),
    ) -> None:
        self._versions = versions
        self._entries = entries

    def collect(self) -> Iterator[Metric]:
        counters = {
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
        families = {name: Metric(name, doc, "unknown") for name, doc in counters.items()}
        families["edge_agent_rejected_requests"] = Metric(
            "edge_agent_rejected_requests",
            "Requests refused or dropped unexecuted, by cause",
            "counter",
        )
        pending = Metric(
            "nv_inference_pending_request_count", "Requests waiting in the queue", "gauge"
        )
        in_flight = Metric(
            "edge_agent_requests_in_flight",
            "Requests of the version queued or executing now",
            "gauge",
        )
        provider = Metric(
            "edge_agent_execution_provider",
            "1 for the execution provider a model version actually runs on",
            "gauge",
        )
        batch_size = Metric("edge_agent_batch_size", "Rows per model execution", "histogram")
        demoted = Metric(
            "edge_agent_inline_demotions",
            "Times the version was moved from inline to threaded execution by slow runs",
            "counter",
        )
        for model in self._versions():
            labels = {"model": model.name, "version": str(model.version)}
            s = model.stats.snapshot()
            f = families
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
                families["edge_agent_rejected_requests"].add_sample(
                    "edge_agent_rejected_requests_total",
                    {**labels, "cause": cause},
                    s.rejections.get(cause, 0),
                )
            _add(pending, labels, model.scheduler.pending())
            _add(in_flight, labels, model.scheduler.busy())
            demoted.add_sample(
                "edge_agent_inline_demotions_total", labels, model.scheduler.demotions
            )
            _add(provider, labels, 1, provider=model.provider)
            counts = {size: b.compute_infer.count for size, b in s.batches.items()}
            for bound in BATCH_BUCKETS:
                cumulative = sum(c for size, c in counts.items() if size <= bound)
                batch_size.add_sample(
                    "edge_agent_batch_size_bucket", {**labels, "le": str(bound)}, cumulative
                )
            total = sum(counts.values())
            batch_size.add_sample("edge_agent_batch_size_bucket", {**labels, "le": "+Inf"}, total)
            batch_size.add_sample("edge_agent_batch_size_count", labels, total)
            batch_size.add_sample(
                "edge_agent_batch_size_sum", labels, sum(size * c for size, c in counts.items())
            )
        yield from families.values()
        yield pending
        yield in_flight
        yield provider
        yield batch_size
        yield demoted
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


class SyncCollector:
    """edge_agent_sync_* from the sync task's stats (sync/syncer.py SyncStats), read at scrape."""

    def __init__(self, stats: Any) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self._stats
        sent = CounterMetricFamily(
            "edge_agent_sync_bytes", "Blob bytes received from the control plane"
        )
        sent.add_metric([], stats.bytes_total)
        yield sent
        failures = CounterMetricFamily(
            "edge_agent_sync_failures", "Failed sync steps by reason", labels=["reason"]
        )
        for reason, count in sorted(dict(stats.failures).items()):
            failures.add_metric([reason], count)
        yield failures
        last = GaugeMetricFamily(
            "edge_agent_sync_last_success_timestamp_seconds",
            "When the control plane last answered (unix time; 0 = never)",
        )
        last.add_metric([], stats.last_success)
        yield last
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

        open_now = GaugeMetricFamily(
            f"{self._prefix}_connections",
            "Established connections per listener port (at the guard's last scan)",
            labels=["port"],
        )
        for port, count in sorted(dict(self._stats.open).items()):
            open_now.add_metric([str(port)], count)
        yield open_now
        closed = CounterMetricFamily(
            f"{self._prefix}_connections_closed",
            "Connections the guard shut: over the per-peer cap, or no call in time",
            labels=["reason"],
        )
        for reason, count in sorted(dict(self._stats.closed).items()):
            closed.add_metric([reason], count)
        yield closed


class ExampleCollector:
    """edge_agent_examples_* from the example store (learn/examples.py), per model."""

    def __init__(self, stats: Any) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stored = GaugeMetricFamily(
            "edge_agent_examples_stored", "Labelled examples kept for learning", labels=["model"]
        )
        for model, count in sorted(dict(self._stats.stored).items()):
            stored.add_metric([model], count)
        yield stored
        for name, text, values in (
            ("dropped", "Examples dropped, oldest first, to stay within the store's size",
             self._stats.dropped),
            ("refused", "Submissions refused as malformed", self._stats.refused),
        ):  # fmt: skip
            family = CounterMetricFamily(f"edge_agent_examples_{name}", text, labels=["model"])
            for model, count in sorted(dict(values).items()):
                family.add_metric([model], count)
            yield family


class LearningCollector:
    """edge_agent_learning_* from the learner (learn/participant.py)."""

    def __init__(self, stats: Any) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        runs = CounterMetricFamily(
            "edge_agent_learning_runs", "Local training runs by result", labels=["result"]
        )
        for result, count in sorted(dict(self._stats.runs).items()):
            runs.add_metric([result], count)
        yield runs
        sent = CounterMetricFamily("edge_agent_learning_updates_sent", "Updates uploaded")
        sent.add_metric([], self._stats.updates_sent)
        yield sent
        up = CounterMetricFamily("edge_agent_learning_bytes_up", "Update bytes uploaded")
        up.add_metric([], self._stats.bytes_up)
        yield up
        last = GaugeMetricFamily(
            "edge_agent_learning_last_run_seconds", "How long the last local run took"
        )
        last.add_metric([], self._stats.last_run_seconds)
        yield last
        paused = CounterMetricFamily(
            "edge_agent_learning_paused_seconds",
            "Time local training waited for serving (train_when = idle)",
        )
        paused.add_metric([], self._stats.paused_seconds)
        yield paused
        pauses = CounterMetricFamily(
            "edge_agent_learning_pauses", "Times local training stopped for serving"
        )
        pauses.add_metric([], self._stats.pauses)
        yield pauses
        starts = CounterMetricFamily(
            "edge_agent_learning_worker_starts", "Training worker processes started"
        )
        starts.add_metric([], self._stats.worker_starts)
        yield starts


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
