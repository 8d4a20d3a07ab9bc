"""Power cuts and full disks during an update, on a real agent and control plane: a cut at each
install step (the agent SIGKILLed at a named point, common/failpoints.py) and a full filesystem at
each phase (a real size-limited tmpfs) leave the serving version untouched, nothing half-written
behind, and the update completes by itself."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from test_sync import Fleet, serves

from conftest import ROOT, Daemon, wait_for
from edge_agent.common.failpoints import ENVIRONMENT, POINTS

DIGITS = ROOT / "models" / "digits"


def leftovers(fleet: Fleet, device: str) -> list[str]:
    """What an update may leave only while it runs: blobs, partial downloads, staged copies,
    set-aside versions, hidden temporary files."""
    state, repo = fleet.tmp / f"state-{device}", fleet.tmp / f"repo-{device}"
    found = [
        str(p)
        for folder in ("blobs", "partial", "staging")
        if (state / "sync" / folder).is_dir()
        for p in (state / "sync" / folder).iterdir()
    ]
    found += [str(p) for p in (repo / ".staging").glob("*")] if (repo / ".staging").is_dir() else []
    found += [str(p) for p in (repo / "mlp").glob(".*")]
    return found


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def test_a_cut_at_each_install_step_leaves_one_copy_and_converges(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    fleet = Fleet(tmp_path, start_daemon)
    fleet.add_device("edge-1")
    fleet.publish(fleet.mlp(1), 1)
    agent = fleet.agent("edge-1")
    wait_for(lambda: serves(agent, fleet.mlp(1)), "v1 serving")
    agent.stop()
    state = tmp_path / "state-edge-1"
    clean_state = tree_bytes(state)
    for version, point in enumerate(POINTS, start=2):
        model = fleet.mlp(version)
        fleet.publish(model, version)
        cut = fleet.agent("edge-1", env={ENVIRONMENT: f"{point}:kill"})
        with contextlib.suppress(subprocess.TimeoutExpired):
            cut.proc.wait(timeout=60)
        assert cut.proc.returncode == -9, (point, cut.events[-10:])
        restarted = fleet.agent("edge-1")
        wait_for(lambda m=model, a=restarted: serves(a, m), f"v{version} serving after {point}")
        fleet.wait_report("edge-1", version, "serving")
        # Renamed in before the cut: recognised by its digests, not installed a second time.
        installs = len(restarted.named("model.files_installed"))
        recognised = restarted.named("sync.recognised_installed")
        if point in ("install.renamed", "sync.recorded"):
            assert installs == 0, point
        else:
            assert installs == 1, point
        assert len(recognised) == (point == "install.renamed"), point
        assert leftovers(fleet, "edge-1") == [], point
        versions = sorted(int(p.name) for p in (tmp_path / "repo-edge-1" / "mlp").glob("[0-9]*"))
        assert versions == list(range(1, version + 1)), point
        # The state directory converges to a clean update's size (state files only).
        assert abs(tree_bytes(state) - clean_state) < 4096, (point, tree_bytes(state), clean_state)
        restarted.stop()


@contextlib.contextmanager
def small_filesystem(path: Path, size_mib: int) -> Iterator[Path]:
    """A real tmpfs of `size_mib` at `path`; skips with the reason where it cannot be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root): {mount.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path, leave: int = 0, name: str = "filler") -> Path:
    """Write zeros until `leave` bytes are free (or the filesystem is full)."""
    path = directory / name
    block = b"\0" * (1 << 20)
    with open(path, "ab") as f:
        while (room := shutil.disk_usage(directory).free - leave) > 0:
            try:
                f.write(block[: min(len(block), room)])
                f.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
    return path


def pause_file(tmp: Path, point: str) -> tuple[dict[str, str], Path]:
    flag = tmp / f"hold-{point}"
    flag.touch()
    return {ENVIRONMENT: f"{point}:pause:{flag}"}, flag


def test_a_full_disk_at_each_phase_keeps_serving_and_completes_once_space_is_free(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    fleet = Fleet(tmp_path, start_daemon)
    state = small_filesystem(tmp_path / "state-edge-1", 112)
    repo = small_filesystem(tmp_path / "repo-edge-1", 48)
    with state, repo:
        run_full_disk_phases(fleet)


def run_full_disk_phases(fleet: Fleet) -> None:
    tmp = fleet.tmp
    state, repo = tmp / "state-edge-1", tmp / "repo-edge-1"
    fleet.add_device("edge-1")
    v1 = fleet.mlp(1)
    fleet.publish(v1, 1)
    slow = ("--sync-bandwidth-limit", "2000000")
    agent = fleet.agent("edge-1", *slow)
    wait_for(lambda: serves(agent, v1), "v1 serving")

    def reported_disk_full(version: int) -> str:
        def error() -> str | None:
            r = fleet.report("edge-1")
            ok = r is not None and r.target_version == version and "disk_full" in r.error
            return r.error if ok and r is not None else None

        return wait_for(error, f"v{version} reported disk_full")  # type: ignore[no-any-return]

    def untouched(serving: Path, version: int) -> None:
        assert fleet.wait_report("edge-1", version, "retrying").serving_version == version - 1
        assert serves(agent, serving)
        # Between two attempts (the agent retries on its own) nothing of them is left.
        wait_for(lambda: leftovers(fleet, "edge-1") == [], "no half-written files")
        assert not (repo / "mlp" / str(version)).exists()

    # 1. Not enough room for the download: refused before a byte moves, with the bytes needed.
    v2 = fleet.mlp(2, width=1024, hidden_layers=3)  # ~8 MiB of new weights
    filler = fill(state, leave=70 << 20)
    fleet.publish(v2, 2)
    error = reported_disk_full(2)
    assert "needs" in error and "bytes" in error, error
    untouched(v1, 2)
    # 2. Room at the check, none mid-download (something else filled the disk).
    filler.unlink()
    partial = state / "sync" / "partial"
    wait_for(lambda: any(p.stat().st_size >= 1 << 20 for p in partial.glob("*.part")), "download")
    filler = fill(state)
    wait_for(lambda: not any(partial.glob("*")), "the partial download dropped")
    reported_disk_full(2)
    untouched(v1, 2)
    filler.unlink()
    wait_for(lambda: serves(agent, v2), "v2 serving once there is room")
    agent.stop()

    # 3. Full while assembling (the release copied from the store and the installed version);
    # 4. while installing into the repository (another filesystem: the files are copied).
    for version, point, full in ((3, "sync.downloaded", state), (4, "sync.assembled", repo)):
        env, flag = pause_file(tmp, point)
        agent = fleet.agent("edge-1", *slow, env=env)
        model = fleet.mlp(version, width=1024, hidden_layers=3)
        fleet.publish(model, version)
        wait_for(lambda f=flag: Path(f"{f}.reached").exists(), f"the agent at {point}")
        filler = fill(full)
        flag.unlink()
        reported_disk_full(version)
        untouched(fleet.mlp(version - 1, width=1024, hidden_layers=3), version)
        filler.unlink()
        wait_for(lambda m=model, a=agent: serves(a, m), f"v{version} serving once there is room")
        agent.stop()
    assert leftovers(fleet, "edge-1") == []


def test_examples_on_a_full_disk_are_refused_whole(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    from edge_agent._proto import examples_pb2 as epb
    from edge_agent._proto import examples_pb2_grpc as epb_grpc

    repo = tmp_path / "repo"
    shutil.copytree(DIGITS, repo / "digits")
    with small_filesystem(tmp_path / "state", 4) as state:
        agent = start_daemon(
            "--model-repository", str(repo), "--state-dir", str(state),
            "--execution-providers", "cpu",
        ).wait_started()  # fmt: skip
        rows = np.random.default_rng(0).random((200, 64), np.float32)

        def submit() -> epb.SubmitExamplesResponse:
            r = epb.SubmitExamplesRequest(model_name="digits", labels=[i % 10 for i in range(200)])
            r.inputs.add(name="input", datatype="FP32", shape=[200, 64])
            r.raw_input_contents.append(rows.tobytes())
            with grpc.insecure_channel(agent.control_url) as channel:
                return epb_grpc.ExampleServiceStub(channel).SubmitExamples(r, timeout=10)

        assert submit().accepted == 200
        store = state / "examples" / "digits"
        kept = sorted(os.listdir(store))
        filler = fill(state, leave=16 << 10)
        with pytest.raises(grpc.RpcError) as refused:
            submit()
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "disk full" in (refused.value.details() or "")
        assert sorted(os.listdir(store)) == kept  # no part of the refused file stays
        filler.unlink()
        assert submit().stored == 400


DEVICE = """
import sys, time, grpc
from edge_agent._proto import fleet_pb2 as pb, fleet_pb2_grpc as pb_grpc
from edge_agent.fleet import auth
from pathlib import Path
address, token, digest = sys.argv[1:]
meta = auth.metadata(auth.read_token(Path(token)), "edge-1")
stub = pb_grpc.FleetServiceStub(grpc.insecure_channel(address))
for chunk in stub.GetBlob(pb.GetBlobRequest(digest=digest), metadata=meta):
    print(len(chunk.data), flush=True)
    time.sleep(60)  # a device that stops reading, then dies
"""


def test_a_device_gone_mid_download_is_logged_as_ordinary(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    import sys

    from edge_agent._proto import fleet_pb2 as pb

    fleet = Fleet(tmp_path, start_daemon)
    token = fleet.add_device("edge-1")
    fleet.publish(fleet.mlp(1, width=2048, hidden_layers=3), 1)  # two 16 MiB weight files
    stub, _ = fleet.stub()
    from edge_agent.fleet import auth

    meta = auth.metadata(auth.read_token(token), "edge-1")
    manifest = stub.GetManifest(pb.GetManifestRequest(model="mlp", version=1), metadata=meta)
    biggest = max(manifest.blobs, key=lambda b: b.size)
    device = subprocess.Popen(
        [sys.executable, "-c", DEVICE, fleet.address, str(token), biggest.digest],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert device.stdout is not None and device.stderr is not None
    first = device.stdout.readline()
    assert first.strip().isdigit(), device.stderr.read()
    device.kill()  # mid-blob: the control plane is still sending
    device.wait()
    (cut,) = wait_for(lambda: fleet.cp.named("blob.transfer_cut"), "the cut transfer logged")
    assert cut["device_id"] == "edge-1" and cut["level"] == "info", cut
    assert 0 < cut["bytes_sent"] < biggest.size, cut
    assert not [e for e in fleet.cp.events if e.get("level") in ("error", "critical")]
