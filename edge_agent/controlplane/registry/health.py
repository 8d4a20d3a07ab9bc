"""Fleet health as stored: sums per model version and group by the minute (a day) and by the hour
(a month), per device by the hour (a day), and each device's last kept report (what the next
one's differences are taken from). Written in batches (controlplane/health.py's flush), added
to what is there, so several replicas' sums add up."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from edge_agent.controlplane.database import Database
from edge_agent.controlplane.health import (
    BUCKETS,
    DEVICE_HOURS_KEPT_S,
    HOURS_KEPT_S,
    MINUTES_KEPT_S,
    Bucket,
    Counters,
    Pending,
    Sample,
    differences,
    p99_ms,
)
from edge_agent.errors import InvalidArgument

_B = [f"b{i}" for i in range(BUCKETS)]
_SUMS = ["requests", "failures", "rejections", "latency_us", "compute_us", *_B]
# One text per table, both dialects (INTEGER maps to BIGINT on PostgreSQL).
_COUNTER_COLUMNS = ", ".join(f"{c} INTEGER NOT NULL" for c in _SUMS)
HEALTH_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS health_minutes (
    model TEXT NOT NULL, version INTEGER NOT NULL, grp TEXT NOT NULL, start INTEGER NOT NULL,
    {_COUNTER_COLUMNS}, rss_sum REAL NOT NULL, reports INTEGER NOT NULL,
    PRIMARY KEY (model, version, grp, start));
CREATE TABLE IF NOT EXISTS health_hours (
    model TEXT NOT NULL, version INTEGER NOT NULL, grp TEXT NOT NULL, start INTEGER NOT NULL,
    {_COUNTER_COLUMNS}, rss_sum REAL NOT NULL, reports INTEGER NOT NULL,
    PRIMARY KEY (model, version, grp, start));
CREATE TABLE IF NOT EXISTS device_hours (
    device_id TEXT NOT NULL, start INTEGER NOT NULL,
    {_COUNTER_COLUMNS}, rss_sum REAL NOT NULL, reports INTEGER NOT NULL,
    disk_free REAL NOT NULL, PRIMARY KEY (device_id, start));
CREATE TABLE IF NOT EXISTS device_health (
    device_id TEXT PRIMARY KEY, boot TEXT NOT NULL, at REAL NOT NULL, uptime REAL NOT NULL,
    rss INTEGER NOT NULL, disk_free INTEGER NOT NULL, load1 REAL NOT NULL,
    providers TEXT NOT NULL, counters TEXT NOT NULL);
"""


@dataclasses.dataclass(frozen=True)
class Figures:
    """A version's health over a window, summed over groups and devices."""

    version: int
    counters: Counters
    rss_sum: float
    reports: int

    @property
    def error_rate(self) -> float:
        return self.counters.failures / self.counters.requests if self.counters.requests else 0.0

    @property
    def p99_ms(self) -> float:
        return p99_ms(self.counters.buckets)

    @property
    def mean_rss(self) -> float:
        return self.rss_sum / self.reports if self.reports else 0.0


@dataclasses.dataclass(frozen=True)
class Point:
    """One bucket of a series: its start (unix seconds) and sums."""

    start: int
    counters: Counters
    rss_sum: float
    reports: int
    disk_free: float = 0.0


def _upsert(table: str, keys: list[str], extra: list[str]) -> str:
    columns = [*keys, *_SUMS, "rss_sum", "reports", *extra]
    added = [*_SUMS, "rss_sum", "reports"]
    sets = ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in added)
    sets += "".join(f", {c} = excluded.{c}" for c in extra)
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
        f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {sets}"
    )


def _row(key: tuple[object, ...], bucket: Bucket, *extra: object) -> tuple[object, ...]:
    return (*key, *bucket.counters.as_list(), bucket.rss_sum, bucket.reports, *extra)


def _sample(row: Any) -> Sample:
    return Sample(
        str(row["boot"]), float(row["at"]), float(row["uptime"]), int(row["rss"]),
        int(row["disk_free"]), float(row["load1"]),
        Sample.counters_from_json(str(row["counters"])),
    )  # fmt: skip


def _counters(row: dict[str, object]) -> Counters:
    return Counters.from_list([int(row[c] or 0) for c in _SUMS])  # type: ignore[call-overload]


class HealthRecords:
    _db: Database  # the registry's database (SqlRegistry)

    def write_health(self, waiting: Mapping[str, tuple[Sample, str]]) -> tuple[int, int]:
        """One replica's newest report per device, written: each difference taken against the
        stored last report (the one base of every replica) and added to the stored sums, all in
        one transaction under the decision lock, so that two replicas hearing one device
        neither double its requests nor lose them. A report whose rate no device serves is not
        summed, but becomes the base (the next one is judged from it). Returns (summed,
        refused)."""
        pending, summed, refused = Pending(), 0, 0
        with self._db.transaction(decision=True):
            bases = self.health_bases(list(waiting))
            newer: list[tuple[str, Sample]] = []
            for device, (sample, group) in waiting.items():
                base = bases.get(device)
                if base is not None and base.boot == sample.boot and sample.at <= base.at:
                    continue  # another replica wrote a newer one
                try:
                    pending.add(device, group, sample, differences(base, sample))
                    summed += 1
                except InvalidArgument:
                    refused += 1
                newer.append((device, sample))
            self._add_sums(pending)
            self._db.executemany(
                "INSERT INTO device_health VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (device_id) DO UPDATE SET boot = excluded.boot, at = excluded.at, "
                "uptime = excluded.uptime, rss = excluded.rss, disk_free = excluded.disk_free, "
                "load1 = excluded.load1, providers = excluded.providers, "
                "counters = excluded.counters",
                [
                    (device, s.boot, s.at, s.uptime, s.rss, s.disk_free, s.load,
                     ",".join(sorted(set(s.providers.values()))), s.to_json())
                    for device, s in newer
                ],
            )  # fmt: skip
        return summed, refused

    def write_pending(self, pending: Pending) -> None:
        """Sums already taken, added as they are (benchmarks/health_storage.py)."""
        with self._db.transaction():
            self._add_sums(pending)

    def _add_sums(self, pending: Pending) -> None:
        for table, buckets in (
            ("health_minutes", pending.minutes),
            ("health_hours", pending.hours),
        ):
            self._db.executemany(
                _upsert(table, ["model", "version", "grp", "start"], []),
                [_row(key, bucket) for key, bucket in buckets.items()],
            )
        self._db.executemany(
            _upsert("device_hours", ["device_id", "start"], ["disk_free"]),
            [_row(key, b, b.disk_free) for key, b in pending.devices.items()],
        )

    def health_bases(self, device_ids: list[str]) -> dict[str, Sample]:
        """Each device's stored last report (what its next one's differences are taken from)."""
        bases: dict[str, Sample] = {}
        for chunk in (device_ids[i : i + 500] for i in range(0, len(device_ids), 500)):
            rows = self._db.execute(
                "SELECT device_id, boot, at, uptime, rss, disk_free, load1, counters "
                f"FROM device_health WHERE device_id IN ({', '.join('?' * len(chunk))})",
                chunk,
            ).all()
            for row in rows:
                bases[str(row["device_id"])] = _sample(row)
        return bases

    def prune_health(self, now: float) -> int:
        """Drop buckets past their retention; returns the rows dropped."""
        dropped = 0
        with self._db.transaction():
            for table, kept in (
                ("health_minutes", MINUTES_KEPT_S),
                ("health_hours", HOURS_KEPT_S),
                ("device_hours", DEVICE_HOURS_KEPT_S),
            ):
                dropped += self._db.execute(
                    f"DELETE FROM {table} WHERE start < ?", (int(now - kept),)
                ).rowcount
        return dropped

    def version_health(self, model: str, version: int, since: float) -> Figures:
        """A version's sums from `since` on (minute buckets), every group."""
        sums = ", ".join(f"SUM({c}) AS {c}" for c in [*_SUMS, "rss_sum", "reports"])
        row = self._db.execute(
            f"SELECT {sums} FROM health_minutes WHERE model = ? AND version = ? AND start >= ?",
            (model, version, int(since // 60 * 60)),
        ).first()
        if row is None or row["reports"] is None:
            return Figures(version, Counters(), 0.0, 0)
        return Figures(version, _counters(row), float(row["rss_sum"]), int(row["reports"]))

    def health_series(self, since: float) -> dict[tuple[str, int, str], list[Point]]:
        """By the hour from `since`, per (model, version, group)."""
        series: dict[tuple[str, int, str], list[Point]] = {}
        for r in self._db.execute(
            "SELECT * FROM health_hours WHERE start >= ? ORDER BY start", (int(since),)
        ).all():
            key = (str(r["model"]), int(r["version"]), str(r["grp"]))
            point = Point(int(r["start"]), _counters(r), float(r["rss_sum"]), int(r["reports"]))
            series.setdefault(key, []).append(point)
        return series

    def device_series(self, device_ids: Iterable[str], since: float) -> dict[str, list[Point]]:
        """By the hour from `since`, for each of these devices (a page of the dashboard)."""
        ids = list(device_ids)
        series: dict[str, list[Point]] = {d: [] for d in ids}
        for chunk in (ids[i : i + 500] for i in range(0, len(ids), 500)):
            rows = self._db.execute(
                f"SELECT * FROM device_hours WHERE start >= ? AND device_id IN "
                f"({', '.join('?' * len(chunk))}) ORDER BY start",
                (int(since), *chunk),
            ).all()
            for r in rows:
                series[str(r["device_id"])].append(
                    Point(int(r["start"]), _counters(r), float(r["rss_sum"]), int(r["reports"]),
                          float(r["disk_free"]))
                )  # fmt: skip
        return series

    def fleet_totals(self) -> dict[tuple[str, int, str], Counters]:
        """Everything kept by the hour (a month), per (model, version, group): the fleet's
        Prometheus counters."""
        sums = ", ".join(f"SUM({c}) AS {c}" for c in _SUMS)
        rows = self._db.execute(
            f"SELECT model, version, grp, {sums} FROM health_hours GROUP BY model, version, grp"
        ).all()
        return {(str(r["model"]), int(r["version"]), str(r["grp"])): _counters(r) for r in rows}
