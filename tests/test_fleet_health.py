"""Fleet health end to end: real agents report how they serve on their long-polls, the control
plane sums the reports exactly (on SQLite and on PostgreSQL), exposes them as Prometheus series,
refuses absurd reports without touching others' figures, and judges canaries on them: a slower
canary is rolled back with its figures, a healthy one promoted through its stages."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from test_sync import Fleet, X, serves

from conftest import Daemon, wait_for
from edge_agent._proto import fleet_pb2 as pb
from edge_agent._proto import fleet_pb2_grpc as pb_grpc
from edge_agent.fleet import auth

BUCKETS = 25  # LATENCY_BUCKETS_MS and one beyond (tests must not import the agent's modules)


def traffic(agent: Daemon, good: int, bad: int) -> None:
    """`good` requests that succeed and `bad` ones the model refuses (a wrong shape)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    with grpcclient.InferenceServerClient(agent.url) as client:
        for i in range(good + bad):
            x = X if i < good else np.ones((2, 63), np.float32)
            tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            try:
                client.infer("mlp", [tensor], client_timeout=10)
            except InferenceServerException:
                assert i >= good


class Load:
    """Requests to each agent back to back, on a thread per agent, until stopped."""

    def __init__(self, agents: list[Daemon]) -> None:
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(a,)) for a in agents]
        for thread in self._threads:
            thread.start()

    def _run(self, agent: Daemon) -> None:
        while not self._stop.is_set():
            traffic(agent, 20, 0)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def scrape(cp: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The control plane's /metrics, parsed by Prometheus's own text parser."""
    from prometheus_client.parser import text_string_to_metric_families

    port = cp.named("controlplane.started")[0]["metrics_port"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def fleet_sample(cp: Daemon, name: str, **labels: str) -> float:
    return scrape(cp).get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(params=["embedded", "scale"])
def fleet(
    request: pytest.FixtureRequest, tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> Iterator[Fleet]:
    metrics = ("--metrics-address", "127.0.0.1:0", "--metrics-per-device")
    if request.param == "scale":
        pg, s3 = request.getfixturevalue("scale_services")
        scale = (pg.new_database(), s3.new_url(), s3.env())
        yield Fleet(tmp_path, start_daemon, *metrics, scale=scale)
    else:
        yield Fleet(tmp_path, start_daemon, *metrics)


def test_health_reports_arrive_and_add_up_exactly(fleet: Fleet) -> None:
    v1 = fleet.mlp(1)
    for device, group in (("cam-1", "lab"), ("cam-2", "lab"), ("cam-3", "field")):
        fleet.add_device(device, group)
    fleet.publish(v1, 1)
    agents = {d: fleet.agent(d) for d in ("cam-1", "cam-2", "cam-3")}
    for device, agent in agents.items():
        wait_for(lambda a=agent: serves(a, v1), f"{device} serving v1")  # type: ignore[misc]
    # What each device serves, counted here: every request of `serves` succeeded too.
    sent = {"cam-1": (30, 4), "cam-2": (12, 0), "cam-3": (7, 2)}
    for device, (good, bad) in sent.items():
        traffic(agents[device], good, bad)
    ours = {d: good + bad + 1 for d, (good, bad) in sent.items()}  # + the check in `serves`
    failed = {d: bad for d, (_, bad) in sent.items()}
    lab = {"model": "mlp", "version": "1", "group": "lab"}
    field = {**lab, "group": "field"}

    def arrived() -> bool:
        return (
            fleet_sample(fleet.cp, "edge_agent_controlplane_fleet_requests_total", **lab)
            >= (ours["cam-1"] + ours["cam-2"])
            and fleet_sample(fleet.cp, "edge_agent_controlplane_fleet_requests_total", **field)
            >= (ours["cam-3"])
        )

    wait_for(arrived, "every device's health summed on the control plane")
    time.sleep(6)  # one more flush: a repeated report must add nothing
    metrics = scrape(fleet.cp)

    def value(name: str, labels: dict[str, str], **extra: str) -> float:
        return metrics[(name, tuple(sorted({**labels, **extra}.items())))]

    requests = "edge_agent_controlplane_fleet_requests_total"
    failures = "edge_agent_controlplane_fleet_request_failures_total"
    assert value(requests, lab) == ours["cam-1"] + ours["cam-2"]
    assert value(failures, lab) == failed["cam-1"] + failed["cam-2"]
    assert value(requests, field) == ours["cam-3"] and value(failures, field) == failed["cam-3"]
    # Asked for (--metrics-per-device): each device's own counters too.
    for device in agents:
        labels = {"device": device, "model": "mlp", "version": "1"}
        assert value("edge_agent_controlplane_device_requests_total", labels) == ours[device]
    # The latency histogram holds every request once.
    histogram = "edge_agent_controlplane_fleet_request_duration_seconds"
    assert value(f"{histogram}_count", lab) == ours["cam-1"] + ours["cam-2"]
    assert value(f"{histogram}_bucket", lab, le="+Inf") == ours["cam-1"] + ours["cam-2"]
    assert value(f"{histogram}_bucket", lab, le="5.0") == ours["cam-1"] + ours["cam-2"]
    # Stored as the control plane keeps it, whichever database.
    rows = fleet.sql(
        "SELECT grp, SUM(requests), SUM(failures) FROM health_minutes WHERE model = 'mlp' "
        "GROUP BY grp ORDER BY grp"
    )
    assert [tuple(x if isinstance(x, str) else int(x) for x in r) for r in rows] == [
        ("field", ours["cam-3"], failed["cam-3"]),
        ("lab", ours["cam-1"] + ours["cam-2"], failed["cam-1"] + failed["cam-2"]),
    ]
    stored = dict(fleet.sql("SELECT device_id, rss FROM device_health"))
    assert set(stored) == set(agents) and all(int(rss) > 10 << 20 for rss in stored.values())


def test_absurd_health_is_refused_and_counted(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    fleet = Fleet(tmp_path, start_daemon, "--metrics-address", "127.0.0.1:0")
    v1 = fleet.mlp(1)
    fleet.add_device("honest")
    liar_token = fleet.add_device("liar")
    fleet.publish(v1, 1)
    honest = fleet.agent("honest")
    wait_for(lambda: serves(honest, v1), "honest serving v1")
    traffic(honest, 10, 0)
    labels = {"model": "mlp", "version": "1", "group": ""}
    requests = "edge_agent_controlplane_fleet_requests_total"
    wait_for(lambda: fleet_sample(fleet.cp, requests, **labels) == 11, "the honest figures")
    stub = pb_grpc.FleetServiceStub(grpc.insecure_channel(fleet.address))
    meta = auth.metadata(auth.read_token(liar_token), "liar")

    def poll(health: pb.DeviceHealth) -> None:
        stub.WatchDesiredState(pb.WatchRequest(wait_ms=0, health=health), metadata=meta, timeout=10)

    def lie(requests: int, buckets: list[int], **device: int) -> pb.DeviceHealth:
        version = pb.VersionHealth(
            model="mlp", version=1, requests=requests, latency_buckets=buckets
        )
        return pb.DeviceHealth(boot="b", uptime_seconds=1, versions=[version], **device)  # type: ignore[arg-type]

    one = [1] + [0] * (BUCKETS - 1)
    lies = [
        lie(5, one),  # buckets that do not add up to the requests
        lie(10**12, [10**12] + [0] * (BUCKETS - 1)),  # a trillion requests in a second
        lie(1, one, rss_bytes=1 << 60),  # an exabyte of memory
        pb.DeviceHealth(boot="b", versions=[pb.VersionHealth(model="mlp", version=1)] * 65),
    ]
    for health in lies:
        poll(health)  # the poll itself is answered
    refused = "edge_agent_controlplane_fleet_health_refused_total"
    wait_for(lambda: fleet_sample(fleet.cp, refused) == len(lies), "the lies counted")
    # Figures on a version the liar was never sent are left out.
    poll(lie(7, [7] + [0] * (BUCKETS - 1)).__class__(
        boot="b", uptime_seconds=2,
        versions=[pb.VersionHealth(model="mlp", version=9, requests=7,
                                   latency_buckets=[7] + [0] * (BUCKETS - 1))],
    ))  # fmt: skip
    poll(lie(3, [3] + [0] * (BUCKETS - 1)))  # and an honest report of the liar's is taken
    wait_for(lambda: fleet_sample(fleet.cp, requests, **labels) == 14, "the true report summed")
    time.sleep(6)
    assert fleet_sample(fleet.cp, requests, **labels) == 14  # 11 honest + 3
    assert not [k for k in scrape(fleet.cp) if ("version", "9") in k[1]]


def three_serving_v1(fleet: Fleet) -> tuple[Path, dict[str, Daemon]]:
    """Three enrolled devices, each with an agent serving v1 of the model."""
    devices = ["edge-a", "edge-b", "edge-c"]
    for d in devices:
        fleet.add_device(d)
    v1 = fleet.mlp(1)
    fleet.publish(v1, 1)
    agents = {d: fleet.agent(d) for d in devices}
    for d in devices:
        wait_for(lambda d=d: serves(agents[d], v1), f"{d} serving v1")  # type: ignore[misc]
    return v1, agents


def test_a_slower_canary_is_rolled_back_with_its_figures(fleet: Fleet) -> None:
    v1, agents = three_serving_v1(fleet)
    devices = list(agents)
    slow = fleet.mlp(2, width=2048, hidden_layers=6)  # the same inputs and outputs, much slower
    load = Load(list(agents.values()))
    try:
        fleet.publish(slow, 2, "--canary", "34", "--min-requests", "50", "--bake-seconds", "600")

        def rolled_back() -> pb.RolloutStatus | None:
            r = next(r for r in fleet.status().rollouts if r.version == 2)
            return r if r.state == "rolled_back" else None

        rollout = wait_for(rolled_back, "the slow canary rolled back", timeout=120)
    finally:
        load.stop()
    assert rollout.reason.startswith("canary regressed: p99")
    verdict = rollout.verdict
    assert verdict.verdict == "regressed" and verdict.canary.version == 2
    assert verdict.baseline.version == 1 and verdict.canary.requests >= 50
    assert verdict.canary.p99_ms > 1.5 * verdict.baseline.p99_ms
    for d in devices:
        wait_for(lambda d=d: serves(agents[d], v1), f"{d} back on v1")  # type: ignore[misc]
    shown = fleet.cli(
        "fleet", "status", "--control-plane", fleet.address, "--token-file", str(fleet.token_file)
    ).stdout  # fmt: skip
    assert "canary regressed: p99" in shown
    lines = shown.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("ROLLOUT  COHORT"))
    canary, baseline = lines[header + 1].split(), lines[header + 2].split()
    assert canary[1:3] == ["canary", "2"] and canary[-1] == "regressed"
    assert baseline[:2] == ["baseline", "1"]


def test_a_healthy_canary_is_promoted_through_its_stages(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    fleet = Fleet(tmp_path, start_daemon)
    _, agents = three_serving_v1(fleet)
    devices = list(agents)
    v2 = fleet.mlp(2)  # the same size: a healthy canary
    load = Load(list(agents.values()))
    try:
        # Generous thresholds: a busy test machine must not fail a good canary on noise.
        fleet.publish(
            v2, 2, "--stages", "34,67,100", "--min-requests", "30", "--bake-seconds", "2",
            "--max-p99-ratio", "20", "--max-memory-ratio", "3",
        )  # fmt: skip

        def promoted() -> pb.RolloutStatus | None:
            r = next(r for r in fleet.status().rollouts if r.version == 2)
            assert r.state == "active", r.reason
            return r if r.canary_percent == 100 and r.verdict.verdict == "promoted" else None

        rollout = wait_for(promoted, "the canary through 34, 67 and 100%", timeout=180)
    finally:
        load.stop()
    assert rollout.verdict.stage == 2 and rollout.device_count == 3
    for d in devices:
        wait_for(lambda d=d: serves(agents[d], v2), f"{d} on v2")  # type: ignore[misc]
