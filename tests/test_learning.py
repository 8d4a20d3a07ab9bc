"""Learning on the fleet end to end (issue 14): a real control plane with a learning key, real
agents with --learn, examples over SubmitExamples (the CLI), a task started from the CLI,
updates, aggregation, the gate, a signed learned release rolled out and served everywhere."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import ROOT, Daemon, wait_for
from edge_agent._proto import fleet_pb2 as pb
from edge_agent._proto import fleet_pb2_grpc as pb_grpc
from edge_agent.fleet import auth, signing
from edge_agent.learn import delta
from test_sync import Fleet

pytest.importorskip("torch", reason="the learn extra (PyTorch) is part of the test install")

DIGITS = ROOT / "models" / "digits"


def split() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The shipped held-out digits, split: examples for three devices, the task's validation
    set (the gate), and a held-out test set nobody trains or gates on."""
    data = np.load(DIGITS / "validation.npz")
    x, y = data["input"].astype(np.float32), data["labels"].astype(np.int64)
    return {
        "edge-0": (x[0:80], y[0:80]),
        "edge-1": (x[80:160], y[80:160]),
        "edge-2": (x[160:240], y[160:240]),
        "validation": (x[240:300], y[240:300]),
        "test": (x[300:360], y[300:360]),
    }


def weak_base(path: Path) -> Path:
    """The shipped digits model with its last layer replaced by small random weights: a weak
    base (~10% accuracy) whose hidden layer is good, so training the head recovers it."""
    model = onnx.load(str(DIGITS / "1" / "model.onnx"))
    rng = np.random.default_rng(3)
    for init in model.graph.initializer:
        if init.name in ("w2", "b2"):
            shape = numpy_helper.to_array(init).shape
            value = (rng.standard_normal(shape) * 0.01).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(value, init.name))
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    (path.parent.parent / "config.pbtxt").write_text((DIGITS / "config.pbtxt").read_text())
    return path


def accuracy_of(agent: Daemon, x: np.ndarray, y: np.ndarray) -> float:
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(agent.url) as client:
        tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        labels = client.infer("digits", [tensor], client_timeout=20).as_numpy("label")
    return float(np.mean(labels == y))


class LearningFleet(Fleet):
    def __init__(self, tmp: Path, start: Callable[..., Daemon], *cp_args: str) -> None:
        self.learning_key, self.learning_pub = tmp / "learning.pem", tmp / "learning.pub"
        signing.generate_keypair(self.learning_key, self.learning_pub)
        super().__init__(tmp, start, "--learning-key", str(self.learning_key), *cp_args)

    def learner(self, device: str, *extra: str) -> Daemon:
        return self.agent(device, "--learn", "--trusted-key", str(self.learning_pub), *extra)

    def npz(self, name: str, x: np.ndarray, y: np.ndarray) -> Path:
        path = self.tmp / f"{name}.npz"
        np.savez(path, input=x, labels=y)
        return path

    def learn(self, *args: str, check: bool = True) -> Any:
        return self.cli(
            "learn", *args, "--control-plane", self.address, "--token-file", str(self.token_file),
            check=check,
        )  # fmt: skip

    def task(self, task_id: int) -> pb.LearningTask:
        stub, meta = self.stub()
        status = stub.LearningStatus(pb.LearningStatusRequest(task_id=task_id), metadata=meta)
        return status.tasks[0]


@pytest.fixture
def fleet(tmp_path: Path, start_daemon: Callable[..., Daemon]) -> LearningFleet:
    return LearningFleet(tmp_path, start_daemon)


def test_the_fleet_learns_and_ships_a_signed_gated_release(fleet: LearningFleet) -> None:
    parts = split()
    base = weak_base(fleet.tmp / "base" / "digits" / "1" / "model.onnx")
    devices = ["edge-0", "edge-1", "edge-2"]
    for d in devices:
        fleet.add_device(d)
    fleet.cli(
        "publish", str(base), "--model", "digits", "--version", "1", "--control-plane",
        fleet.address, "--signing-key", str(fleet.key), "--token-file", str(fleet.token_file),
    )  # fmt: skip
    agents = {d: fleet.learner(d) for d in devices}
    test_x, test_y = parts["test"]
    wait_for(lambda: all(_serves_digits(a) for a in agents.values()), "v1 serving everywhere")
    before = accuracy_of(agents["edge-0"], test_x, test_y)
    assert before < 0.5  # a deliberately weak base
    for d in devices:
        x, y = parts[d]
        out = fleet.cli(
            "examples", "import", "--url", agents[d].control_url, "--model", "digits",
            "--data", str(fleet.npz(d, x, y)),
        ).stdout  # fmt: skip
        assert "80 examples accepted" in out
    validation = fleet.npz("validation", *parts["validation"])
    started = fleet.learn(
        "start", "--model", "digits", "--validation", str(validation), "--buffer", "3",
        "--trainable", "last:1", "--epochs", "20", "--lr", "0.01", "--max-accuracy-drop", "0.05",
        "--min-examples", "40", "--int8-threshold", "16",
    )  # fmt: skip
    task_id = int(started.stdout.strip())

    def released() -> int:
        versions = fleet.task(task_id).versions
        return max((v.released_version for v in versions if v.version > 0), default=0)

    try:
        version = wait_for(released, "a learned release", timeout=60)
    except AssertionError:
        for name, a in [("cp", fleet.cp), *agents.items()]:
            print(name, [e for e in a.events if "learn" in e.get("event", "") or "error" in str(e)][-6:], a.stderr[-5:])
        raise
    assert version == 2
    for d in devices:  # rolled out through the ordinary rollout path, to every device
        wait_for(lambda d=d: _serving_version(fleet, d) == version, f"{d} serving v{version}")  # type: ignore[misc]
    task = fleet.task(task_id)
    assert task.updates_received >= 3 and task.updates_applied >= 3
    accepted = [v for v in task.versions if v.version and v.accepted]
    assert accepted and accepted[0].accuracy >= task.base_accuracy - 0.05
    after = accuracy_of(agents["edge-0"], test_x, test_y)
    assert after > before + 0.3, (before, after)  # on examples nobody trained or gated on
    # The learned release is signed by the learning key: devices trust it explicitly.
    registry_json = fleet.cli(
        "fleet", "status", "--json", "--control-plane", fleet.address, "--token-file",
        str(fleet.token_file),
    ).stdout  # fmt: skip
    assert json.loads(registry_json)["devices"]
    assert any(e["event"] == "learn.update_sent" for e in agents["edge-1"].events)
    # Uplink: int8 deltas above the threshold, about a quarter of their fp32 bytes.
    assert task.bytes_up <= 0.35 * task.fp32_bytes_up, (task.bytes_up, task.fp32_bytes_up)
    status = fleet.learn("status", "--task", str(task_id)).stdout
    assert f"task {task_id}: digits" in status and "ACCURACY" in status


def _serves_digits(agent: Daemon) -> bool:
    import tritonclient.grpc as grpcclient

    try:
        with grpcclient.InferenceServerClient(agent.url) as client:
            return bool(client.is_model_ready("digits"))
    except Exception:
        return False


def _serving_version(fleet: Fleet, device: str) -> int:
    for d in fleet.status().devices:
        if d.device_id == device:
            for r in d.models:
                if r.model == "digits":
                    return int(r.serving_version)
    return 0
