"""Fleet weight sync end to end: a real control plane and real agents (subprocesses on loopback),
driven through the `edge-agent` CLI, stock tritonclient and the fleet gRPC API."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest

import modelgen
from conftest import ROOT, ControlPlaneProcess, Daemon, metric, wait_for
from edge_agent._proto import fleet_pb2 as pb
from edge_agent._proto import fleet_pb2_grpc as pb_grpc
from edge_agent.fleet import auth, signing
from edge_agent.fleet.release import build_release

X = np.random.default_rng(7).standard_normal((2, 64)).astype(np.float32)


def expected(model_file: Path) -> np.ndarray:
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": X})[0]  # type: ignore[no-any-return]


def infer(agent: Daemon, model: str = "mlp") -> np.ndarray | None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    with grpcclient.InferenceServerClient(agent.url) as client:
        tensor = grpcclient.InferInput("x", list(X.shape), "FP32")
        tensor.set_data_from_numpy(X)
        try:
            return client.infer(model, [tensor], client_timeout=10).as_numpy("y")  # type: ignore[no-any-return]
        except InferenceServerException:
            return None


def serves(agent: Daemon, model_file: Path) -> bool:
    out = infer(agent)
    return out is not None and np.allclose(out, expected(model_file), atol=1e-5)


def status_code(call: Callable[[], Any]) -> grpc.StatusCode:
    """The gRPC status a call ends with (OK when it returns)."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


class Fleet:
    """A control plane, its keys and tokens, and helpers to publish and to start agents."""

    def __init__(
        self,
        tmp: Path,
        start: Callable[..., Daemon],
        *cp_args: str,
        scale: tuple[str, str, dict[str, str]] | None = None,
    ) -> None:
        """`scale`: (database URL, blob store URL, environment with the S3 credentials) to run
        the control plane on PostgreSQL + S3 instead of the embedded default."""
        self.tmp = tmp
        self.start = start
        self.data = tmp / "cp"
        self.database = scale[0] if scale else ""
        self.blob_store = scale[1] if scale else ""
        self.cp_env = scale[2] if scale else None
        if scale:
            cp_args = ("--database", self.database, "--blob-store", self.blob_store, *cp_args)
        self.cp_args = cp_args
        self.cp = start(
            "--data-dir", str(self.data), *cp_args, kind=ControlPlaneProcess, env=self.cp_env
        )
        self.cp.wait_started()
        self.address = self.cp.url
        self.token_file = self.data / "publisher.token"
        self.key, self.pub = tmp / "signing.pem", tmp / "signing.pub"
        signing.generate_keypair(self.key, self.pub)
        self.models = tmp / "models"
        self.models.mkdir()

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "edge_agent", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check:
            assert done.returncode == 0, done.stderr
        return done

    def restart_control_plane(self, kill: bool = False) -> None:
        port = self.cp.port
        if kill:
            self.cp.proc.kill()
            self.cp.proc.wait()
        self.cp.stop()
        self.cp = self.start(
            "--data-dir",
            str(self.data),
            "--address",
            f"127.0.0.1:{port}",
            *self.cp_args,
            kind=ControlPlaneProcess,
            address=False,
            env=self.cp_env,
        ).wait_started()

    def steer(self, action: str, *args: str) -> subprocess.CompletedProcess[str]:
        """`edge-agent fleet ACTION --model mlp ARGS` against this control plane."""
        return self.cli(
            "fleet",
            action,
            "--model",
            "mlp",
            *args,
            "--control-plane",
            self.address,
            "--token-file",
            str(self.token_file),
        )

    def add_device(self, device: str, group: str = "") -> Path:
        token = self.tmp / f"{device}.token"
        args = ["--group", group] if group else []
        # The embedded registry is a file here; a database is reached through the API.
        where = (
            ["--control-plane", self.address, "--token-file", str(self.token_file)]
            if self.database
            else ["--data-dir", str(self.data)]
        )
        self.cli(
            "fleet",
            "add-device",
            *where,
            "--device-id",
            device,
            "--device-token-file",
            str(token),
            *args,
        )
        return token

    def mlp(self, seed: int, **kwargs: int) -> Path:
        return modelgen.mlp(self.models / f"mlp-{seed}-{kwargs}.onnx", seed, **kwargs)

    def publish(
        self,
        model_file: Path,
        version: int,
        *extra: str,
        key: Path | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        return self.cli(
            "publish",
            str(model_file),
            "--model",
            "mlp",
            "--version",
            str(version),
            "--control-plane",
            self.address,
            "--signing-key",
            str(key or self.key),
            "--token-file",
            str(self.token_file),
            *extra,
            check=check,
        )

    def sql(self, query: str) -> list[tuple[Any, ...]]:
        """A read-only query of the registry, wherever it lives."""
        if self.database:
            import psycopg

            with psycopg.connect(self.database) as conn:
                return [tuple(r) for r in conn.execute(query).fetchall()]
        with sqlite3.connect(f"file:{self.data / 'registry.sqlite'}?mode=ro", uri=True) as db:
            return [tuple(r) for r in db.execute(query)]

    def tamper_blob(self, digest: str) -> None:
        """Flip a byte of a stored blob, behind the control plane's back."""
        if not self.blob_store:
            path = self.data / "blobs" / "sha256" / digest[:2] / digest
            data = bytearray(path.read_bytes())
            data[10] ^= 0xFF
            path.write_bytes(bytes(data))
            return
        import boto3
        import botocore.config

        from edge_agent.controlplane.s3 import parse_s3_url

        bucket, prefix, endpoint, region = parse_s3_url(self.blob_store)
        assert self.cp_env is not None
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=region,
            aws_access_key_id=self.cp_env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.cp_env["AWS_SECRET_ACCESS_KEY"],
            config=botocore.config.Config(s3={"addressing_style": "path"}),
        )
        key = f"{prefix}sha256/{digest[:2]}/{digest}"
        data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
        data[10] ^= 0xFF
        client.put_object(Bucket=bucket, Key=key, Body=bytes(data))

    def stub(self) -> tuple[pb_grpc.FleetServiceStub, Any]:
        channel = grpc.insecure_channel(self.address)
        return pb_grpc.FleetServiceStub(channel), auth.metadata(auth.read_token(self.token_file))

    def status(self) -> pb.FleetStatusResponse:
        stub, meta = self.stub()
        return stub.FleetStatus(pb.FleetStatusRequest(), metadata=meta, timeout=10)

    def report(self, device: str) -> pb.ModelReport | None:
        for d in self.status().devices:
            if d.device_id == device:
                return next((r for r in d.models if r.model == "mlp"), None)
        return None

    def agent(
        self,
        device: str,
        *extra: str,
        token: Path | None = None,
        preexec: Callable[[], None] | None = None,
        env: dict[str, str] | None = None,
    ) -> Daemon:
        repo = self.tmp / f"repo-{device}"
        state = self.tmp / f"state-{device}"
        repo.mkdir(exist_ok=True)
        state.mkdir(exist_ok=True)
        return self.start(
            "--model-repository",
            str(repo),
            "--state-dir",
            str(state),
            "--execution-providers",
            "cpu",
            "--control-plane",
            self.address,
            "--device-id",
            device,
            "--device-token-file",
            str(token or self.tmp / f"{device}.token"),
            "--trusted-key",
            str(self.pub),
            "--sync-interval",
            "2",
            *extra,
            preexec=preexec,
            env=env,
        ).wait_started()

    def wait_report(self, device: str, version: int, state: str) -> pb.ModelReport:
        def done() -> pb.ModelReport | None:
            r = self.report(device)
            ok = r is not None and r.target_version == version and r.state == state
            return r if ok else None

        return wait_for(done, f"{device} reports v{version} {state}")  # type: ignore[no-any-return]


@pytest.fixture(params=["embedded", "scale"])
def fleet(
    request: pytest.FixtureRequest, tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> Iterator[Fleet]:
    """The fleet suite runs twice: on the embedded default (SQLite + a directory) and on
    PostgreSQL + an S3-compatible server (SeaweedFS), each test with a fresh database and
    bucket prefix."""
    if request.param == "scale":
        pg, s3 = request.getfixturevalue("scale_services")
        yield Fleet(tmp_path, start_daemon, scale=(pg.new_database(), s3.new_url(), s3.env()))
    else:
        yield Fleet(tmp_path, start_daemon)


def test_publish_then_one_layer_update_under_load(fleet: Fleet) -> None:
    fleet.add_device("edge-1")
    v1, v2 = fleet.mlp(1), fleet.mlp(2)
    out = fleet.publish(v1, 1)
    assert "published mlp v1" in out.stdout and "rollout" in out.stdout
    agent = fleet.agent("edge-1")
    wait_for(lambda: serves(agent, v1), "v1 serving")
    fleet.wait_report("edge-1", 1, "serving")
    before = metric(agent, "edge_agent_sync_bytes_total")
    model_size = sum(p.stat().st_size for p in (fleet.tmp / "repo-edge-1" / "mlp" / "1").iterdir())
    assert before >= model_size * 0.9  # the first install moves the whole model

    failures: list[str] = []
    answers: list[np.ndarray] = []
    stop = threading.Event()

    def load() -> None:
        import tritonclient.grpc as grpcclient

        with grpcclient.InferenceServerClient(agent.url) as client:
            tensor = grpcclient.InferInput("x", list(X.shape), "FP32")
            tensor.set_data_from_numpy(X)
            while not stop.is_set():
                try:
                    answers.append(client.infer("mlp", [tensor]).as_numpy("y"))
                except Exception as exc:
                    failures.append(repr(exc))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        published = fleet.publish(v2, 2)
        assert "uploaded" in published.stdout
        wait_for(lambda: serves(agent, v2), "v2 serving")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures[:3]
    one, two = expected(v1), expected(v2)
    assert all(np.allclose(a, one, atol=1e-5) or np.allclose(a, two, atol=1e-5) for a in answers)
    assert np.allclose(answers[-1], two, atol=1e-5)
    moved = metric(agent, "edge_agent_sync_bytes_total") - before
    assert 0 < moved < 0.3 * model_size, (moved, model_size)
    # The publisher uploaded only the changed blobs too.
    found = re.search(r"uploaded ([\d,]+) B", published.stdout)
    assert found is not None, published.stdout
    uploaded = int(found.group(1).replace(",", ""))
    assert uploaded < 0.3 * model_size
    report = fleet.wait_report("edge-1", 2, "serving")
    assert report.installed_version == 2 and report.serving_version == 2
    status = fleet.cli(
        "fleet", "status", "--control-plane", fleet.address, "--token-file", str(fleet.token_file)
    ).stdout
    # DEVICE GROUP LAST-SEEN MODEL SERVING VARIANT INSTALLED DESIRED STATE
    assert re.search(r"^edge-1\s.*\smlp\s+2\s+fp32\s+2\s+2\s+serving\s", status, re.M), status


def craft_release(
    fleet: Fleet, model_file: Path, version: int, mutate: Callable[[Path], None]
) -> None:
    """Build a release directory, change it with `mutate`, sign what results, and upload it
    with the fleet API: a release that only a buggy or hostile publisher would make."""
    from edge_agent.fleet.cli import upload_release

    directory = fleet.tmp / f"crafted-{version}"
    build_release(model_file, "mlp", version, directory)
    mutate(directory)
    signature = signing.sign_directory(directory, fleet.key)
    stub, meta = fleet.stub()
    target = pb.SetTargetRequest(model="mlp", version=version, scope=pb.FLEET)
    upload_release(stub, meta, directory, signature, target, True, 30)


def test_bad_releases_are_rejected_and_the_serving_version_stays(fleet: Fleet) -> None:
    fleet.add_device("edge-1")
    v1, v3 = fleet.mlp(1), fleet.mlp(3)
    fleet.publish(v1, 1, "--no-activate")
    fleet.publish(v3, 3)
    agent = fleet.agent("edge-1")
    wait_for(lambda: serves(agent, v3), "v3 serving")

    def rejected(version: int, reason: str) -> None:
        def reported() -> bool:
            device = next(d for d in fleet.status().devices if d.device_id == "edge-1")
            return device.last_error.startswith(f"mlp v{version}: {reason}:")

        wait_for(reported, f"the device reports v{version} rejected ({reason})")
        rollout = next(r for r in fleet.status().rollouts if r.version == version)
        assert rollout.failed == 1 and rollout.state == "paused"  # 1 of 1 devices > 20%
        assert serves(agent, v3)
        fleet.wait_report("edge-1", 3, "serving")

    # A replayed older release (never installed here): below the rollback floor.
    fleet.steer("target", "--version", "1")
    rejected(1, "rollback")
    # Expired.
    fleet.publish(fleet.mlp(4), 4, "--no-activate", "--expires-in", "1")
    time.sleep(1.5)
    fleet.steer("target", "--version", "4")
    rejected(4, "expired")
    # Signed with a key the device does not trust.
    other = fleet.tmp / "other.pem"
    signing.generate_keypair(other, fleet.tmp / "other.pub")
    fleet.publish(fleet.mlp(5), 5, key=other)
    rejected(5, "signature")
    # A blob tampered with on the control plane (after upload): every chunk fails its digest.
    v6 = fleet.mlp(6)
    fleet.publish(v6, 6, "--no-activate")
    (only_v6,) = fleet.sql(
        "SELECT digest FROM release_blobs WHERE version = 6 AND digest NOT IN "
        "(SELECT digest FROM release_blobs WHERE version != 6)"
    )[:1]
    fleet.tamper_blob(only_v6[0])
    fleet.steer("target", "--version", "6")
    # The store is at fault, not the release (its manifest is signed): the device retries, and
    # the rollout neither counts it failed nor advances on it.
    retrying = fleet.wait_report("edge-1", 6, "retrying")
    assert retrying.error.startswith("digest:") and retrying.serving_version == 3
    six = next(r for r in fleet.status().rollouts if r.version == 6)
    assert six.failed == 0 and six.state == "active"
    assert serves(agent, v3)
    # Nothing corrupt is kept: the bad blob never enters the device's store.
    store = fleet.tmp / "state-edge-1" / "sync"
    assert not (store / "blobs" / only_v6[0]).exists()
    assert all(p.stat().st_size == 0 for p in (store / "partial").glob(f"{only_v6[0]}*"))
    fleet.steer("rollback")  # v6 withdrawn: the device stops retrying it
    fleet.wait_report("edge-1", 3, "serving")

    # The graph of this release with weights of another: names, dtypes and shapes must match.
    def swap_weights(directory: Path) -> None:
        import json

        release = json.loads((directory / "release.json").read_text())
        last = next(t for t in release["tensors"] if t["name"] == "w2")
        last["shape"] = [10, 256]
        (directory / "release.json").write_text(json.dumps(release))

    craft_release(fleet, fleet.mlp(7), 7, swap_weights)
    rejected(7, "contract")

    # A release naming a file outside itself: the control plane refuses to register it.
    directory = fleet.tmp / "escape"
    build_release(fleet.mlp(8), "mlp", 8, directory)
    text = (directory / "release.json").read_text()
    first = re.search(r'"path": "([0-9a-f]{64}\.bin)"', text).group(1)  # type: ignore[union-attr]
    stub, meta = fleet.stub()
    with pytest.raises(grpc.RpcError) as refused:
        stub.RegisterRelease(
            pb.RegisterReleaseRequest(
                release_json=text.replace(first, "../../outside.bin", 1).encode(),
                signature=signing.sign_directory(directory, fleet.key),
            ),
            metadata=meta,
            timeout=10,
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "outside" in str(refused.value.details())

    # Still converges on a good release afterwards.
    v9 = fleet.mlp(9)
    fleet.publish(v9, 9)
    wait_for(lambda: serves(agent, v9), "v9 serving")
    failures = {
        reason: metric(agent, f'edge_agent_sync_failures_total{{reason="{reason}"}}')
        for reason in ("rollback", "expired", "signature", "digest", "contract")
    }
    assert all(count >= 1 for count in failures.values()), failures
    logged = {e.get("reason") for e in agent.named("sync.failed")}
    assert {"rollback", "expired", "signature", "digest", "contract"} <= logged


def test_sigkill_mid_download_resumes(fleet: Fleet) -> None:
    fleet.add_device("edge-1")
    big = fleet.mlp(1, width=1024, hidden_layers=3)  # ~8.3 MB of weights
    fleet.publish(big, 1)
    agent = fleet.agent("edge-1", "--sync-bandwidth-limit", "1500000")
    partial = fleet.tmp / "state-edge-1" / "sync" / "partial"
    wait_for(
        lambda: any(p.stat().st_size >= 2 << 20 for p in partial.glob("*.part")),
        "a partial download of 2 MiB",
    )
    agent.proc.send_signal(signal.SIGKILL)
    agent.proc.wait()
    on_disk = sum(p.stat().st_size for p in partial.glob("*.part"))
    on_disk += sum(p.stat().st_size for p in (partial.parent / "blobs").glob("*"))
    assert on_disk >= 2 << 20
    restarted = fleet.agent("edge-1")
    wait_for(lambda: serves(restarted, big), "the big model serving after the restart")
    total = sum(p.stat().st_size for p in (fleet.tmp / "repo-edge-1" / "mlp" / "1").iterdir())
    fetched_after = metric(restarted, "edge_agent_sync_bytes_total")
    # What was on disk was not fetched again (only the one unfinished chunk, at most).
    assert fetched_after <= total - on_disk + (1 << 20), (fetched_after, total, on_disk)


class CuttableProxy:
    """A TCP proxy to the control plane that passes at most `rate` bytes/s towards the agent and
    can cut every connection at once: a slow link that drops mid-blob."""

    def __init__(self, upstream: str, rate: int) -> None:
        self.upstream = upstream.rsplit(":", 1)
        self.rate = rate
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection((self.upstream[0], int(self.upstream[1])))
            except OSError:
                client.close()  # the control plane is down: so is the link
                continue
            self.sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, 0), daemon=True).start()
            threading.Thread(
                target=self._pump, args=(server, client, self.rate), daemon=True
            ).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, rate: int) -> None:
        try:
            while data := source.recv(16384):
                sink.sendall(data)
                if rate:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self.sockets.clear()

    def close(self) -> None:
        self.listener.close()
        self.cut()


def test_connection_cut_mid_blob_resumes(fleet: Fleet) -> None:
    fleet.add_device("edge-1")
    big = fleet.mlp(1, width=1024, hidden_layers=3)
    fleet.publish(big, 1)
    proxy = CuttableProxy(fleet.address, rate=2_000_000)
    fleet.address, direct = proxy.address, fleet.address
    try:
        agent = fleet.agent("edge-1")
        partial = fleet.tmp / "state-edge-1" / "sync" / "partial"
        wait_for(
            lambda: any(p.stat().st_size >= 1 << 20 for p in partial.glob("*.part")),
            "a partial download",
        )
        proxy.cut()
        wait_for(lambda: serves(agent, big), "the model serving after the cut")
    finally:
        proxy.close()
        fleet.address = direct
    version_dir = fleet.tmp / "repo-edge-1" / "mlp" / "1"
    total = sum(
        p.stat().st_size for p in version_dir.iterdir() if p.name not in ("release.json", "variant")
    )
    received = metric(agent, "edge_agent_sync_bytes_total")
    # Resumed where it was cut: at most the chunk in flight came twice.
    assert total <= received <= total + (1 << 20), (received, total)
    assert metric(agent, 'edge_agent_sync_failures_total{reason="unreachable"}') >= 1


def test_disk_full_while_downloading_then_converges(fleet: Fleet) -> None:
    """Files over 1 MiB cannot be written (RLIMIT_FSIZE; Python ignores SIGXFSZ, so the write
    fails with EFBIG like a full disk fails with ENOSPC): the agent reports it and retries, keeps
    serving v1, and installs v2 once restarted without the limit."""
    import resource

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    fleet.add_device("edge-1")
    v1, v2 = fleet.mlp(1), fleet.mlp(2, width=1024)  # v2 has 4 MiB weight files
    fleet.publish(v1, 1)
    agent = fleet.agent("edge-1", preexec=small_files)
    wait_for(lambda: serves(agent, v1), "v1 serving")
    fleet.publish(v2, 2)

    def failed() -> bool:
        device = fleet.status().devices[0]
        return device.last_error.startswith("mlp v2: disk:")

    wait_for(failed, "the device reports the failed write")
    assert fleet.wait_report("edge-1", 2, "retrying").serving_version == 1
    # A device's own trouble is not a bad release: the rollout goes on.
    assert fleet.status().rollouts[-1].state == "active"
    assert metric(agent, 'edge_agent_sync_failures_total{reason="disk"}') >= 1
    assert serves(agent, v1)
    agent.stop()
    agent = fleet.agent("edge-1")
    wait_for(lambda: serves(agent, v2), "v2 serving once files fit")


def test_control_plane_down_the_agent_keeps_serving_and_catches_up(fleet: Fleet) -> None:
    fleet.add_device("edge-1")
    v1, v2 = fleet.mlp(1), fleet.mlp(2)
    fleet.publish(v1, 1)
    agent = fleet.agent("edge-1")
    wait_for(lambda: serves(agent, v1), "v1 serving")
    fleet.cp.stop()
    wait_for(
        lambda: metric(agent, 'edge_agent_sync_failures_total{reason="unreachable"}') >= 1,
        "the agent notices the control plane is gone",
    )
    assert serves(agent, v1)
    # A restart while the control plane is down: serves what it installed, from its state dir.
    agent.stop()
    agent = fleet.agent("edge-1")
    assert serves(agent, v1)
    fleet.restart_control_plane()
    fleet.publish(v2, 2)
    wait_for(lambda: serves(agent, v2), "v2 serving once the control plane is back")
    fleet.wait_report("edge-1", 2, "serving")


def test_canary_auto_pause_and_rollback(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    fleet = Fleet(tmp_path, start_daemon, "--max-failure-share", "0.3")
    devices = ["edge-a", "edge-b", "edge-c"]
    for d in devices:
        fleet.add_device(d)
    v1, v2 = fleet.mlp(1), fleet.mlp(2)
    fleet.publish(v1, 1)
    agents = {d: fleet.agent(d) for d in devices}
    for d in devices:
        wait_for(lambda d=d: serves(agents[d], v1), f"{d} serving v1")  # type: ignore[misc]
    out = fleet.publish(v2, 2, "--canary", "50", "--json").stdout
    cohort = json.loads(out)["rollout"]["devices"]
    assert len(cohort) == 2 and set(cohort) < set(devices)  # ceil(50% of 3)
    for d in cohort:
        wait_for(lambda d=d: serves(agents[d], v2), f"{d} serving the canary")  # type: ignore[misc]
    (outside,) = set(devices) - set(cohort)
    fleet.wait_report(outside, 1, "serving")
    time.sleep(2)  # one more poll window: the canary must not reach it
    assert serves(agents[outside], v1)

    # A broken release for the whole fleet: failures pause the rollout by themselves.
    other = tmp_path / "other.pem"
    signing.generate_keypair(other, tmp_path / "other.pub")
    fleet.publish(fleet.mlp(3), 3, key=other)

    def paused() -> pb.RolloutStatus | None:
        r = next(r for r in fleet.status().rollouts if r.version == 3)
        return r if r.state == "paused" else None

    rollout = wait_for(paused, "the v3 rollout auto-paused")
    assert rollout.reason.startswith("auto-paused") and rollout.failed >= 1
    for d in devices:
        assert serves(agents[d], v2 if d in cohort else v1)

    resumed = fleet.steer("resume").stdout
    assert "mlp v3 fleet active" in resumed
    # Roll back the broken rollout, then the canary: the cohort returns to v1 (installed there).
    for _ in range(2):
        fleet.steer("rollback")
    for d in cohort:
        wait_for(lambda d=d: serves(agents[d], v1), f"{d} rolled back to v1")  # type: ignore[misc]
        fleet.wait_report(d, 1, "serving")


METADATA = """
import sys, grpc
from edge_agent._proto import grpc_service_pb2 as pb, grpc_service_pb2_grpc as pbg
stub = pbg.GRPCInferenceServiceStub(grpc.insecure_channel(sys.argv[1]))
answer = stub.ModelMetadata(pb.ModelMetadataRequest(name=sys.argv[2]), timeout=10)
print(answer.parameters["edge_agent.variant"].string_param)
"""


def served_variant(agent: Daemon, model: str) -> str:
    """ModelMetadata's variant parameter, read with our stubs (in a process of their own: they
    cannot share this one with tritonclient's)."""
    done = subprocess.run(
        [sys.executable, "-c", METADATA, agent.url, model],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.stdout.strip() if done.returncode == 0 else ""  # not loaded yet: NOT_FOUND


def test_variants_the_device_gets_only_the_one_it_runs(fleet: Fleet) -> None:
    shipped = ROOT / "models" / "digits"
    for device in ("cpu-int8", "cpu-fp32"):
        fleet.add_device(device)
    out = fleet.cli(
        "publish",
        str(shipped / "1" / "model.onnx"),
        "--model",
        "digits",
        "--version",
        "1",
        "--variant",
        f"int8={shipped / 'variants' / 'int8.onnx'}",
        "--variant",
        f"fp16={shipped / 'variants' / 'fp16.onnx'}",
        "--control-plane",
        fleet.address,
        "--signing-key",
        str(fleet.key),
        "--token-file",
        str(fleet.token_file),
    ).stdout
    # Each variant's own files (the int8 graph keeps its small weights inside), and the model's
    # config.pbtxt beside the graph (publishing from a repository layout finds it).
    assert "fp32 4 files" in out and "fp16 4 files" in out and "int8 3 files" in out, out
    assert "(config.pbtxt)" in out
    int8 = fleet.agent("cpu-int8")  # default preference on CPU: int8, then fp32
    fp32 = fleet.start(
        "--model-repository",
        str(fleet.tmp / "repo-fp32"),
        "--state-dir",
        str(fleet.tmp),
        "--execution-providers",
        "cpu",
        "--control-plane",
        fleet.address,
        "--device-id",
        "cpu-fp32",
        "--device-token-file",
        str(fleet.tmp / "cpu-fp32.token"),
        "--trusted-key",
        str(fleet.pub),
        "--sync-interval",
        "2",
        env={"EDGE_AGENT_VARIANT_PREFERENCE_CPU": "fp32"},
    )
    (fleet.tmp / "repo-fp32").mkdir(exist_ok=True)
    fp32.wait_started()
    wait_for(lambda: served_variant(int8, "digits") == "int8", "the int8 variant serving")
    wait_for(lambda: served_variant(fp32, "digits") == "fp32", "the fp32 variant serving")
    int8_dir = fleet.tmp / "repo-cpu-int8" / "digits" / "1"
    fp32_dir = fleet.tmp / "repo-fp32" / "digits" / "1"
    assert (int8_dir / "variant").read_text().strip() == "int8"
    # The published config came along: the synced model serves as the shipped one does.
    shipped_config = (shipped / "config.pbtxt").read_bytes()
    for agent, version_dir in ((int8, int8_dir), (fp32, fp32_dir)):
        assert (version_dir.parent / "config.pbtxt").read_bytes() == shipped_config
        assert model_config(agent, "digits").max_batch_size == 64
    # Only the chosen variant's files moved.
    moved = metric(int8, "edge_agent_sync_bytes_total")
    int8_files = sum(
        p.stat().st_size for p in int8_dir.iterdir() if p.name not in ("release.json", "variant")
    )
    assert moved == int8_files
    assert moved < 0.5 * metric(fp32, "edge_agent_sync_bytes_total")
    assert sorted(p.name for p in fp32_dir.iterdir()) != sorted(p.name for p in int8_dir.iterdir())
    # Both answer like their variant does in-process.
    x = np.load(shipped / "sample.npy").astype(np.float32).reshape(-1, 64)[:2]
    import tritonclient.grpc as grpcclient

    for agent, model_file in (
        (int8, shipped / "variants" / "int8.onnx"),
        (fp32, shipped / "1" / "model.onnx"),
    ):
        session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
        expected_probabilities = session.run(None, {"input": x})[0]
        with grpcclient.InferenceServerClient(agent.url) as client:
            tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            answer = client.infer("digits", [tensor]).as_numpy("probabilities")
        assert np.allclose(answer, expected_probabilities, atol=1e-5)


def test_credentials(fleet: Fleet) -> None:
    token = fleet.add_device("edge-1")
    stub, meta = fleet.stub()
    request = pb.FleetStatusRequest()
    with pytest.raises(grpc.RpcError) as none:
        stub.FleetStatus(request, timeout=10)
    assert none.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as wrong:
        stub.FleetStatus(request, metadata=auth.metadata("not-the-token"), timeout=10)
    assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
    device_meta = auth.metadata(auth.read_token(token), "edge-1")
    with pytest.raises(grpc.RpcError) as role:
        stub.FleetStatus(request, metadata=device_meta, timeout=10)
    assert role.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as other_device:
        stub.WatchDesiredState(
            pb.WatchRequest(wait_ms=0),
            metadata=auth.metadata(auth.read_token(token), "edge-2"),
            timeout=10,
        )
    assert other_device.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as publisher_as_device:
        stub.GetManifest(pb.GetManifestRequest(model="mlp", version=1), metadata=meta, timeout=10)
    assert publisher_as_device.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert stub.WatchDesiredState(pb.WatchRequest(wait_ms=0), metadata=device_meta, timeout=10)

    bad = fleet.tmp / "bad.token"
    bad.write_text("nope\n")
    refused = fleet.cli(
        "publish",
        str(fleet.mlp(1)),
        "--model",
        "mlp",
        "--version",
        "1",
        "--control-plane",
        fleet.address,
        "--signing-key",
        str(fleet.key),
        "--token-file",
        str(bad),
        check=False,
    )
    assert refused.returncode != 0 and "UNAUTHENTICATED" in refused.stderr
    # Secrets: the token files are private, device tokens are stored hashed, none is logged.
    assert (fleet.data / "publisher.token").stat().st_mode & 0o777 == 0o600
    # The S3 credentials (scale backend) appear nowhere either.
    for secret in (fleet.cp_env or {}).values():
        assert secret not in "".join(map(str, fleet.cp.events)) + "".join(fleet.cp.stderr)
    assert token.stat().st_mode & 0o777 == 0o600
    device_token = auth.read_token(token)
    stored = [row[0] for row in fleet.sql("SELECT token_hash FROM devices")]
    assert stored == [auth.token_hash(device_token)]
    logs = "".join(map(str, fleet.cp.events)) + "".join(fleet.cp.stderr)
    assert device_token not in logs and auth.read_token(fleet.token_file) not in logs


def test_agent_sync_settings_are_checked(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_agent",
            "serve",
            "--control-plane",
            "127.0.0.1:1",
            "--model-repository",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 78 and "required when control_plane is set" in done.stderr
    # A sync state that cannot be read: no guessing at the rollback floor.
    (tmp_path / "sync").mkdir()
    (tmp_path / "sync" / "state.json").write_text("{not json")
    (tmp_path / "token").write_text("t")
    signing.generate_keypair(tmp_path / "k.pem", tmp_path / "k.pub")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_agent",
            "serve",
            "--control-plane",
            "127.0.0.1:1",
            "--model-repository",
            str(tmp_path),
            "--state-dir",
            str(tmp_path),
            "--device-id",
            "d",
            "--device-token-file",
            str(tmp_path / "token"),
            "--trusted-key",
            str(tmp_path / "k.pub"),
            "--grpc-address",
            "127.0.0.1:0",
            "--metrics-address",
            "127.0.0.1:0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 78 and "sync state" in done.stderr and "unreadable" in done.stderr


def test_keygen_and_publish_errors(fleet: Fleet) -> None:
    not_onnx = fleet.tmp / "junk.onnx"
    not_onnx.write_bytes(b"junk")
    done = fleet.publish(not_onnx, 1, check=False)
    assert done.returncode == 1 and "not a readable ONNX model" in done.stderr
    existing = fleet.tmp / "exists.pem"
    existing.write_text("x")
    done = fleet.cli(
        "keygen",
        "--private-key",
        str(existing),
        "--public-key",
        str(fleet.tmp / "p.pub"),
        check=False,
    )
    assert done.returncode == 1 and "exists" in done.stderr
    assert existing.read_text() == "x"
    v1 = fleet.mlp(1)
    fleet.publish(v1, 1)
    again = fleet.publish(fleet.mlp(2), 1, check=False)  # same version, other content
    assert again.returncode == 1 and "FAILED_PRECONDITION" in again.stderr


def test_sync_over_tls(tmp_path: Path, start_daemon: Callable[..., Daemon]) -> None:
    from test_security import make_pki

    pki = make_pki(tmp_path)
    fleet = Fleet(
        tmp_path, start_daemon, "--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"])
    )
    fleet.add_device("edge-1")
    fleet.add_device("edge-2")
    v1 = fleet.mlp(1)
    out = fleet.cli(
        "publish",
        str(v1),
        "--model",
        "mlp",
        "--version",
        "1",
        "--control-plane",
        fleet.address,
        "--signing-key",
        str(fleet.key),
        "--token-file",
        str(fleet.token_file),
        "--control-plane-ca",
        str(pki["ca"]),
    )
    assert "published mlp v1" in out.stdout
    agent = fleet.agent("edge-1", "--control-plane-ca", str(pki["ca"]))
    wait_for(lambda: serves(agent, v1), "v1 over TLS")
    plaintext = fleet.agent("edge-2")  # no CA: it cannot talk to a TLS control plane
    wait_for(
        lambda: metric(plaintext, 'edge_agent_sync_failures_total{reason="unreachable"}') >= 1,
        "the plaintext agent failing",
    )
    assert infer(plaintext) is None  # it never got the model


def model_config(agent: Daemon, model: str = "mlp") -> Any:
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(agent.url) as client:
        return client.get_model_config(model).config


def test_the_model_config_travels_with_its_release(fleet: Fleet) -> None:
    """config.pbtxt, warmup/ and golden.npz published from a repository layout are signed files
    of the release and installed with the version; a rollback restores the version's config."""
    source = fleet.tmp / "src" / "mlp"
    v1 = modelgen.mlp(source / "1" / "model.onnx", 1)
    sample = np.arange(64, dtype=np.float32) / 64
    (source / "warmup").mkdir()
    (source / "warmup" / "x.bin").write_bytes(sample.tobytes())
    config = (
        'name: "mlp"\nmax_batch_size: 16\ndynamic_batching { }\n'
        'model_warmup [ { name: "sample" batch_size: 2 inputs { key: "x" value { '
        'data_type: TYPE_FP32 dims: [ 64 ] input_data_file: "x.bin" } } } ]\n'
    )
    (source / "config.pbtxt").write_text(config)
    np.savez(source / "1" / "golden.npz", **{"input/x": X, "output/y": expected(v1)})
    fleet.add_device("edge-1")
    published = fleet.publish(v1, 1).stdout
    assert "config.pbtxt" in published and "golden.npz" in published and "warmup/x.bin" in published
    agent = fleet.agent("edge-1")
    fleet.wait_report("edge-1", 1, "serving")
    repo = fleet.tmp / "repo-edge-1" / "mlp"
    assert (repo / "config.pbtxt").read_text() == config
    assert (repo / "warmup" / "x.bin").read_bytes() == sample.tobytes()  # its warmup ran from it
    assert (repo / "1" / "golden.npz").is_file()  # and passed its golden check
    assert model_config(agent).max_batch_size == 16  # not 32, worked out from the graph

    other = fleet.tmp / "v2.pbtxt"
    other.write_text('name: "mlp"\nmax_batch_size: 8\n')
    v2 = fleet.mlp(2)
    fleet.publish(v2, 2, "--config", str(other))
    fleet.wait_report("edge-1", 2, "serving")
    assert (repo / "config.pbtxt").read_text() == other.read_text()
    assert model_config(agent).max_batch_size == 8
    fleet.steer("rollback")  # back to v1: with the config v1 was published with
    fleet.wait_report("edge-1", 1, "serving")
    assert serves(agent, v1)
    assert (repo / "config.pbtxt").read_text() == config
    assert model_config(agent).max_batch_size == 16

    # A config that would fail on every device is refused at the publisher.
    wrong = fleet.tmp / "wrong.pbtxt"
    wrong.write_text('name: "digits"\n')
    refused = fleet.publish(fleet.mlp(3), 3, "--config", str(wrong), check=False)
    assert refused.returncode == 1 and "names the model 'digits'" in refused.stderr


def test_add_device_never_overwrites_a_credential(fleet: Fleet) -> None:
    publisher = fleet.token_file.read_text()
    # The old spelling, pointed at the publisher token: refused before anything is written.
    old = fleet.cli(
        "fleet", "add-device", "--data-dir", str(fleet.data), "--device-id", "d1",
        "--token-file", str(fleet.token_file), check=False,
    )  # fmt: skip
    assert old.returncode == 2 and "--device-token-file" in old.stderr
    clobber = fleet.cli(
        "fleet", "add-device", "--data-dir", str(fleet.data), "--device-id", "d1",
        "--device-token-file", str(fleet.token_file), check=False,
    )  # fmt: skip
    assert clobber.returncode == 1 and "refusing to overwrite" in clobber.stderr
    assert fleet.token_file.read_text() == publisher
    assert not any(d.device_id == "d1" for d in fleet.status().devices)  # nothing enrolled
    token = fleet.add_device("d1")
    assert token.stat().st_mode & 0o777 == 0o600
    assert any(d.device_id == "d1" for d in fleet.status().devices)


def _columns(header: str, line: str, names: list[str]) -> dict[str, str]:
    """The cells of `line` under each header name (the table aligns them)."""
    starts = [header.index(n) for n in names] + [len(line) + 1]
    return {n: line[starts[i] : starts[i + 1]].strip() for i, n in enumerate(names)}


def test_fleet_status_reads_clearly(fleet: Fleet) -> None:
    device_token = fleet.add_device("edge-1", "a")
    fleet.add_device("edge-2", "b")
    published = fleet.publish(fleet.mlp(1), 1).stdout
    assert "2 devices (pending 2)" in published and "edge-1" not in published  # counts, no ids
    agent = fleet.agent("edge-1")
    fleet.wait_report("edge-1", 1, "serving")
    fleet.publish(fleet.mlp(2), 2, "--group", "a")
    fleet.wait_report("edge-1", 2, "serving")
    assert {r.id: r.state for r in fleet.status().rollouts} == {1: "active", 2: "active"}
    fleet.publish(fleet.mlp(3), 3)  # the whole fleet again: 1 and 2 decide nobody now
    fleet.wait_report("edge-1", 3, "serving")
    status = fleet.status()
    assert {r.id: r.state for r in status.rollouts} == {
        1: "superseded",
        2: "superseded",
        3: "active",
    }
    newest = next(r for r in status.rollouts if r.id == 3)
    assert newest.device_count == 2 and dict(newest.device_states) == {"serving": 1, "pending": 1}

    text = fleet.cli(
        "fleet", "status", "--control-plane", fleet.address, "--token-file", str(fleet.token_file)
    ).stdout  # fmt: skip
    devices, rollouts = text.split("\n\n")
    header, *rows = devices.splitlines()
    names = ["DEVICE", "GROUP", "LAST SEEN", "MODEL", "SERVING", "VARIANT", "INSTALLED"]
    cells = {c["DEVICE"]: c for c in (_columns(header, r, names) for r in rows)}
    assert cells["edge-1"]["GROUP"] == "a" and cells["edge-1"]["SERVING"] == "3"
    assert cells["edge-1"]["VARIANT"] == "fp32" and cells["edge-1"]["MODEL"] == "mlp"
    assert cells["edge-2"]["LAST SEEN"] == "never"
    header, *rows = rollouts.splitlines()
    names = ["ROLLOUT", "MODEL", "VERSION", "SCOPE", "STATE", "DEVICES"]
    states = [_columns(header, r, names) for r in rows]
    assert [(s["ROLLOUT"], s["SCOPE"], s["STATE"]) for s in states] == [
        ("1", "fleet", "superseded"),
        ("2", "group a", "superseded"),
        ("3", "fleet", "active"),
    ]
    status_args = ["--control-plane", fleet.address, "--token-file", str(fleet.token_file)]
    as_json = json.loads(fleet.cli("fleet", "status", "--json", *status_args).stdout)
    assert {d["device_id"] for d in as_json["devices"]} == {"edge-1", "edge-2"}
    one = fleet.cli(
        "fleet", "status", "--rollout", "3", "--control-plane", fleet.address,
        "--token-file", str(fleet.token_file),
    ).stdout  # fmt: skip
    assert "rollout 3: mlp v3 fleet active: 2 devices" in one and "edge-1, edge-2" in one
    started = fleet.cp.named("rollout.started")
    assert [e["devices"] for e in started] == [2, 1, 2]  # counts in the log, not id lists
    # A device token where the publisher's is needed: the caller is known, the role is wrong,
    # whether or not it says which device it is.
    denied = fleet.cli(
        "fleet", "status", "--control-plane", fleet.address, "--token-file", str(device_token),
        check=False,
    )  # fmt: skip
    assert denied.returncode == 1 and "PERMISSION_DENIED" in denied.stderr
    assert agent.named("sync.connected")  # the agent said when it first reached the plane


def test_enrollment_by_api(fleet: Fleet) -> None:
    """EnrollDevices (bulk, all or nothing), token rotation, RevokeDevice, and the CLI's
    `fleet add-device --control-plane`."""
    stub, meta = fleet.stub()

    def enrolled() -> set[str]:
        return {d.device_id for d in fleet.status().devices}

    def enroll(*devices: tuple[str, str], rotate: bool = False) -> Any:
        request = pb.EnrollDevicesRequest(
            devices=[pb.DeviceEnrollment(device_id=i, group=g) for i, g in devices], rotate=rotate
        )
        return stub.EnrollDevices(request, metadata=meta, timeout=10)

    def poll(device: str, token: str) -> grpc.StatusCode:
        device_meta = auth.metadata(token, device)
        request = pb.WatchRequest(wait_ms=0)
        return status_code(
            lambda: stub.WatchDesiredState(request, metadata=device_meta, timeout=10)
        )

    answer = enroll(("cam-1", "lobby"), ("cam-2", "lobby"), ("cam-3", ""))
    tokens = {t.device_id: t.token for t in answer.tokens}
    assert set(tokens) == {"cam-1", "cam-2", "cam-3"} and enrolled() >= set(tokens)
    assert all(poll(d, t) == grpc.StatusCode.OK for d, t in tokens.items())
    # Refused whole: duplicate ids, a bad group, an already enrolled device, the wrong role.
    for bad in (
        lambda: enroll(("cam-9", ""), ("cam-9", "")),
        lambda: enroll(("cam-9", "no/such group")),
        lambda: enroll(("cam-9", ""), ("cam-1", "")),
    ):
        assert status_code(bad) in (
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.ALREADY_EXISTS,
        )
    assert "cam-9" not in enrolled()  # nothing half-written
    device_meta = auth.metadata(tokens["cam-1"], "cam-1")
    request = pb.EnrollDevicesRequest(devices=[pb.DeviceEnrollment(device_id="cam-9")])
    assert status_code(
        lambda: stub.EnrollDevices(request, metadata=device_meta, timeout=10)
    ) == grpc.StatusCode.PERMISSION_DENIED  # fmt: skip
    # Rotation: the old token stops working, the new one works.
    rotated = enroll(("cam-2", "lobby"), rotate=True).tokens[0].token
    assert poll("cam-2", tokens["cam-2"]) == grpc.StatusCode.UNAUTHENTICATED
    assert poll("cam-2", rotated) == grpc.StatusCode.OK
    # Revocation: refused at its next request.
    stub.RevokeDevice(pb.RevokeDeviceRequest(device_id="cam-3"), metadata=meta, timeout=10)
    assert poll("cam-3", tokens["cam-3"]) == grpc.StatusCode.UNAUTHENTICATED
    revoke_unknown = pb.RevokeDeviceRequest(device_id="nobody")
    assert status_code(
        lambda: stub.RevokeDevice(revoke_unknown, metadata=meta, timeout=10)
    ) == grpc.StatusCode.NOT_FOUND  # fmt: skip
    # The CLI through the API: the new token goes to a new 0600 file, never over another.
    out = fleet.tmp / "cam-4.token"
    fleet.cli(
        "fleet", "add-device", "--control-plane", fleet.address, "--token-file",
        str(fleet.token_file), "--device-id", "cam-4", "--group", "lobby",
        "--device-token-file", str(out),
    )  # fmt: skip
    assert out.stat().st_mode & 0o777 == 0o600
    assert poll("cam-4", out.read_text().strip()) == grpc.StatusCode.OK
    again = fleet.cli(
        "fleet", "add-device", "--control-plane", fleet.address, "--token-file",
        str(fleet.token_file), "--device-id", "cam-5", "--device-token-file", str(out),
        check=False,
    )  # fmt: skip
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr
    fleet.cli(
        "fleet", "revoke-device", "--device-id", "cam-4", "--control-plane", fleet.address,
        "--token-file", str(fleet.token_file),
    )  # fmt: skip
    assert "cam-4" not in enrolled()
    log = "".join(map(str, fleet.cp.events)) + "".join(fleet.cp.stderr)
    assert not any(t in log for t in [*tokens.values(), rotated])  # tokens are never logged
