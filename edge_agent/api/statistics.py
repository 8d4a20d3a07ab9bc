"""ModelStats -> the protocol's ModelStatistics message."""

from __future__ import annotations

from edge_agent._proto import grpc_service_pb2 as pb
from edge_agent.scheduling.stats import Duration, ModelStats


def _fill(target: pb.StatisticDuration, source: Duration) -> None:
    target.count, target.ns = source.count, source.ns


def fill_statistics(out: pb.ModelStatistics, name: str, version: int, stats: ModelStats) -> None:
    snap = stats.snapshot()
    out.name, out.version = name, str(version)
    out.last_inference = snap.last_inference_ms
    out.inference_count = snap.inference_count
    out.execution_count = snap.execution_count
    inference = out.inference_stats
    for field in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
        _fill(getattr(inference, field), getattr(snap, field))
    for size, batch in sorted(snap.batches.items()):
        entry = out.batch_stats.add(batch_size=size)
        _fill(entry.compute_input, batch.compute_input)
        _fill(entry.compute_infer, batch.compute_infer)
        _fill(entry.compute_output, batch.compute_output)
