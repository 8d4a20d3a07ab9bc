"""Fleet health's pure parts without a server: the checks on a device's report, the differences
taken from cumulative counters, the sums, the p99 from buckets, canary judgement, retention."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent._proto import fleet_pb2 as pb
from edge_agent.controlplane.canary import (
    HEALTHY,
    REGRESSED,
    WAITING,
    Analysis,
    analysis_of,
    judge,
)
from edge_agent.controlplane.database import open_database
from edge_agent.controlplane.health import (
    BUCKETS,
    HOURS_KEPT_S,
    MINUTES_KEPT_S,
    Counters,
    HealthBook,
    check_health,
    differences,
    p99_ms,
)
from edge_agent.controlplane.registry import MIGRATIONS, SqliteRegistry, SqlRegistry
from edge_agent.controlplane.registry.health import Figures
from edge_agent.errors import InvalidArgument
from edge_agent.scheduling.stats import LATENCY_BUCKETS_MS


def report(
    requests: int = 10,
    failures: int = 1,
    boot: str = "b1",
    override: dict[str, object] | None = None,
) -> pb.DeviceHealth:
    buckets = [0] * BUCKETS
    buckets[3] = requests
    version = {
        "model": "mlp", "version": 1, "provider": "CPUExecutionProvider",
        "requests": requests, "failures": failures, "rejections": 0,
        "latency_us": requests * 2000, "compute_us": requests * 1000, "latency_buckets": buckets,
    }  # fmt: skip
    version.update(override or {})
    return pb.DeviceHealth(
        boot=boot, uptime_seconds=100, rss_bytes=50 << 20, disk_free_bytes=1 << 30, load1=0.5,
        versions=[pb.VersionHealth(**version)],  # type: ignore[arg-type]
    )  # fmt: skip


def test_a_report_is_a_few_hundred_bytes() -> None:
    assert report(10**6, 10**3).ByteSize() < 200


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"latency_buckets": [1]}, "latency buckets"),
        ({"failures": 11}, "rejections <= failures <= requests"),
        ({"requests": 9}, "summing to the requests"),
        ({"requests": 1 << 60, "latency_buckets": [1 << 60] + [0] * (BUCKETS - 1)}, "2^53"),
        ({"model": ""}, "a model name"),
        ({"version": 0}, "a version number"),
    ],
)
def test_a_malformed_report_is_refused(fields: dict[str, object], why: str) -> None:
    with pytest.raises(InvalidArgument, match=why.replace("^", r"\^")):
        check_health(report(override=fields), {"mlp": [1]}, now=0.0)


def test_device_figures_and_counts_are_bounded() -> None:
    bad = report()
    bad.rss_bytes = 1 << 50
    with pytest.raises(InvalidArgument, match="rss_bytes"):
        check_health(bad, {"mlp": [1]}, 0.0)
    many = pb.DeviceHealth(boot="b", versions=[pb.VersionHealth(model="m", version=1)] * 65)
    with pytest.raises(InvalidArgument, match="at most 64"):
        check_health(many, {"m": [1]}, 0.0)
    with pytest.raises(InvalidArgument, match="boot"):
        check_health(report(boot="x" * 65), {"mlp": [1]}, 0.0)
    with pytest.raises(InvalidArgument, match="reported twice"):
        twice = report()
        twice.versions.append(twice.versions[0])
        check_health(twice, {"mlp": [1]}, 0.0)
    # Health of a model the fleet did not send the device, or of a version it does not run,
    # is left out, not an error: a device cannot put figures on another's canary.
    assert check_health(report(), {"other": [1]}, 0.0).counters == {}
    assert check_health(report(), {"mlp": [2]}, 0.0).counters == {}
    with pytest.raises(InvalidArgument, match="a minute a request"):
        check_health(report(override={"latency_us": 10**12}), {"mlp": [1]}, 0.0)


def test_differences_from_cumulative_counters() -> None:
    first = check_health(report(10, 1), {"mlp": [1]}, now=100.0)
    assert differences(None, first)[("mlp", 1)].requests == 10  # a first report: all of it
    later = check_health(report(25, 3), {"mlp": [1]}, now=110.0)
    delta = differences(first, later)[("mlp", 1)]
    assert (delta.requests, delta.failures, delta.buckets[3]) == (15, 2, 15)
    assert differences(later, later) == {}  # a repeated poll adds nothing
    assert differences(later, first) == {}  # nor an older one (a slower replica's)
    # The version reloaded (fresh statistics, same start): it counts from zero.
    reloaded = check_health(report(5, 0), {"mlp": [1]}, now=120.0)
    assert differences(later, reloaded)[("mlp", 1)].requests == 5
    restarted = check_health(report(5, 0, boot="b2"), {"mlp": [1]}, now=120.0)
    assert differences(later, restarted)[("mlp", 1)].requests == 5  # a new start counts anew
    # A new start every poll does not buy a higher rate: no longer than since the last report.
    with pytest.raises(InvalidArgument, match="requests in"):
        lying = report(10**6, 0, boot="b3")
        lying.uptime_seconds = 10**6
        differences(later, check_health(lying, {"mlp": [1]}, now=121.0))
    with pytest.raises(InvalidArgument, match="requests in"):
        absurd = report(10**9, 1)
        differences(first, check_health(absurd, {"mlp": [1]}, now=101.0))


def test_the_book_keeps_the_newest_report_per_device() -> None:
    book = HealthBook()
    book.remember_group("d1", "lab")
    book.take("d1", check_health(report(10, 0), {"mlp": [1]}, now=60.0))
    book.take("d1", check_health(report(30, 1), {"mlp": [1]}, now=70.0))
    waiting = book.drain()
    assert list(waiting) == ["d1"] and waiting["d1"][0].counters[("mlp", 1)].requests == 30
    assert waiting["d1"][1] == "lab" and book.drain() == {}
    book.take("d1", check_health(report(40, 1), {"mlp": [1]}, now=80.0))
    book.restore(waiting)  # a failed write comes back, but not over a newer report
    assert book.drain()["d1"][0].counters[("mlp", 1)].requests == 40


def test_writes_sum_exactly_across_replicas(tmp_path: Path) -> None:
    """Two replicas hear one device in turn (and one of them late): each request once."""
    registry = SqliteRegistry(tmp_path / "registry.sqlite")
    one, two = HealthBook(), HealthBook()
    for book, requests, at in ((one, 10, 60.0), (two, 25, 70.0), (one, 40, 80.0)):
        book.remember_group("d1", "lab")
        book.take("d1", check_health(report(requests, 0), {"mlp": [1]}, now=at))
        registry.write_health(book.drain())
    late = HealthBook()
    late.take("d1", check_health(report(25, 0), {"mlp": [1]}, now=70.0))
    assert registry.write_health(late.drain()) == (0, 0)  # older than what is stored: ignored
    assert registry.version_health("mlp", 1, 0).counters.requests == 40
    registry.close()


def test_p99_is_interpolated_within_its_bucket() -> None:
    buckets = [0] * BUCKETS
    assert p99_ms(buckets) == 0.0
    i = LATENCY_BUCKETS_MS.index(10)
    buckets[i] = 100  # every request between 7.5 and 10 ms
    assert 7.5 < p99_ms(buckets) <= 10
    buckets[-1] = 5  # and a slow tail beyond the last bound
    assert p99_ms(buckets) > LATENCY_BUCKETS_MS[-1]


def figures(requests: int, failures: int, bucket_ms: float, rss: float = 100.0) -> Figures:
    buckets = [0] * BUCKETS
    buckets[LATENCY_BUCKETS_MS.index(bucket_ms)] = requests
    counters = Counters(requests, failures, 0, 0, 0, tuple(buckets))
    return Figures(2, counters, rss * 10, 10)


def test_canary_judgement() -> None:
    a = Analysis(min_requests=100, bake_seconds=60)
    base = figures(1000, 10, 10)
    assert judge(a, figures(50, 0, 10), base, 100).verdict == WAITING  # too quiet
    none = Figures(0, Counters(), 0.0, 0)  # a first canary: nothing to compare with
    assert judge(a, figures(500, 100, 10), none, 61).verdict == HEALTHY
    assert judge(a, figures(500, 5, 10), base, 30).verdict == WAITING  # healthy, baking
    assert judge(a, figures(500, 5, 10), base, 61).verdict == HEALTHY
    slow = judge(a, figures(500, 5, 30), base, 10)
    assert slow.verdict == REGRESSED and "p99" in slow.reason
    failing = judge(a, figures(500, 50, 10), base, 10)
    assert failing.verdict == REGRESSED and "error rate 10.00% vs 1.00%" in failing.reason
    fat = judge(a, figures(500, 5, 10, rss=200), base, 10)
    assert fat.verdict == REGRESSED and "memory" in fat.reason


def test_analysis_defaults_and_bad_fields() -> None:
    analysis = analysis_of(pb.CanaryAnalysis(stages=[5, 25, 100]), 5)
    assert analysis == Analysis(stages=(5.0, 25.0, 100.0))
    with pytest.raises(InvalidArgument, match="must rise"):
        analysis_of(pb.CanaryAnalysis(stages=[25, 5]), 25)
    with pytest.raises(InvalidArgument, match="first stage"):
        analysis_of(pb.CanaryAnalysis(stages=[10, 50]), 5)
    with pytest.raises(InvalidArgument, match="below 1"):
        analysis_of(pb.CanaryAnalysis(max_p99_ratio=0.5), 5)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_retention_keeps_the_store_bounded(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if backend == "sqlite":
        registry: SqlRegistry = SqliteRegistry(tmp_path / "registry.sqlite")
    else:
        pg, _ = request.getfixturevalue("scale_services")
        registry = SqlRegistry(open_database(pg.new_database()))
    book = HealthBook()
    now = 10 * HOURS_KEPT_S
    for age in (0, MINUTES_KEPT_S + 60, HOURS_KEPT_S + 3600):
        sample = check_health(report(5, 0, boot=f"d{age}"), {"mlp": [1]}, now=now - age)
        book.take(f"d{age}", sample)
    assert registry.write_health(book.drain()) == (3, 0)
    assert registry.version_health("mlp", 1, 0).counters.requests == 15
    dropped = registry.prune_health(now)
    assert dropped == 2 + 1 + 2  # minutes of two reports, an hour, two device-hours
    assert registry.prune_health(now) == 0
    assert registry.version_health("mlp", 1, 0).counters.requests == 5
    assert registry.fleet_totals()[("mlp", 1, "")].requests == 10  # the hours of a month
    base = registry.health_bases(["d0", "nobody"])
    assert list(base) == ["d0"] and base["d0"].counters[("mlp", 1)].requests == 5
    registry.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_registry_of_the_schema_before_health_is_brought_up_to_date(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A control plane upgraded over a database made before fleet health: schema 2 -> 3, its
    rollouts kept (a canary started before has no analysis, and is not judged)."""
    if backend == "sqlite":
        url = f"sqlite:{tmp_path / 'registry.sqlite'}"
    else:
        pg, _ = request.getfixturevalue("scale_services")
        url = pg.new_database()
    db = open_database(url)
    with db.transaction(decision=True):
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        for version, step in enumerate(MIGRATIONS[:2], 1):
            step(db)
            db.execute("INSERT INTO schema_version VALUES (?)", (version,))
    db.execute(
        "INSERT INTO rollouts (model, version, scope, grp, canary_percent, state, created) "
        "VALUES ('mlp', 1, 'canary', '', 10, 'active', 0)"
    )
    db.close()
    registry = SqlRegistry(open_database(url))
    assert registry.schema_version == 3
    (rollout,) = registry.rollouts()
    assert rollout.scope == "canary" and rollout.analysis == {} and rollout.verdict == {}
    assert registry.version_health("mlp", 1, 0).counters.requests == 0
    registry.close()
