"""Weight sync on loopback: bytes moved for a full install vs a one-layer update, and the time
from publish to serving.

    .venv/bin/python benchmarks/sync.py [--updates N] [--out FILE.json]

For the shipped `digits` model (20 KB) and the wide MLP (784-4096-4096-10, 80 MB): a real control
plane and a real agent (subprocesses, CPU provider, --sync-interval 30: the long-poll answers at
once on a change, so the interval does not add to the times). v1 is published and installed (a
full transfer), then N updates that each change only the last layer. For each: blob bytes the
agent received (edge_agent_sync_bytes_total), seconds from the start of publishing (what
`edge-agent publish` does, in-process: split, sign, upload the missing blobs, register and
target) to the agent serving it, and from the release being registered and targeted to serving.
"Serving" is when the agent's edge_agent_sync_model_version{kind="serving"} shows the version
(polled every 10 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import models  # noqa: E402
from benchmarks.run import free_port, wait_port  # noqa: E402
from edge_agent._proto import fleet_pb2 as pb  # noqa: E402
from edge_agent._proto import fleet_pb2_grpc as pb_grpc  # noqa: E402
from edge_agent.fleet import auth, signing  # noqa: E402
from edge_agent.fleet.cli import upload_release  # noqa: E402
from edge_agent.fleet.connect import open_channel  # noqa: E402
from edge_agent.fleet.release import build_release  # noqa: E402

EA = [sys.executable, "-m", "edge_agent"]


def with_last_layer(source: Path, out: Path, seed: int) -> Path:
    """A copy of `source` whose last weight matrix is new: a one-layer update."""
    model = onnx.load(str(source))
    last = [t for t in model.graph.initializer if len(t.dims) == 2][-1]
    shape = tuple(last.dims)
    new = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) / 10
    last.CopyFrom(numpy_helper.from_array(new, last.name))
    onnx.save(model, str(out))
    return out


def serving_version(metrics_url: str, model: str) -> int:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    for line in text.splitlines():
        if (
            line.startswith("edge_agent_sync_model_version{")
            and f'model="{model}"' in line
            and 'kind="serving"' in line
        ):
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def sync_bytes(metrics_url: str) -> int:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith("edge_agent_sync_bytes_total "):
            return int(float(line.split()[1]))
    return 0


def publish(
    model_file: Path,
    name: str,
    version: int,
    directory: Path,
    key: Path,
    port: int,
    meta: Any,
    target: pb.SetTargetRequest | None = None,
) -> tuple[int, int]:
    """What `edge-agent publish` does, in-process, so that the moment the release is registered
    and targeted is known exactly (`target`: the whole fleet by default). Returns (release bytes,
    bytes uploaded)."""
    release = build_release(model_file, name, version, directory)
    signature = signing.sign_directory(directory, key)
    target = target or pb.SetTargetRequest(model=name, version=version, scope=pb.FLEET)
    with open_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.FleetServiceStub(channel)
        _, uploaded = upload_release(stub, meta, directory, signature, target, True, 300)
    return release.size, uploaded


def run_model(name: str, source: Path, updates: int, work: Path) -> dict[str, Any]:
    data, repo, state = work / "cp", work / "repo", work / "state"
    for d in (repo, state):
        d.mkdir()
    key, pub = work / "k.pem", work / "k.pub"
    signing.generate_keypair(key, pub)
    token = work / "device.token"
    subprocess.run(
        [
            *EA,
            "fleet",
            "add-device",
            "--data-dir",
            str(data),
            "--device-id",
            "bench",
            "--token-file",
            str(token),
        ],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    cp_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "cwd": ROOT, "text": True}
    cp = subprocess.Popen(
        [
            *EA,
            "control-plane",
            "serve",
            "--data-dir",
            str(data),
            "--address",
            f"127.0.0.1:{cp_port}",
            "--log-format",
            "json",
        ],
        **quiet,  # type: ignore[call-overload]
    )
    agent = None
    try:
        wait_port(cp_port, cp)
        agent = subprocess.Popen(
            [
                *EA,
                "serve",
                "--model-repository",
                str(repo),
                "--state-dir",
                str(state),
                "--execution-providers",
                "cpu",
                "--grpc-address",
                f"127.0.0.1:{grpc_port}",
                "--metrics-address",
                f"127.0.0.1:{metrics_port}",
                "--log-format",
                "json",
                "--control-plane",
                f"127.0.0.1:{cp_port}",
                "--device-id",
                "bench",
                "--device-token-file",
                str(token),
                "--trusted-key",
                str(pub),
                "--sync-interval",
                "30",
            ],
            **quiet,  # type: ignore[call-overload]
        )
        wait_port(grpc_port, agent)
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        meta = auth.metadata(auth.read_token(data / "publisher.token"))
        rows = []
        for version in range(1, updates + 2):
            model_file = (
                source
                if version == 1
                else with_last_layer(source, work / f"v{version}.onnx", version)
            )
            before = sync_bytes(metrics_url)
            started = time.perf_counter()
            release_bytes, uploaded = publish(
                model_file, name, version, work / f"release-{version}", key, cp_port, meta
            )
            registered = time.perf_counter()
            while serving_version(metrics_url, name) != version:
                if time.perf_counter() - started > 300:
                    raise RuntimeError(f"{name} v{version} did not serve in 300 s")
                time.sleep(0.01)
            done = time.perf_counter()
            moved = sync_bytes(metrics_url) - before
            rows.append(
                {
                    "version": version,
                    "kind": "full" if version == 1 else "one layer",
                    "release_bytes": release_bytes,
                    "uploaded_bytes": uploaded,
                    "agent_received_bytes": moved,
                    "publish_to_serving_s": round(done - started, 3),
                    "registered_to_serving_s": round(done - registered, 3),
                }
            )
            print(json.dumps({"model": name, **rows[-1]}), flush=True)
        updates_rows = rows[1:]
        return {
            "model": name,
            "release_bytes": rows[0]["release_bytes"],
            "full_received_bytes": rows[0]["agent_received_bytes"],
            "full_publish_to_serving_s": rows[0]["publish_to_serving_s"],
            "full_registered_to_serving_s": rows[0]["registered_to_serving_s"],
            "update_received_bytes_median": statistics.median(
                r["agent_received_bytes"] for r in updates_rows
            ),
            "update_share_of_model": round(
                statistics.median(r["agent_received_bytes"] for r in updates_rows)
                / rows[0]["release_bytes"],
                4,
            ),
            "update_publish_to_serving_s_median": statistics.median(
                r["publish_to_serving_s"] for r in updates_rows
            ),
            "update_registered_to_serving_s_median": statistics.median(
                r["registered_to_serving_s"] for r in updates_rows
            ),
            "rows": rows,
        }
    finally:
        for proc in (agent, cp):
            if proc is not None:
                proc.terminate()
                proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--updates", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "sync_results.json")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        mlp = models.wide_mlp(tmp / "mlp.onnx")
        for name, source in (
            ("digits", ROOT / "models" / "digits" / "1" / "model.onnx"),
            ("wide_mlp", mlp),
        ):
            work = tmp / name
            work.mkdir()
            results.append(run_model(name, source, args.updates, work))
    args.out.write_text(json.dumps({"machine": os.uname().nodename, "results": results}, indent=1))
    for r in results:
        print(
            f"{r['model']}: release {r['release_bytes']} B; full install received "
            f"{r['full_received_bytes']} B in {r['full_publish_to_serving_s']} s "
            f"(registered->serving {r['full_registered_to_serving_s']} s); one-layer update "
            f"received {r['update_received_bytes_median']} B = "
            f"{r['update_share_of_model']:.2%} of the model, publish->serving "
            f"{r['update_publish_to_serving_s_median']} s "
            f"(registered->serving {r['update_registered_to_serving_s_median']} s), medians"
        )


if __name__ == "__main__":
    main()
