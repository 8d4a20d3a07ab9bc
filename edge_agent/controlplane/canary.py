"""Canary analysis: a canary rollout's cohort judged on how it serves, against the devices still on
the version before it, over the same window (the stage's start to now).

On by default for every canary rollout. A canary is judged once it has served `min_requests`
(a quiet canary is not judged on noise): a failure share more than `max_error_rate_increase`
above the baseline's, a p99 latency more than `max_p99_ratio` times the baseline's, or a mean
resident memory more than `max_memory_ratio` times the baseline's is a regression, and the
rollout is rolled back (its devices return to the version before). A canary that stays healthy
for `bake_seconds` moves to its next stage (`stages`, e.g. 5, 25, 100 percent), or is done.

The defaults, as a cautious operator would pick them:
- max_error_rate_increase 0.01: one failed request in a hundred more than the baseline; the
  baseline's own failures (clients' bad inputs, overload) cancel out.
- max_p99_ratio 1.5: a tail half again as slow; the p99 comes from buckets at most 1.5x apart,
  interpolated, and a window of 100+ requests puts its noise well under that on one device.
- max_memory_ratio 1.5: memory is the edge device's hard limit; model weights are most of it,
  and a version half again as large is worth a person's look.
- min_requests 100: the 99th percentile of fewer than 100 requests is their slowest one.
- bake_seconds 60: counted from the stage's start (download and install included): with the
  agent's default 30 s long-poll, a report or two of each canary device; long enough for a
  warm-up effect to pass, short enough to keep a rollout moving.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from edge_agent._proto import fleet_pb2 as pb
from edge_agent.controlplane.registry.health import Figures
from edge_agent.errors import InvalidArgument

WAITING, HEALTHY, PROMOTED, REGRESSED, OFF = "waiting", "healthy", "promoted", "regressed", "off"
JUDGE_S = 5.0  # how often the control plane judges its canaries
MAX_STAGES = 10


@dataclasses.dataclass(frozen=True)
class Analysis:
    enabled: bool = True
    max_error_rate_increase: float = 0.01
    max_p99_ratio: float = 1.5
    max_memory_ratio: float = 1.5
    min_requests: int = 100
    bake_seconds: float = 60.0
    stages: tuple[float, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "stages": list(self.stages)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Analysis:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "stages" in values:
            values["stages"] = tuple(values["stages"])
        return cls(**values)

    def message(self) -> pb.CanaryAnalysis:
        return pb.CanaryAnalysis(
            disabled=not self.enabled,
            max_error_rate_increase=self.max_error_rate_increase,
            max_p99_ratio=self.max_p99_ratio,
            max_memory_ratio=self.max_memory_ratio,
            min_requests=self.min_requests,
            bake_seconds=self.bake_seconds,
            stages=self.stages,
        )


def analysis_of(message: pb.CanaryAnalysis, canary_percent: float) -> Analysis:
    """The request's analysis with the defaults filled in; InvalidArgument naming a bad field.
    Stages must rise, end at or below 100, and start at the rollout's canary percent."""
    default = Analysis()
    values: dict[str, Any] = {"enabled": not message.disabled}
    for name in ("max_error_rate_increase", "max_p99_ratio", "max_memory_ratio", "bake_seconds"):
        if message.HasField(name):
            value = getattr(message, name)
            if not math.isfinite(value) or value < 0:
                raise InvalidArgument(f"canary analysis: {name} {value!r} must be >= 0")
            values[name] = float(value)
    if message.HasField("min_requests"):
        values["min_requests"] = int(message.min_requests)
    stages = tuple(float(s) for s in message.stages)
    if stages:
        if len(stages) > MAX_STAGES:
            raise InvalidArgument(f"canary analysis: at most {MAX_STAGES} stages")
        if any(not 0 < s <= 100 for s in stages) or list(stages) != sorted(set(stages)):
            raise InvalidArgument(f"canary analysis: stages {list(stages)} must rise in (0, 100]")
        if stages[0] != canary_percent:
            raise InvalidArgument(
                f"canary analysis: the first stage {stages[0]:g} must be the canary percent "
                f"{canary_percent:g}"
            )
        values["stages"] = stages
    for name in ("max_p99_ratio", "max_memory_ratio"):
        if values.get(name, getattr(default, name)) < 1:
            raise InvalidArgument(f"canary analysis: {name} below 1 fails every canary")
    return dataclasses.replace(default, **values)


@dataclasses.dataclass(frozen=True)
class Verdict:
    verdict: str
    reason: str


def judge(analysis: Analysis, canary: Figures, baseline: Figures, elapsed: float) -> Verdict:
    """The canary's verdict over the window (`elapsed` seconds into its stage)."""
    if not analysis.enabled:
        return Verdict(OFF, "canary analysis is off for this rollout")
    requests = canary.counters.requests
    if requests < analysis.min_requests:
        return Verdict(WAITING, f"{requests} of {analysis.min_requests} requests so far")
    if baseline.counters.requests < analysis.min_requests:
        # Nothing to compare with (a model's first canary, or its last stage, with every
        # device on it): the figures are shown, the canary is not judged on them.
        if elapsed < analysis.bake_seconds:
            return Verdict(WAITING, f"no baseline to compare with; {elapsed:.0f} s baked")
        return Verdict(
            HEALTHY,
            f"{requests} requests in {elapsed:.0f} s; no baseline with {analysis.min_requests} "
            "requests to compare with",
        )
    problems = []
    increase = canary.error_rate - baseline.error_rate
    if increase > analysis.max_error_rate_increase:
        problems.append(
            f"error rate {canary.error_rate:.2%} vs {baseline.error_rate:.2%} "
            f"(+{increase:.2%}, limit +{analysis.max_error_rate_increase:.2%})"
        )
    if baseline.p99_ms > 0:
        ratio = canary.p99_ms / baseline.p99_ms
        if ratio > analysis.max_p99_ratio:
            problems.append(
                f"p99 {canary.p99_ms:.1f} ms vs {baseline.p99_ms:.1f} ms ({ratio:.2f}x, limit "
                f"{analysis.max_p99_ratio:g}x)"
            )
    if baseline.mean_rss > 0 and canary.mean_rss > 0:
        ratio = canary.mean_rss / baseline.mean_rss
        if ratio > analysis.max_memory_ratio:
            problems.append(
                f"memory {canary.mean_rss / 2**20:.0f} MiB vs {baseline.mean_rss / 2**20:.0f} "
                f"MiB ({ratio:.2f}x, limit {analysis.max_memory_ratio:g}x)"
            )
    if problems:
        return Verdict(REGRESSED, "; ".join(problems))
    if elapsed < analysis.bake_seconds:
        return Verdict(
            WAITING, f"healthy so far, {elapsed:.0f} of {analysis.bake_seconds:g} s baked"
        )
    return Verdict(HEALTHY, f"healthy over {requests} requests and {elapsed:.0f} s")


def cohort_message(figures: Figures) -> pb.CohortHealth:
    return pb.CohortHealth(
        version=figures.version,
        requests=figures.counters.requests,
        failures=figures.counters.failures,
        error_rate=figures.error_rate,
        p99_ms=figures.p99_ms,
        mean_rss_bytes=figures.mean_rss,
        reports=figures.reports,
    )
