"""The fleet and the agent under attack, against real processes on loopback: idle
connections, report floods, many long-polls, unsigned or oversized releases, reads of releases
not sent to a device, and the control plane's input checks."""

from __future__ import annotations

import json
import os
import resource
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from test_sync import Fleet, serves, status_code

import modelgen
from conftest import ROOT, ControlPlaneProcess, Daemon, held_daemon, metric, wait_for
from edge_agent._proto import fleet_pb2 as pb
from edge_agent._proto import fleet_pb2_grpc as pb_grpc
from edge_agent.fleet import auth, signing
from edge_agent.fleet.release import build_release

FD_LIMIT = 1024
ATTACKERS = 1100


def limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


class Flood:
    """tests/idle_flood.py: idle HTTP/2 connections from another loopback address."""

    def __init__(self, port: int, count: int = ATTACKERS, source: str = "127.0.0.2") -> None:
        self.lines: list[dict[str, int]] = []
        # Its own process, with descriptors enough for every connection.
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "idle_flood.py"), "127.0.0.1", str(port),
             str(count), source],
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: resource.setrlimit(
                resource.RLIMIT_NOFILE, (count + 100, max(count + 100, FD_LIMIT))
            ),
        )  # fmt: skip
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(json.loads(line))

    @property
    def open(self) -> int:
        return self.lines[-1]["open"] if self.lines else -1

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def flood() -> Iterator[Callable[[int], Flood]]:
    started: list[Flood] = []

    def start(port: int) -> Flood:
        f = Flood(port)
        started.append(f)
        wait_for(lambda: f.lines and f.lines[-1]["opened"] > 0, "the flood's connections")
        return f

    yield start
    for f in started:
        f.stop()


def device_poll(address: str, token: Path, device: str, timeout: float = 5) -> float:
    """One WatchDesiredState that answers at once, on a new connection; returns its seconds."""
    meta = auth.metadata(auth.read_token(token), device)
    started = time.monotonic()
    with grpc.insecure_channel(address) as channel:
        pb_grpc.FleetServiceStub(channel).WatchDesiredState(
            pb.WatchRequest(wait_ms=0), metadata=meta, timeout=timeout, wait_for_ready=True
        )
    return time.monotonic() - started


def test_idle_connections_do_not_lock_devices_out(
    tmp_path: Path, start_daemon: Callable[..., Daemon], flood: Callable[[int], Flood]
) -> None:
    cp = start_daemon(
        "--data-dir", str(tmp_path / "cp"), kind=ControlPlaneProcess, preexec=limit_fds
    ).wait_started()
    assert cp.named("controlplane.started")[0]["max_connections"] < FD_LIMIT  # fits the limit
    token = tmp_path / "d1.token"
    subprocess.run(
        [sys.executable, "-m", "edge_agent", "fleet", "add-device", "--data-dir",
         str(tmp_path / "cp"), "--device-id", "d1", "--device-token-file", str(token)],
        check=True, cwd=ROOT, capture_output=True,
    )  # fmt: skip
    attack = flood(cp.port or 0)
    wait_for(lambda: attack.lines[-1]["opened"] >= ATTACKERS - 10, "the flood's connections")
    # A device on a fresh connection polls within 5 s (the bound of the call), during the flood.
    assert device_poll(cp.url, token, "d1") < 5
    # The peer's connections beyond its cap were shut; those left made no call and go after
    # the control plane's first-request deadline (30 s).
    wait_for(lambda: cp.named("connections.closed"), "the guard's first shutdown")
    assert cp.named("connections.closed")[0].get("peer_cap", 0) > 0
    wait_for(lambda: attack.open == 0, "the idle connections closed", timeout=90)
    assert any("no_request" in e for e in cp.named("connections.closed"))
    assert device_poll(cp.url, token, "d1") < 5
    assert cp.proc.poll() is None
    assert not any("File descriptor limit" in line for line in cp.stderr)


def test_idle_connections_do_not_lock_clients_out_of_the_agent(
    start_daemon: Callable[..., Daemon], flood: Callable[[int], Flood]
) -> None:
    import tritonclient.grpc as grpcclient

    agent = start_daemon(
        "--model-repository", str(ROOT / "models"), "--execution-providers", "cpu",
        preexec=limit_fds,
    ).wait_started()  # fmt: skip
    attack = flood(agent.port or 0)
    wait_for(lambda: attack.lines[-1]["opened"] >= ATTACKERS - 10, "the flood's connections")
    x = np.load(ROOT / "models" / "digits" / "sample.npy").astype(np.float32).reshape(1, 64)
    tensor = grpcclient.InferInput("input", [1, 64], "FP32")
    tensor.set_data_from_numpy(x)

    def classify() -> Any:
        # A client whose connection is refused while the flood holds every slot tries again,
        # as clients do; the guard frees the slots within its scan interval.
        try:
            with grpcclient.InferenceServerClient(agent.url) as client:
                return client.infer("digits", [tensor], client_timeout=5).as_numpy("label")
        except Exception:
            return None

    started = time.monotonic()
    label = wait_for(classify, "an answer during the flood", timeout=5)
    assert label[0] == 7 and time.monotonic() - started < 5
    wait_for(lambda: attack.open == 0, "the idle connections closed", timeout=30)
    text = metric_text(agent)
    assert 'edge_agent_connections_closed_total{reason="peer_cap"}' in text
    assert 'edge_agent_connections_closed_total{reason="no_request"}' in text


def metric_text(agent: Daemon) -> str:
    import urllib.request

    return urllib.request.urlopen(agent.metrics_url, timeout=10).read().decode()  # type: ignore[no-any-return]


@pytest.fixture
def fleet(tmp_path: Path, start_daemon: Callable[..., Daemon]) -> Fleet:
    return Fleet(tmp_path, start_daemon, "--metrics-address", "127.0.0.1:0")


def test_a_report_flood_leaves_other_devices_fast_and_the_registry_small(fleet: Fleet) -> None:
    attacker, victim = fleet.add_device("attacker"), fleet.add_device("victim")
    fleet.publish(fleet.mlp(1), 1)

    def reports(count: int) -> pb.WatchRequest:
        junk = [
            pb.ModelReport(model=f"m{i:05d}" + "x" * 20, state="failed", error="e" * 20)
            for i in range(count)
        ]
        return pb.WatchRequest(wait_ms=0, reports=junk)

    # The flood (26,000 reports, ~1.6 MB a call): refused unread, by its size. And one
    # within the size limit (2,000 reports): read, nothing of it stored, then rate-limited.
    huge, within = reports(26_000), reports(2_000)
    stop = threading.Event()
    outcomes: dict[str, int] = {}

    def attack(request: pb.WatchRequest) -> None:
        meta = auth.metadata(auth.read_token(attacker), "attacker")
        with grpc.insecure_channel(fleet.address) as channel:
            stub = pb_grpc.FleetServiceStub(channel)
            while not stop.is_set():
                try:
                    stub.WatchDesiredState(request, metadata=meta, timeout=10)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                outcomes[code] = outcomes.get(code, 0) + 1

    threads = [threading.Thread(target=attack, args=(r,)) for r in (huge, huge, within, within)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        latencies = []
        meta = auth.metadata(auth.read_token(victim), "victim")
        with grpc.insecure_channel(fleet.address) as channel:
            stub = pb_grpc.FleetServiceStub(channel)
            for _ in range(20):
                started = time.monotonic()
                stub.WatchDesiredState(pb.WatchRequest(wait_ms=0), metadata=meta, timeout=10)
                latencies.append(time.monotonic() - started)
                time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join()
    # Before: 0.5-0.9 s per poll while the flood ran. (A bound on a median, on a shared box.)
    assert statistics.median(latencies) < 0.1, latencies
    assert outcomes.get("INVALID_ARGUMENT", 0) > 0, outcomes  # the huge ones, unread
    assert outcomes.get("OK", 0) > 0 and outcomes.get("RESOURCE_EXHAUSTED", 0) > 0, outcomes
    # Nothing of the junk was stored: the registry stays small and FleetStatus answers.
    # (Its write-ahead log is bounded apart: SQLite checkpoints it at 1,000 pages, 4 MiB.)
    with sqlite3.connect(f"file:{fleet.data / 'registry.sqlite'}?mode=ro", uri=True) as db:
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        page = db.execute("PRAGMA page_size").fetchone()[0]
        stored = db.execute("SELECT count(*) FROM history WHERE device_id = 'attacker'")
        assert stored.fetchone()[0] == 0
    assert pages * page < 1 << 20, pages * page  # before: +16 MB per flooding call
    status = fleet.status()
    (device,) = [d for d in status.devices if d.device_id == "attacker"]
    assert not device.models
    metrics = urllib_text(fleet.cp)
    (ignored,) = [
        line.split()[-1]
        for line in metrics.splitlines()
        if line.startswith("edge_agent_controlplane_reports_ignored_total")
    ]
    assert float(ignored) >= 2_000 * outcomes["OK"]
    assert 'edge_agent_controlplane_rate_limited_total{role="device"}' in metrics
    logged = fleet.cp.named("device.reports_ignored")
    assert len(logged) == 1  # one line a minute per device, not one per call


def urllib_text(process: Daemon) -> str:
    import urllib.request

    port = process.named(process.STARTED)[0]["metrics_port"]
    url = f"http://127.0.0.1:{port}/metrics"
    return urllib.request.urlopen(url, timeout=10).read().decode()  # type: ignore[no-any-return]


def test_one_live_long_poll_per_device(fleet: Fleet) -> None:
    greedy, other = fleet.add_device("greedy"), fleet.add_device("other")
    fleet.publish(fleet.mlp(1), 1)
    meta = auth.metadata(auth.read_token(greedy), "greedy")
    codes: list[str] = []
    with grpc.insecure_channel(fleet.address) as channel:
        stub = pb_grpc.FleetServiceStub(channel)
        first = stub.WatchDesiredState(pb.WatchRequest(wait_ms=0), metadata=meta, timeout=10)
        held = [
            stub.WatchDesiredState.future(
                pb.WatchRequest(known_revision=first.revision, wait_ms=30_000),
                metadata=meta,
                timeout=60,
            )
            for _ in range(150)
        ]
        time.sleep(2)
        fleet.publish(fleet.mlp(2), 2)  # one change: wakes the one live poll
        for call in held:
            try:
                call.result()
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
    # Each newer poll replaced the one before (ABORTED), or the device hit its rate limit.
    assert codes.count("OK") <= 1, codes
    assert set(codes) <= {"OK", "ABORTED", "RESOURCE_EXHAUSTED"}, set(codes)
    assert codes.count("ABORTED") >= 100
    assert device_poll(fleet.address, other, "other") < 1


def test_an_untrusted_or_oversized_release_costs_the_device_only_its_manifest(
    fleet: Fleet,
) -> None:
    def last_error(device: str) -> str:
        return next(d.last_error for d in fleet.status().devices if d.device_id == device)

    fleet.add_device("edge-1")
    fleet.add_device("edge-2")
    v1 = fleet.mlp(1)
    fleet.publish(v1, 1)
    agent = fleet.agent("edge-1")
    wait_for(lambda: serves(agent, v1), "v1 serving")
    before = metric(agent, "edge_agent_sync_bytes_total")
    store = fleet.tmp / "state-edge-1" / "sync"
    other = fleet.tmp / "other.pem"
    signing.generate_keypair(other, fleet.tmp / "other.pub")
    big = modelgen.mlp(fleet.tmp / "big.onnx", 5, width=2048)  # ~20 MB of new weights
    fleet.publish(big, 5, key=other)
    wait_for(lambda: last_error("edge-1").startswith("mlp v5: signature"), "v5 rejected")
    assert metric(agent, "edge_agent_sync_bytes_total") == before  # not a byte of its blobs
    assert not any((store / "blobs").iterdir()) and not any((store / "partial").iterdir())
    assert serves(agent, v1)
    # A release over the device's size cap: refused before a byte moves too.
    # (v1's weights are ~340 kB; the v5 rollout paused itself, so edge-2 is sent v1.)
    small = fleet.agent("edge-2", env={"EDGE_AGENT_SYNC_MAX_RELEASE_BYTES": "100000"})
    wait_for(lambda: last_error("edge-2").startswith("mlp v1: size"), "v1 refused by its size")
    assert metric(small, "edge_agent_sync_bytes_total") == 0


class ChunkSizeLiar(pb_grpc.FleetServiceServicer):  # type: ignore[misc]
    """A control plane in the middle that forwards every call to the real one and claims a
    4 GiB chunk size in each manifest (a device holds a chunk in memory until it checks)."""

    def __init__(self, upstream: str) -> None:
        self._stub = pb_grpc.FleetServiceStub(grpc.insecure_channel(upstream))

    def WatchDesiredState(self, request: Any, context: Any) -> Any:
        return self._stub.WatchDesiredState(
            request, metadata=context.invocation_metadata(), timeout=90
        )

    def GetManifest(self, request: Any, context: Any) -> Any:
        manifest = self._stub.GetManifest(
            request, metadata=context.invocation_metadata(), timeout=30
        )
        for blob in manifest.blobs:
            blob.chunk_size = 2**32 - 1
        return manifest

    def GetBlob(self, request: Any, context: Any) -> Any:
        yield from self._stub.GetBlob(request, metadata=context.invocation_metadata(), timeout=60)


def test_a_huge_chunk_size_is_refused(fleet: Fleet) -> None:
    def last_error(device: str) -> str:
        return next(d.last_error for d in fleet.status().devices if d.device_id == device)

    fleet.add_device("edge-1")
    fleet.publish(fleet.mlp(1), 1)
    server = grpc.server(futures.ThreadPoolExecutor(8))
    pb_grpc.add_FleetServiceServicer_to_server(ChunkSizeLiar(fleet.address), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        real = fleet.address
        fleet.address = f"127.0.0.1:{port}"
        agent = fleet.agent("edge-1")
        fleet.address = real
        wait_for(lambda: last_error("edge-1").startswith("mlp v1: format"), "the manifest refused")
        assert "chunk size 4294967295" in last_error("edge-1")
        assert metric(agent, "edge_agent_sync_bytes_total") == 0
    finally:
        server.stop(0)


def test_a_device_reads_only_releases_sent_to_it(fleet: Fleet) -> None:
    token = fleet.add_device("edge-a", "a")
    fleet.add_device("edge-b", "b")
    fleet.publish(fleet.mlp(1), 1, "--group", "b")
    directory = fleet.tmp / "mine"
    release = build_release(fleet.mlp(1), "mlp", 1, directory)
    blob = next(f.sha256 for f in release.files if f.path.endswith(".bin"))
    meta = auth.metadata(auth.read_token(token), "edge-a")
    with grpc.insecure_channel(fleet.address) as channel:
        stub = pb_grpc.FleetServiceStub(channel)

        def codes() -> tuple[grpc.StatusCode, grpc.StatusCode]:
            try:
                stub.GetManifest(
                    pb.GetManifestRequest(model="mlp", version=1), metadata=meta, timeout=10
                )
                manifest = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                manifest = exc.code()
            try:
                list(stub.GetBlob(pb.GetBlobRequest(digest=blob), metadata=meta, timeout=10))
                blob_code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                blob_code = exc.code()
            return manifest, blob_code

        assert codes() == (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.NOT_FOUND)
        fleet.steer("target", "--version", "1", "--group", "a")  # now sent to edge-a too
        assert codes() == (grpc.StatusCode.OK, grpc.StatusCode.OK)
    assert "edge_agent_controlplane_fetch_refused_total 2.0" in urllib_text(fleet.cp)


def test_the_control_plane_checks_what_publishers_send(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    key, pub = tmp_path / "publisher.pem", tmp_path / "publisher.pub"
    signing.generate_keypair(key, pub)
    fleet = Fleet(tmp_path, start_daemon, "--trusted-key", str(pub))
    fleet.key, fleet.pub = key, pub
    # The data directory and the registry are private.
    assert fleet.data.stat().st_mode & 0o777 == 0o700
    assert (fleet.data / "registry.sqlite").stat().st_mode & 0o777 == 0o600
    fleet.publish(fleet.mlp(1), 1, "--no-activate")  # signed by a trusted key: registered
    other = tmp_path / "other.pem"
    signing.generate_keypair(other, tmp_path / "other.pub")
    refused = fleet.publish(fleet.mlp(2), 2, key=other, check=False)
    assert refused.returncode == 1 and "INVALID_ARGUMENT" in refused.stderr
    assert "signature" in refused.stderr
    expired = fleet.publish(fleet.mlp(3), 3, "--expires-in", "0.001", check=False)
    assert expired.returncode == 1 and "expired" in expired.stderr
    stub, meta = fleet.stub()

    too_big = pb.SetTargetRequest(model="mlp", version=2**63)
    assert status_code(lambda: stub.SetTarget(too_big, metadata=meta, timeout=10)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    directory = tmp_path / "r"
    build_release(fleet.mlp(4), "mlp", 4, directory)
    document = json.loads((directory / "release.json").read_text())
    document["version"] = 2**63
    huge = pb.RegisterReleaseRequest(release_json=json.dumps(document).encode(), signature=b"x")
    assert status_code(lambda: stub.RegisterRelease(huge, metadata=meta, timeout=10)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    nested = pb.RegisterReleaseRequest(release_json=b"[" * 100_000, signature=b"x")
    assert status_code(lambda: stub.RegisterRelease(nested, metadata=meta, timeout=10)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    declared = iter([pb.UploadBlobRequest(digest="0" * 64, size=2**63, data=b"x")])
    assert status_code(lambda: stub.UploadBlob(declared, metadata=meta, timeout=10)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    device = fleet.add_device("d")
    device_meta = auth.metadata(auth.read_token(device), "d")
    manifest = pb.GetManifestRequest(model="mlp", version=2**64 - 1)
    assert status_code(lambda: stub.GetManifest(manifest, metadata=device_meta, timeout=10)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert not fleet.cp.named("request.failed") or all(
        e["code"] != "INTERNAL" for e in fleet.cp.named("request.failed")
    )


def test_a_stalled_upload_is_cut_off(tmp_path: Path, start_daemon: Callable[..., Daemon]) -> None:
    fleet = Fleet(tmp_path, start_daemon, "--upload-idle-seconds", "1")
    stub, meta = fleet.stub()
    release = threading.Event()

    def slow() -> Iterator[pb.UploadBlobRequest]:
        yield pb.UploadBlobRequest(digest="0" * 64, size=10, data=b"12345")
        release.wait(10)  # then nothing for longer than the control plane waits

    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as cut:
        stub.UploadBlob(slow(), metadata=meta, timeout=20)
    release.set()
    assert cut.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "too slow" in str(cut.value.details()) and time.monotonic() - started < 8
    assert not any((fleet.data / "blobs" / "tmp").iterdir())  # its temporary file is gone
    os.kill(fleet.cp.proc.pid, signal.SIGTERM)
    assert fleet.cp.proc.wait(20) == 0


def test_a_connection_busy_with_one_long_call_is_not_shut_as_idle(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    # Its only call came before the guard's scan first listed the connection, then ran past
    # first_request_seconds: the guard shut it as a connection that never made a call.
    import tritonclient.grpc as grpcclient

    daemon, flag = held_daemon(tmp_path, start_daemon, EDGE_AGENT_FIRST_REQUEST_SECONDS="2")
    with grpcclient.InferenceServerClient(daemon.url) as client:
        tensor = grpcclient.InferInput("input", [1, 64], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, 64), np.float32))
        answers: list[Any] = []
        client.async_infer("digits", [tensor], lambda result, error: answers.append(error))
        wait_for(lambda: Path(f"{flag}.reached").exists(), "the call running")
        time.sleep(4.0)  # past the first-call deadline, with the call still running
        flag.unlink()
        wait_for(lambda: answers, "the answer")
    assert answers == [None]
    assert not daemon.named("connections.closed")
