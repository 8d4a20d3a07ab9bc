"""Fleet health: how devices serve, from the DeviceHealth each long-poll carries (the agent's
sync/health.py), checked like every device input, turned into exact differences, summed in
memory and written in batches (registry/health.py).

A device's counters are cumulative since its agent started (`boot`); what counts is the
difference from the last report kept of that start, so a lost poll folds into the next and a
repeated one adds nothing. A report is refused, counted and logged (its poll goes on) when it is
malformed, too large, names a model the device was not sent, goes backwards without a new boot,
or claims more requests than a device can serve in the time since the last one: a lying device
spoils only its own figures.

Buckets: every FLUSH_S the sums go to the database, per (model, version, group) and minute (kept a
day) and hour (kept a month), and per device and hour (kept a day, for its sparklines).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from edge_agent._proto import fleet_pb2 as pb
from edge_agent.errors import InvalidArgument
from edge_agent.fleet.release import MAX_VERSION
from edge_agent.scheduling.stats import LATENCY_BUCKETS_MS

BUCKETS = len(LATENCY_BUCKETS_MS) + 1
MAX_VERSIONS = 64  # per report (the agent sends at most its sync/health.MAX_VERSIONS)
MAX_NAME_CHARS = 128
MAX_BOOT_CHARS = 64
MAX_PROVIDER_CHARS = 40
MAX_COUNT = 1 << 53  # any counter: beyond, a float would not hold it exactly
MAX_REQUESTS_PER_S = 10_000  # more than a Python agent answers on any edge device
MAX_US_PER_REQUEST = 60_000_000  # summed latency or compute time: a minute a request at most
MAX_RSS_BYTES = 1 << 42
MAX_DISK_BYTES = 1 << 56
MAX_LOAD = 100_000.0
MAX_UPTIME_S = 20 * 365 * 86400.0
FLUSH_S = 5.0
MINUTE_S, HOUR_S = 60, 3600
MINUTES_KEPT_S = 86400  # fleet figures by the minute: a day
HOURS_KEPT_S = 30 * 86400  # by the hour: a month
DEVICE_HOURS_KEPT_S = 86400  # per device by the hour: a day
MAX_BASES = 200_000  # devices whose last report a replica remembers


@dataclasses.dataclass(frozen=True)
class Counters:
    requests: int = 0
    failures: int = 0
    rejections: int = 0
    latency_us: int = 0
    compute_us: int = 0
    buckets: tuple[int, ...] = (0,) * BUCKETS

    def minus(self, other: Counters) -> Counters:
        return Counters.from_list(
            [a - b for a, b in zip(self.as_list(), other.as_list(), strict=True)]
        )

    def plus(self, other: Counters) -> Counters:
        return Counters.from_list(
            [a + b for a, b in zip(self.as_list(), other.as_list(), strict=True)]
        )

    def scalars(self) -> tuple[int, int, int, int, int]:
        return (self.requests, self.failures, self.rejections, self.latency_us, self.compute_us)

    def negative(self) -> bool:
        return min(self.scalars()) < 0 or min(self.buckets) < 0

    def as_list(self) -> list[int]:
        return [*self.scalars(), *self.buckets]

    @classmethod
    def from_list(cls, values: Sequence[int]) -> Counters:
        requests, failures, rejections, latency_us, compute_us = values[:5]
        return cls(requests, failures, rejections, latency_us, compute_us, tuple(values[5:]))


@dataclasses.dataclass(frozen=True)
class Sample:
    """One device's report as kept: its counters per (model, version) and its device figures."""

    boot: str
    at: float
    uptime: float
    rss: int
    disk_free: int
    load: float
    counters: Mapping[tuple[str, int], Counters]
    providers: Mapping[tuple[str, int], str] = dataclasses.field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({f"{m}\n{v}": c.as_list() for (m, v), c in self.counters.items()})

    @staticmethod
    def counters_from_json(text: str) -> dict[tuple[str, int], Counters]:
        out = {}
        for key, values in json.loads(text or "{}").items():
            model, version = key.split("\n")
            out[(model, int(version))] = Counters.from_list(values)
        return out


def check_health(
    message: pb.DeviceHealth, allowed: Mapping[str, Iterable[int]], now: float
) -> Sample:
    """The report as a Sample; InvalidArgument naming its first fault. `allowed`: per model of
    the device's desired state, the versions it may report on (the one it was sent, those it
    says it serves or has installed): health of other models and versions is left out, so a
    device cannot put figures on versions it does not run."""
    wanted = {model: set(versions) for model, versions in allowed.items()}
    if not 0 < len(message.boot) <= MAX_BOOT_CHARS or not message.boot.isprintable():
        raise InvalidArgument("health: boot must be 1-64 printable characters")
    if len(message.versions) > MAX_VERSIONS:
        raise InvalidArgument(f"health: {len(message.versions)} versions, at most {MAX_VERSIONS}")
    _bounded("uptime_seconds", message.uptime_seconds, MAX_UPTIME_S)
    _bounded("rss_bytes", message.rss_bytes, MAX_RSS_BYTES)
    _bounded("disk_free_bytes", message.disk_free_bytes, MAX_DISK_BYTES)
    _bounded("load1", message.load1, MAX_LOAD)
    counters: dict[tuple[str, int], Counters] = {}
    providers: dict[tuple[str, int], str] = {}
    for v in message.versions:
        if not v.model or len(v.model) > MAX_NAME_CHARS or not 1 <= v.version <= MAX_VERSION:
            raise InvalidArgument("health: a version needs a model name and a version number")
        if v.version not in wanted.get(v.model, ()):
            continue  # a model of its own, or a version it was not sent
        key = (v.model, int(v.version))
        if key in counters:
            raise InvalidArgument(f"health: {v.model} v{v.version} reported twice")
        if len(v.latency_buckets) != BUCKETS:
            raise InvalidArgument(
                f"health: {len(v.latency_buckets)} latency buckets, not {BUCKETS}"
            )
        values = Counters(
            v.requests, v.failures, v.rejections, v.latency_us, v.compute_us,
            tuple(v.latency_buckets),
        )  # fmt: skip
        if max(values.as_list()) > MAX_COUNT:
            raise InvalidArgument(f"health: {v.model} v{v.version}: a counter is beyond 2^53")
        if max(v.latency_us, v.compute_us) > v.requests * MAX_US_PER_REQUEST:
            raise InvalidArgument(f"health: {v.model} v{v.version}: over a minute a request")
        if not v.rejections <= v.failures <= v.requests or sum(v.latency_buckets) != v.requests:
            raise InvalidArgument(
                f"health: {v.model} v{v.version}: rejections <= failures <= requests, and the "
                "latency buckets summing to the requests"
            )
        counters[key] = values
        providers[key] = v.provider[:MAX_PROVIDER_CHARS]
    return Sample(
        message.boot,
        now,
        message.uptime_seconds,
        int(message.rss_bytes),
        int(message.disk_free_bytes),
        message.load1,
        counters,
        providers,
    )


def _bounded(name: str, value: float, limit: float) -> None:
    if not (math.isfinite(value) and 0 <= value <= limit):
        raise InvalidArgument(f"health: {name} {value!r} is out of range")


def differences(base: Sample | None, sample: Sample) -> dict[tuple[str, int], Counters]:
    """What the device served since `base` (its last kept report), per version. A version whose
    counters went back (the agent loaded it again, with fresh statistics) counts from zero, as
    a Prometheus counter reset does; a sample no newer than the base (a slower replica's) adds
    nothing. InvalidArgument for a rate no device serves: over the time since the last report,
    or, after a new start, since the agent started (and no longer than since that report)."""
    same_start = base is not None and base.boot == sample.boot
    if base is None:
        elapsed = sample.uptime
    elif same_start:
        elapsed = sample.at - base.at
        if elapsed <= 0:
            return {}
    else:
        elapsed = min(sample.uptime, sample.at - base.at)
    out: dict[tuple[str, int], Counters] = {}
    for key, counters in sample.counters.items():
        before = base.counters.get(key) if same_start and base is not None else None
        delta = counters.minus(before) if before is not None else counters
        if delta.negative():
            delta = counters  # reloaded: its statistics started again
        if delta.requests > MAX_REQUESTS_PER_S * max(elapsed, 1.0):
            raise InvalidArgument(
                f"health: {key[0]} v{key[1]}: {delta.requests} requests in {elapsed:.0f} s"
            )
        if delta.requests or delta.failures:
            out[key] = delta
    return out


@dataclasses.dataclass
class Bucket:
    """Sums over one bucket of time: counters, and resident memory over the reports."""

    counters: Counters = dataclasses.field(default_factory=Counters)
    rss_sum: float = 0.0
    reports: int = 0
    disk_free: float = 0.0  # per device buckets: the latest

    def add(self, delta: Counters, rss: int, disk_free: int = 0) -> None:
        self.counters = self.counters.plus(delta)
        self.rss_sum += rss
        self.reports += 1
        self.disk_free = disk_free


@dataclasses.dataclass
class Pending:
    """Sums of what devices served, by bucket: what one flush adds to the stored ones."""

    # (model, version, group, minute start) / (..., hour start) -> bucket
    minutes: dict[tuple[str, int, str, int], Bucket] = dataclasses.field(default_factory=dict)
    hours: dict[tuple[str, int, str, int], Bucket] = dataclasses.field(default_factory=dict)
    devices: dict[tuple[str, int], Bucket] = dataclasses.field(default_factory=dict)  # hour

    def add(self, device: str, group: str, sample: Sample, deltas: Deltas) -> None:
        minute = int(sample.at // MINUTE_S * MINUTE_S)
        hour = int(sample.at // HOUR_S * HOUR_S)
        for (model, version), delta in deltas.items():
            for table, start in ((self.minutes, minute), (self.hours, hour)):
                table.setdefault((model, version, group, start), Bucket()).add(delta, sample.rss)
        if deltas:
            total = Counters()
            for delta in deltas.values():
                total = total.plus(delta)
            self.devices.setdefault((device, hour), Bucket()).add(
                total, sample.rss, sample.disk_free
            )


Deltas = Mapping[tuple[str, int], Counters]


class HealthBook:
    """One replica's reports not written yet: the newest per device, with its group. The
    differences are taken when they are written, against the stored last report (one base
    for every replica, in the write's transaction). Used on the event loop only."""

    def __init__(self) -> None:
        self._waiting: dict[str, tuple[Sample, str]] = {}
        self._groups: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._latest: collections.OrderedDict[str, Sample] = collections.OrderedDict()
        self.refused = 0  # reports refused (a metric)
        self.accepted = 0

    def group(self, device: str) -> str | None:
        return self._groups.get(device)

    def remember_group(self, device: str, group: str) -> None:
        self._groups[device] = group
        _bound(self._groups)

    def take(self, device: str, sample: Sample) -> None:
        self._waiting[device] = (sample, self._groups.get(device, ""))
        self._latest[device] = sample
        self._latest.move_to_end(device)
        _bound(self._latest)

    def drain(self) -> dict[str, tuple[Sample, str]]:
        waiting, self._waiting = self._waiting, {}
        return waiting

    def restore(self, waiting: Mapping[str, tuple[Sample, str]]) -> None:
        """A write failed: its reports wait for the next (a newer one of a device wins)."""
        for device, (sample, group) in waiting.items():
            if device not in self._waiting or self._waiting[device][0].at < sample.at:
                self._waiting[device] = (sample, group)

    def samples(self) -> list[tuple[str, Sample]]:
        """Each device's newest report heard here (for per-device metrics)."""
        return list(self._latest.items())


def _bound(table: collections.OrderedDict[str, Any]) -> None:
    while len(table) > MAX_BASES:
        table.popitem(last=False)


def p99_ms(buckets: Sequence[int]) -> float:
    """The 99th percentile in milliseconds, interpolated within its bucket as Prometheus's
    histogram_quantile does (the last bucket's upper bound taken as twice the last bound);
    0 with no requests."""
    total = sum(buckets)
    if not total:
        return 0.0
    bounds = (0.0, *LATENCY_BUCKETS_MS, 2.0 * LATENCY_BUCKETS_MS[-1])
    rank, seen = 0.99 * total, 0
    for i, count in enumerate(buckets):
        if count and seen + count >= rank:
            return bounds[i] + (bounds[i + 1] - bounds[i]) * (rank - seen) / count
        seen += count
    return bounds[-1]
