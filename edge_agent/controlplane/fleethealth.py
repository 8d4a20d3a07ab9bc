"""The control plane's side of fleet health, on the event loop: each long-poll's DeviceHealth
taken in (controlplane/health.py checks it and takes its differences), the sums written every
FLUSH_S, retention applied every PRUNE_S, every canary judged every JUDGE_S
(controlplane/canary.py) and rolled back or promoted, and the figures /metrics shows."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Iterable, Iterator, Mapping
from typing import Any

from edge_agent._proto import fleet_pb2 as pb
from edge_agent.controlplane.canary import (
    HEALTHY,
    JUDGE_S,
    OFF,
    PROMOTED,
    REGRESSED,
    Analysis,
    judge,
)
from edge_agent.controlplane.health import FLUSH_S, Counters, HealthBook, check_health
from edge_agent.controlplane.registry import Rollout
from edge_agent.controlplane.registry.health import Figures
from edge_agent.controlplane.shared import FleetCore
from edge_agent.errors import InvalidArgument
from edge_agent.observability.logging import get_logger
from edge_agent.scheduling.stats import LATENCY_BUCKETS_MS

log = get_logger(__name__)

PRUNE_S = 600.0
REFUSED_LOG_INTERVAL_S = 60.0  # per device: one log line for refused health, then counts only


def figures_json(figures: Figures) -> dict[str, Any]:
    return {
        "version": figures.version,
        "requests": figures.counters.requests,
        "failures": figures.counters.failures,
        "error_rate": round(figures.error_rate, 6),
        "p99_ms": round(figures.p99_ms, 3),
        "mean_rss_bytes": round(figures.mean_rss),
        "reports": figures.reports,
    }


def verdict_message(verdict: Mapping[str, Any]) -> pb.CanaryVerdict:
    def cohort(data: Mapping[str, Any]) -> pb.CohortHealth:
        return pb.CohortHealth(**{k: v for k, v in data.items() if k in _COHORT_FIELDS})

    return pb.CanaryVerdict(
        verdict=str(verdict.get("verdict", "")),
        reason=str(verdict.get("reason", "")),
        canary=cohort(verdict.get("canary", {})),
        baseline=cohort(verdict.get("baseline", {})),
        judged_at=float(verdict.get("judged_at", 0.0)),
        stage=int(verdict.get("stage", 0)),
    )


_COHORT_FIELDS = {f.name for f in pb.CohortHealth.DESCRIPTOR.fields}


class FleetHealth:
    def __init__(self, core: FleetCore) -> None:
        self._core = core
        self.book = HealthBook()
        self._refused_logged: dict[str, float] = {}
        # For /metrics: everything kept by the hour per (model, version, group), and the
        # canaries' verdicts; refreshed after each flush and judgement.
        self.totals: dict[tuple[str, int, str], Counters] = {}
        self.verdicts: dict[tuple[str, int], str] = {}
        self.rolled_back = 0
        self.promoted = 0

    async def take(
        self, device: str, message: pb.DeviceHealth, allowed: Mapping[str, Iterable[int]]
    ) -> None:
        """One poll's health (`allowed`: the versions per model it may report on); a refused
        one is counted and logged, and the poll goes on."""
        if self.book.group(device) is None:
            group = await self._core.db(self._core.registry.device_group, device)
            self.book.remember_group(device, group or "")
        try:
            self.book.take(device, check_health(message, allowed, time.time()))
        except InvalidArgument as exc:
            self._refused(device, str(exc))

    def _refused(self, device: str, reason: str, count: int = 1) -> None:
        self.book.refused += count
        now = time.monotonic()
        if now - self._refused_logged.get(device, -REFUSED_LOG_INTERVAL_S) >= (
            REFUSED_LOG_INTERVAL_S
        ):
            self._refused_logged[device] = now
            log.warning("device.health_refused", device=device, reason=reason)

    async def flush(self) -> None:
        waiting = self.book.drain()
        if waiting:
            try:
                summed, refused = await self._core.db(self._core.registry.write_health, waiting)
            except Exception:
                self.book.restore(waiting)  # written next time: the bases did not move
                raise
            self.book.accepted += summed
            if refused:
                self._refused("(several)", f"{refused} reports claim more than a device serves",
                              refused)  # fmt: skip
        self.totals = await self._core.db(self._core.registry.fleet_totals)

    async def judge(self) -> None:
        now = time.time()
        acted = await self._core.db(
            self._core.registry.judge_canaries, now, lambda r, b: self._decide(r, b, now)
        )
        for rollout, action in acted:
            figures = dict(rollout.verdict)
            if action == "roll_back":
                self.rolled_back += 1
                log.warning(
                    "rollout.canary_regressed", rollout=rollout.id, model=rollout.model,
                    version=rollout.version, reason=figures.get("reason"),
                    canary=figures.get("canary"), baseline=figures.get("baseline"),
                )  # fmt: skip
            else:
                self.promoted += 1
                log.info(
                    "rollout.canary_promoted", rollout=rollout.id, model=rollout.model,
                    version=rollout.version, percent=rollout.canary_percent,
                    canary=figures.get("canary"), baseline=figures.get("baseline"),
                )  # fmt: skip
            self._core.notify(rollout.devices)

    def _decide(
        self, rollout: Rollout, baseline_version: int, now: float
    ) -> tuple[str, dict[str, Any]]:
        """On the registry thread, inside judge_canaries: what to do with one canary."""
        if rollout.verdict.get("verdict") in (PROMOTED, OFF):
            return "skip", {}  # done: every stage passed, or not judged at all
        registry = self._core.registry
        analysis = Analysis.from_json(dict(rollout.analysis))
        since = rollout.stage_started
        canary = registry.version_health(rollout.model, rollout.version, since)
        baseline = (
            registry.version_health(rollout.model, baseline_version, since)
            if baseline_version
            else Figures(0, Counters(), 0.0, 0)
        )
        verdict = judge(analysis, canary, baseline, now - since)
        stored: dict[str, Any] = {
            "verdict": verdict.verdict,
            "reason": verdict.reason,
            "judged_at": now,
            "stage": rollout.stage,
            "canary": figures_json(canary),
            "baseline": figures_json(baseline),
        }
        self.verdicts[(rollout.model, rollout.version)] = verdict.verdict
        if verdict.verdict == REGRESSED:
            return "roll_back", stored
        if verdict.verdict == HEALTHY and analysis.stages:
            if rollout.stage + 1 < len(analysis.stages):
                percent = analysis.stages[rollout.stage + 1]
                stored["reason"] = f"{verdict.reason}; promoted to {percent:g}%"
                return "promote", stored
            stored["verdict"] = PROMOTED
            stored["reason"] = f"{verdict.reason}; every stage passed"
        return "keep", stored

    async def run_forever(self) -> None:
        """Flush every FLUSH_S, judge every JUDGE_S, prune every PRUNE_S; each on its own: a
        failed one is logged, the others go on, the next round tries again."""
        last_judged = last_pruned = 0.0
        while True:
            await asyncio.sleep(FLUSH_S)
            now = time.monotonic()
            await self._step("flush", self.flush())
            if now - last_judged >= JUDGE_S:
                last_judged = now
                await self._step("judge", self.judge())
            if now - last_pruned >= PRUNE_S:
                last_pruned = now
                await self._step("prune", self._prune())

    async def _prune(self) -> None:
        dropped = await self._core.db(self._core.registry.prune_health, time.time())
        if dropped:
            log.info("registry.health_pruned", rows=dropped)

    @staticmethod
    async def _step(name: str, step: Awaitable[None]) -> None:
        try:
            await step
        except Exception:
            log.exception("fleet_health.failed", step=name)


class FleetHealthCollector:
    """The fleet's health as Prometheus series, per model version and device group (never per
    device: a fleet has thousands), from what the control plane keeps by the hour; read at
    scrape from FleetHealth's figures (refreshed every FLUSH_S), no database call."""

    def __init__(self, health: FleetHealth, prefix: str, per_device: bool = False) -> None:
        self._health = health
        self._prefix = prefix
        self._per_device = per_device

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        health, p = self._health, self._prefix
        labels = ["model", "version", "group"]
        requests = CounterMetricFamily(
            f"{p}_fleet_requests", "Requests devices answered (the last 30 days)", labels=labels
        )
        failures = CounterMetricFamily(
            f"{p}_fleet_request_failures", "Of those, failed", labels=labels
        )
        rejections = CounterMetricFamily(
            f"{p}_fleet_request_rejections", "Of the failures, refused unexecuted", labels=labels
        )
        latency = HistogramMetricFamily(
            f"{p}_fleet_request_duration_seconds", "Request latency on the devices", labels=labels
        )
        for (model, version, group), c in sorted(health.totals.items()):
            values = [model, str(version), group]
            requests.add_metric(values, c.requests)
            failures.add_metric(values, c.failures)
            rejections.add_metric(values, c.rejections)
            cumulative, buckets = 0, []
            for bound, count in zip(LATENCY_BUCKETS_MS, c.buckets, strict=False):
                cumulative += count
                buckets.append((repr(bound / 1000), cumulative))
            buckets.append(("+Inf", c.requests))
            latency.add_metric(values, buckets, c.latency_us / 1e6)
        verdicts = GaugeMetricFamily(
            f"{p}_fleet_canary_verdict",
            "1 for each canary's latest verdict (waiting, healthy, promoted, regressed, off)",
            labels=["model", "version", "verdict"],
        )
        for (model, version), verdict in sorted(health.verdicts.items()):
            verdicts.add_metric([model, str(version), verdict], 1)
        book = health.book
        counts = (
            ("fleet_health_reports", "Health reports taken in", book.accepted),
            ("fleet_health_refused", "Health reports refused (malformed, absurd)", book.refused),
            ("fleet_canary_rollbacks", "Canaries rolled back on a regression", health.rolled_back),
            ("fleet_canary_promotions", "Canaries promoted to their next stage", health.promoted),
        )
        yield from (requests, failures, rejections, latency, verdicts)
        if self._per_device:
            yield from self._devices()
        for name, text, value in counts:
            family = CounterMetricFamily(f"{p}_{name}", text)
            family.add_metric([], value)
            yield family

    def _devices(self) -> Iterator[Any]:
        """Each device's counters as its agent reports them (cumulative since the agent
        started: a restart is a counter reset), for the devices this replica has heard from."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        p, labels = self._prefix, ["device", "model", "version"]
        requests = CounterMetricFamily(
            f"{p}_device_requests", "Requests a device answered, per version", labels=labels
        )
        failures = CounterMetricFamily(
            f"{p}_device_request_failures", "Of those, failed", labels=labels
        )
        memory = GaugeMetricFamily(
            f"{p}_device_resident_memory_bytes", "A device's agent RSS", labels=["device"]
        )
        for device, sample in self._health.book.samples():
            memory.add_metric([device], sample.rss)
            for (model, version), c in sorted(sample.counters.items()):
                requests.add_metric([device, model, str(version)], c.requests)
                failures.add_metric([device, model, str(version)], c.failures)
        yield from (requests, failures, memory)
