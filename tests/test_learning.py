"""Learning on the fleet end to end: a real control plane with a learning key, real
agents with --learn, examples over SubmitExamples (the CLI), a task started from the CLI,
updates, aggregation, the gate, a signed learned release rolled out and served everywhere."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from test_sync import Fleet

from conftest import ROOT, Daemon, wait_for
from edge_agent._proto import fleet_pb2 as pb
from edge_agent._proto import fleet_pb2_grpc as pb_grpc
from edge_agent.fleet import auth, signing
from edge_agent.learn import delta

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
    def __init__(
        self,
        tmp: Path,
        start: Callable[..., Daemon],
        *cp_args: str,
        scale: tuple[str, str, dict[str, str]] | None = None,
    ) -> None:
        self.learning_key, self.learning_pub = tmp / "learning.pem", tmp / "learning.pub"
        signing.generate_keypair(self.learning_key, self.learning_pub)
        super().__init__(
            tmp, start, "--learning-key", str(self.learning_key), *cp_args, scale=scale
        )

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


@pytest.fixture(params=["embedded", "scale"])
def both_backends(
    request: pytest.FixtureRequest, tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> LearningFleet:
    """The parameter server's state on SQLite and on PostgreSQL + S3 (tests/services.py)."""
    if request.param == "scale":
        pg, s3 = request.getfixturevalue("scale_services")
        scale = (pg.new_database(), s3.new_url(), s3.env())
        return LearningFleet(tmp_path, start_daemon, scale=scale)
    return LearningFleet(tmp_path, start_daemon)


def _start_fleet(fleet: LearningFleet, devices: list[str], rows: int = 80) -> dict[str, Daemon]:
    """The weak base published, learners running it, each holding `rows` examples."""
    parts = split()
    base = weak_base(fleet.tmp / "base" / "digits" / "1" / "model.onnx")
    for d in devices:
        fleet.add_device(d)
    fleet.cli(
        "publish", str(base), "--model", "digits", "--version", "1", "--control-plane",
        fleet.address, "--signing-key", str(fleet.key), "--token-file", str(fleet.token_file),
    )  # fmt: skip
    agents = {d: fleet.learner(d) for d in devices}
    wait_for(lambda: all(_serves_digits(a) for a in agents.values()), "v1 serving everywhere")
    for i, d in enumerate(devices):
        x, y = parts[f"edge-{i % 3}"]
        out = fleet.cli(
            "examples", "import", "--url", agents[d].control_url, "--model", "digits",
            "--data", str(fleet.npz(d, x[:rows], y[:rows])),
        ).stdout  # fmt: skip
        assert f"{rows} examples accepted" in out
    return agents


def test_the_fleet_learns_and_ships_a_signed_gated_release(fleet: LearningFleet) -> None:
    parts = split()
    devices = ["edge-0", "edge-1", "edge-2"]
    agents = _start_fleet(fleet, devices)
    test_x, test_y = parts["test"]
    before = accuracy_of(agents["edge-0"], test_x, test_y)
    assert before < 0.5  # a deliberately weak base
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
            print(
                name,
                [e for e in a.events if "learn" in e.get("event", "") or "error" in str(e)][-6:],
                a.stderr[-5:],
            )
        raise
    assert version == 2
    for d in devices:  # rolled out through the ordinary rollout path, to every device
        # (devices keep training: a later learned version may have shipped meanwhile)
        wait_for(lambda d=d: _serving_version(fleet, d) >= version, f"{d} serving v{version}")  # type: ignore[misc]
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


def digits_split(tmp: Path) -> tuple[Path, Path]:
    """scikit-learn's digits, split as scripts/make_digits_model.py does: the shipped model was
    trained on `train.npz`; `validation.npz` is the shipped held-out set."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x, y = digits.data.astype(np.float32), digits.target.astype(np.int64)
    x_train, x_val, y_train, _ = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    assert np.allclose(x_val, np.load(DIGITS / "validation.npz")["input"])
    np.savez(tmp / "train.npz", input=x_train, labels=y_train)
    return tmp / "train.npz", DIGITS / "validation.npz"


def small_student(path: Path, hidden: int = 15) -> Path:
    """An untrained MLP 64 -> hidden -> 10 with the shipped model's inputs and outputs."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    weights = {
        "w1": (rng.standard_normal((64, hidden)) * 0.1).astype(np.float32),
        "b1": np.zeros(hidden, np.float32),
        "w2": (rng.standard_normal((hidden, 10)) * 0.1).astype(np.float32),
        "b2": np.zeros(10, np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["l"]),
        helper.make_node("Add", ["l", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        helper.make_node("ArgMax", ["logits"], ["label"], axis=-1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "student",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10]),
            helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
        ],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def ort_top1(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"input": x})[0].argmax(axis=1)  # type: ignore[no-any-return]


def compressed(path: Path) -> dict[str, int]:
    import gzip

    import zstandard

    data = path.read_bytes()
    return {
        "gzip": len(gzip.compress(data, 9)),
        "zstd": len(zstandard.ZstdCompressor(level=19).compress(data)),
    }


def nonzero_params(path: Path) -> tuple[int, int]:
    model = onnx.load(str(path))
    values = [numpy_helper.to_array(t) for t in model.graph.initializer]
    return sum(v.size for v in values), sum(int(np.count_nonzero(v)) for v in values)


def test_distill_and_fine_tune_through_the_cli(tmp_path: Path) -> None:
    import subprocess
    import sys

    train_npz, validation_npz = digits_split(tmp_path)
    val = np.load(validation_npz)
    x, y = val["input"].astype(np.float32), val["labels"]
    teacher = DIGITS / "1" / "model.onnx"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "edge_agent", *args], cwd=ROOT, capture_output=True,
            text=True, timeout=600,
        )  # fmt: skip

    # Distillation: a student 4x smaller than the teacher, trained on its soft outputs.
    student = small_student(tmp_path / "student.onnx")
    out = tmp_path / "distilled.onnx"
    done = cli(
        "distill", "--teacher", str(teacher), "--student", str(student), "--data",
        str(train_npz), "--validation", str(validation_npz), "--out", str(out),
        "--report", str(tmp_path / "d.json"), "--max-accuracy-drop", "0.05",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "d.json").read_text())
    teacher_top, out_top = ort_top1(teacher, x), ort_top1(out, x)
    assert report["size_bytes"] == {"before": teacher.stat().st_size, "after": out.stat().st_size}
    assert report["parameters"]["before"]["total"] == nonzero_params(teacher)[0]
    total, _ = nonzero_params(out)
    assert report["parameters"]["after"]["total"] == total
    assert report["parameters"]["before"]["total"] >= 4 * total  # >= 4x smaller
    v = report["validation"]
    assert v["accuracy_before"] == pytest.approx(float(np.mean(teacher_top == y)))
    assert v["accuracy_after"] == pytest.approx(float(np.mean(out_top == y)))
    assert v["top1_agreement"] == pytest.approx(float(np.mean(teacher_top == out_top)))
    assert v["student_accuracy_before"] == pytest.approx(float(np.mean(ort_top1(student, x) == y)))
    assert v["accuracy_after"] > v["student_accuracy_before"] + 0.5  # it learned
    assert report["compressed_size_bytes"]["after"] == compressed(out)
    assert report["compressed_size_bytes"]["before"] == compressed(teacher)
    assert report["compression_rate"] == pytest.approx(
        1 - out.stat().st_size / teacher.stat().st_size
    )
    # The guard: a bound it cannot meet leaves no OUT and exits 1.
    refused = cli(
        "distill", "--teacher", str(teacher), "--student", str(student), "--data",
        str(train_npz), "--out", str(tmp_path / "no.onnx"), "--epochs", "1",
        "--max-accuracy-drop", "0.0001", "--validation", str(validation_npz),
    )  # fmt: skip
    assert refused.returncode == 1 and not (tmp_path / "no.onnx").exists()

    # Pruning 50%, then fine-tuning with the mask held fixed: the zeros stay, accuracy returns.
    pruned_only, tuned = tmp_path / "pruned.onnx", tmp_path / "tuned.onnx"
    assert cli(
        "optimize", str(teacher), "--mode", "prune", "--out", str(pruned_only),
    ).returncode == 0  # fmt: skip
    done = cli(
        "optimize", str(teacher), "--mode", "prune", "--fine-tune", str(train_npz),
        "--validation", str(validation_npz), "--out", str(tuned), "--report",
        str(tmp_path / "p.json"), "--max-accuracy-drop", "0.02",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["fine_tuned"] is True
    matrices = [
        numpy_helper.to_array(t)
        for t in onnx.load(str(tuned)).graph.initializer
        if len(t.dims) == 2
    ]
    pruned_matrices = [
        numpy_helper.to_array(t)
        for t in onnx.load(str(pruned_only)).graph.initializer
        if len(t.dims) == 2
    ]
    for m, p in zip(matrices, pruned_matrices, strict=True):
        assert np.all(m[p == 0] == 0)  # the pruning mask held
    assert report["parameters"]["after"]["nonzero"] == nonzero_params(tuned)[1]
    assert report["parameters"]["after"]["total"] == nonzero_params(tuned)[0]
    assert report["size_bytes"]["after"] == tuned.stat().st_size
    assert report["compressed_size_bytes"]["after"] == compressed(tuned)
    tuned_accuracy = float(np.mean(ort_top1(tuned, x) == y))
    pruned_accuracy = float(np.mean(ort_top1(pruned_only, x) == y))
    assert report["validation"]["accuracy_after"] == pytest.approx(tuned_accuracy)
    assert tuned_accuracy > pruned_accuracy + 0.1  # pruning alone: ~0.75


def test_the_agent_without_the_extra_refuses_learning(tmp_path: Path) -> None:
    import subprocess
    import sys

    shadow = tmp_path / "shadow" / "torch"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('no torch in this test')\n")
    token = tmp_path / "token"
    token.write_text("t\n")
    key = tmp_path / "k.pub"
    key.write_text("x")
    (tmp_path / "state").mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "edge_agent", "serve", "--learn", "--control-plane",
         "127.0.0.1:1", "--device-id", "d", "--device-token-file", str(token),
         "--trusted-key", str(key), "--state-dir", str(tmp_path / "state"),
         "--grpc-address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0",
         "--control-address", "127.0.0.1:0", "--model-repository", str(ROOT / "models")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**__import__("os").environ, "PYTHONPATH": str(tmp_path / "shadow")},
    )  # fmt: skip
    assert done.returncode == 78
    assert "pip install 'edge-agent[learn]'" in done.stderr


class FakeDevice:
    """A device speaking the real protocol without an agent: it polls for its assignment,
    fetches the global weights, and uploads updates it makes up (honest, poisoned, malformed)."""

    def __init__(self, fleet: LearningFleet, device: str) -> None:
        self.meta = auth.metadata(auth.read_token(fleet.tmp / f"{device}.token"), device)
        self.stub = pb_grpc.FleetServiceStub(grpc.insecure_channel(fleet.address))

    def assignment(self) -> pb.LearningAssignment:
        state = self.stub.WatchDesiredState(pb.WatchRequest(wait_ms=0), metadata=self.meta)
        (task,) = state.learning
        return task

    def global_weights(self) -> dict[str, np.ndarray]:
        ref = self.assignment().global_weights
        data = b"".join(
            c.data
            for c in self.stub.GetBlob(pb.GetBlobRequest(digest=ref.digest), metadata=self.meta)
        )
        return delta.decode(data)

    def upload(
        self, payload: bytes, update_id: str | None = None, base: int | None = None, task: int = 0
    ) -> pb.UpdateAck:
        assignment = self.assignment()
        header = pb.UpdateChunk(
            task_id=task or assignment.task_id,
            update_id=update_id or uuid.uuid4().hex,
            base_global_version=assignment.global_version if base is None else base,
            examples=50,
            size=len(payload),
            sha256=hashlib.sha256(payload).hexdigest(),
            data=payload,
        )
        return self.stub.UploadUpdate(iter([header]), metadata=self.meta, timeout=30)


def test_updates_replayed_poisoned_malformed_and_a_restart(fleet: LearningFleet) -> None:
    parts = split()
    base = weak_base(fleet.tmp / "base" / "digits" / "1" / "model.onnx")
    devices = [f"d{i}" for i in range(4)]
    for d in devices:
        fleet.add_device(d)
    fleet.cli(
        "publish", str(base), "--model", "digits", "--version", "1", "--control-plane",
        fleet.address, "--signing-key", str(fleet.key), "--token-file", str(fleet.token_file),
    )  # fmt: skip
    validation = fleet.npz("validation", *parts["validation"])
    task_id = int(
        fleet.learn(
            "start", "--model", "digits", "--validation", str(validation), "--buffer", "4",
            "--trainable", "last:1", "--clip-norm", "5", "--trim", "0.25",
            "--max-accuracy-drop", "0.0",
        ).stdout
    )  # fmt: skip
    fake = {d: FakeDevice(fleet, d) for d in devices}
    current = fake["d0"].global_weights()
    assert sorted(current) == ["b2", "w2"]
    shipped = onnx.load(str(DIGITS / "1" / "model.onnx"))
    good = {t.name: numpy_helper.to_array(t) for t in shipped.graph.initializer}
    honest = {n: 0.5 * (good[n] - current[n]) for n in current}  # halfway to a good head

    def refused(payload: bytes, **kwargs: Any) -> str:
        with pytest.raises(grpc.RpcError) as bad:
            fake["d1"].upload(payload, **kwargs)
        return f"{bad.value.code().name}: {bad.value.details()}"

    # Malformed updates: refused with the reason, counted, never aggregated.
    assert "not the task's trainable" in refused(delta.encode({"w1": honest["w2"]}))
    assert "shape" in refused(delta.encode({"w2": honest["w2"][:5], "b2": honest["b2"]}))
    nan = {**honest, "b2": np.full(10, np.nan, np.float32)}
    assert "NaN" in refused(delta.encode(nan))
    absurd = {n: v * 1e9 for n, v in honest.items()}
    assert "absurd" in refused(delta.encode(absurd))
    assert "not a tensor set" in refused(b"\x10\x00\x00\x00garbage")
    assert "does not exist yet" in refused(delta.encode(honest), base=99)
    assert refused(delta.encode(honest), task=999).startswith("NOT_FOUND")
    stranger = fleet.add_device("stranger")  # enrolled after the task: not a participant
    outsider = auth.metadata(auth.read_token(stranger), "stranger")
    valid = delta.encode(honest)
    header = pb.UpdateChunk(
        task_id=task_id, update_id="x", examples=1, size=len(valid),
        sha256=hashlib.sha256(valid).hexdigest(), data=valid,
    )  # fmt: skip
    with pytest.raises(grpc.RpcError) as not_part:
        fake["d0"].stub.UploadUpdate(iter([header]), metadata=outsider, timeout=10)
    assert not_part.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert fleet.task(task_id).refused == 7

    # Two honest updates, one of them replayed: applied once.
    payload = delta.encode(honest, int8_threshold=16)
    assert fake["d0"].upload(payload, update_id="u-0").state == "buffered"
    assert fake["d0"].upload(payload, update_id="u-0").state == "duplicate"
    assert fake["d1"].upload(payload, update_id="u-1").state == "buffered"
    assert fleet.task(task_id).buffered == 2
    # The control plane restarts with two accepted updates in its buffer: none is lost.
    fleet.restart_control_plane(kill=True)
    fake = {d: FakeDevice(fleet, d) for d in devices}
    assert fleet.task(task_id).buffered == 2
    assert fake["d0"].upload(payload, update_id="u-0").state == "duplicate"  # still known
    # A poisoned device: its update scaled x100 and sign-flipped; clipped and trimmed away.
    poison = {n: -100 * v for n, v in honest.items()}
    fake["d2"].upload(delta.encode(poison), update_id="u-2")
    fake["d3"].upload(payload, update_id="u-3")

    def aggregated() -> pb.LearningTask | None:
        task = fleet.task(task_id)
        return task if len(task.versions) > 1 else None

    task = wait_for(aggregated, "the first aggregation")
    assert task.updates_applied == 4 and task.duplicates == 2 and task.clipped >= 1
    candidate = task.versions[1]
    assert candidate.updates == 4
    assert candidate.accuracy >= task.base_accuracy  # the poison did not pull it below the gate
    assert candidate.accepted and candidate.accuracy > task.base_accuracy + 0.2
    assert wait_for(lambda: fleet.task(task_id).versions[1].released_version, "its release") == 2
    assert fleet.task(task_id).global_version == 1


def test_examples_are_checked_and_kept_within_bounds(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    from edge_agent._proto import examples_pb2 as epb
    from edge_agent._proto import examples_pb2_grpc as epb_grpc

    repo = tmp_path / "repo"
    import shutil

    shutil.copytree(DIGITS, repo / "digits")
    state = tmp_path / "state"
    state.mkdir()
    agent = start_daemon(
        "--model-repository", str(repo), "--state-dir", str(state),
        "--execution-providers", "cpu", env={"EDGE_AGENT_EXAMPLES_MAX_BYTES": "12000"},
    ).wait_started()  # fmt: skip
    x, y = split()["edge-0"]

    def request(rows: np.ndarray, labels: Any, **tensor: Any) -> epb.SubmitExamplesRequest:
        r = epb.SubmitExamplesRequest(model_name="digits", labels=list(labels))
        fields = {"name": "input", "datatype": "FP32", "shape": list(rows.shape), **tensor}
        r.inputs.add(**fields)
        r.raw_input_contents.append(rows.astype(np.float32).tobytes())
        return r

    def submit(address: str, r: epb.SubmitExamplesRequest) -> Any:
        with grpc.insecure_channel(address) as channel:
            return epb_grpc.ExampleServiceStub(channel).SubmitExamples(r, timeout=10)

    def refused(r: epb.SubmitExamplesRequest, address: str | None = None) -> str:
        with pytest.raises(grpc.RpcError) as bad:
            submit(address or agent.control_url, r)
        return f"{bad.value.code().name}: {bad.value.details()}"

    assert submit(agent.control_url, request(x[:10], y[:10])).accepted == 10
    store = state / "examples" / "digits"
    kept = sorted(p.name for p in store.iterdir())
    bad = {
        "names": refused(request(x[:4], y[:4], name="pixels")),
        "shape": refused(request(x[:4, :32], y[:4], shape=[4, 32])),
        "dtype": refused(request(x[:4], y[:4], datatype="FP64")),
        "nan": refused(request(np.full((2, 64), np.nan), [1, 2])),
        "label range": refused(request(x[:2], [3, 10])),
        "label count": refused(request(x[:3], y[:2])),
    }
    assert "unknown input 'pixels'" in bad["names"]
    assert "shape" in bad["shape"] and "FP64" in bad["dtype"] and "NaN" in bad["nan"]
    assert "0..9" in bad["label range"] and "one label per row" in bad["label count"]
    assert all(v.startswith("INVALID_ARGUMENT") for v in bad.values()), bad
    assert sorted(p.name for p in store.iterdir()) == kept  # nothing of them stored
    # The inference listener takes examples only for models that say so.
    denied = refused(request(x[:2], y[:2]), agent.url)
    assert denied.startswith("PERMISSION_DENIED") and "accept_examples" in denied
    # The store keeps at most examples_max_bytes: the oldest submissions go first.
    dropped = 0
    for start in range(0, 80, 10):
        dropped += submit(
            agent.control_url, request(x[start : start + 10], y[start : start + 10])
        ).dropped
    assert dropped > 0
    assert sum(p.stat().st_size for p in store.iterdir()) <= 12000
    text = (
        __import__("urllib.request").request.urlopen(agent.metrics_url, timeout=10).read().decode()
    )
    assert 'edge_agent_examples_refused_total{model="digits"} 6.0' in text
    assert 'edge_agent_examples_dropped_total{model="digits"}' in text


def _learned(fleet: LearningFleet, task_id: int) -> list[int]:
    """The model versions the task has released (its base left out)."""
    return [
        v.released_version for v in fleet.task(task_id).versions if v.version and v.released_version
    ]


def _metric(agent: Daemon, name: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(agent.metrics_url, timeout=10).read().decode()
    found = [line for line in text.splitlines() if line.startswith(name + " ")]
    return float(found[0].split()[-1]) if found else 0.0


def test_three_devices_with_every_default_keep_learning(fleet: LearningFleet) -> None:
    """`learn start` with nothing but the model and the gate's data: the buffer (4) is clamped
    to the 3 devices, saying so; devices keep training as globals arrive, and the task ships
    more than one learned, gated, signed version."""
    devices = ["edge-0", "edge-1", "edge-2"]
    agents = _start_fleet(fleet, devices)
    validation = fleet.npz("validation", *split()["validation"])
    started = fleet.learn("start", "--model", "digits", "--validation", str(validation))
    assert "buffer 4 clamped to 3: only 3 device(s) take part" in started.stderr
    task_id = int(started.stdout.strip())
    task = fleet.task(task_id)
    assert task.spec.buffer == 3 and task.spec.server_optimizer == "momentum"
    try:
        learned = wait_for(
            lambda: len(_learned(fleet, task_id)) >= 2 and _learned(fleet, task_id),
            "two learned versions",
            timeout=240,
        )
    except AssertionError:
        print(fleet.learn("status", "--task", str(task_id)).stdout)
        for name, a in [("cp", fleet.cp), *agents.items()]:
            print(name, [e for e in a.events if "learn" in e.get("event", "")][-8:], a.stderr[-5:])
        raise
    assert learned[:2] == [2, 3]
    task = fleet.task(task_id)
    best = max(v.accuracy for v in task.versions if v.accepted)
    assert task.best_accuracy == best > task.base_accuracy
    status = fleet.learn("status", "--task", str(task_id)).stdout
    assert "device(s) active in the last 10 minutes" in status
    # One worker process per device for every run of the task (PyTorch imported once).
    agent = agents["edge-0"]
    runs = [e for e in agent.events if e["event"] == "learn.update_sent"]
    assert len(runs) >= 2
    assert _metric(agent, "edge_agent_learning_worker_starts_total") == 1.0


def test_defaults_with_one_of_three_devices_never_online(fleet: LearningFleet) -> None:
    """The smallest real fleet with one device away from the start, every default: the two
    that run fill the buffer of three by training again (min-interval), and ship a version."""
    agents = _start_fleet(fleet, ["edge-0", "edge-1"])
    fleet.add_device("edge-2")  # enrolled, never started
    validation = fleet.npz("validation", *split()["validation"])
    started = fleet.learn("start", "--model", "digits", "--validation", str(validation))
    assert "clamped to 3" in started.stderr
    task_id = int(started.stdout.strip())
    waiting = fleet.task(task_id).progress
    assert waiting.startswith("waiting for") or waiting.startswith("aggregating"), waiting
    learned = wait_for(lambda: _learned(fleet, task_id), "a learned version", timeout=240)
    assert learned[0] == 2
    contributors = {e["device"] for e in fleet.cp.named("learn.update_received")}
    assert contributors == {"edge-0", "edge-1"}
    assert all(a.named("learn.update_sent") for a in agents.values())


def test_a_device_going_offline_mid_run_neither_stalls_the_task_nor_fails(
    fleet: LearningFleet,
) -> None:
    """A device stopped while it trains: its run ends as cancelled (not failed); the other two
    keep the task going, and max-wait aggregates what they sent without the third."""
    devices = ["edge-0", "edge-1", "edge-2"]
    agents = _start_fleet(fleet, devices)
    validation = fleet.npz("validation", *split()["validation"])
    task_id = int(
        fleet.learn(
            "start", "--model", "digits", "--validation", str(validation), "--buffer", "3",
            "--min-interval", "3600", "--max-wait", "4", "--min-updates", "2",
            "--trainable", "last:1", "--epochs", "3000", "--lr", "0.001",
            "--max-accuracy-drop", "1",
        ).stdout
    )  # fmt: skip

    def running(agent: Daemon, version: int) -> bool:
        return any(
            e["event"] == "learn.run_started" and e["global_version"] == version
            for e in agent.events
        )

    wait_for(lambda: fleet.task(task_id).global_version >= 1, "the first aggregation", 240)
    leaving = agents["edge-2"]
    wait_for(lambda: running(leaving, 1), "edge-2 training from global 1")
    assert leaving.stop() == 0
    assert leaving.named("learn.run_cancelled") and not leaving.named("learn.run_failed")
    wait_for(lambda: fleet.task(task_id).global_version >= 2, "an aggregation without edge-2", 240)
    second = fleet.task(task_id).versions[2]
    assert second.updates == 2  # max-wait took the two that came
    assert fleet.task(task_id).state == "running"


def _desired_task(device: FakeDevice, task_id: int) -> pb.LearningAssignment:
    state = device.stub.WatchDesiredState(pb.WatchRequest(wait_ms=0), metadata=device.meta)
    return next(t for t in state.learning if t.task_id == task_id)


def _upload(
    device: FakeDevice, task_id: int, deltas: dict[str, np.ndarray], **header_fields: Any
) -> str:
    assignment = _desired_task(device, task_id)
    payload = delta.encode(deltas)
    header = pb.UpdateChunk(
        task_id=task_id, update_id=uuid.uuid4().hex,
        base_global_version=assignment.global_version, examples=50, size=len(payload),
        sha256=hashlib.sha256(payload).hexdigest(), data=payload, **header_fields,
    )  # fmt: skip
    return device.stub.UploadUpdate(iter([header]), metadata=device.meta, timeout=30).state


def _global(device: FakeDevice, task_id: int) -> tuple[int, dict[str, np.ndarray]]:
    ref = _desired_task(device, task_id)
    data = b"".join(
        c.data
        for c in device.stub.GetBlob(
            pb.GetBlobRequest(digest=ref.global_weights.digest), metadata=device.meta
        )
    )
    return ref.global_version, delta.decode(data)


def _published_fakes(fleet: LearningFleet, count: int) -> dict[str, FakeDevice]:
    base = weak_base(fleet.tmp / "base" / "digits" / "1" / "model.onnx")
    for i in range(count):
        fleet.add_device(f"d{i}")
    fleet.cli(
        "publish", str(base), "--model", "digits", "--version", "1", "--control-plane",
        fleet.address, "--signing-key", str(fleet.key), "--token-file", str(fleet.token_file),
    )  # fmt: skip
    return {f"d{i}": FakeDevice(fleet, f"d{i}") for i in range(count)}


def test_server_optimizer_state_survives_a_control_plane_restart(
    both_backends: LearningFleet,
) -> None:
    """One task per server optimizer; two aggregations, a kill -9 between them. The second
    global must equal what an uninterrupted optimizer makes of the same updates, computed here
    from the formulas (momentum and adaptive moments carried across the restart)."""
    fleet = both_backends
    fake = _published_fakes(fleet, 2)
    validation = fleet.npz("validation", *split()["validation"])
    settings = {
        "sgd": ["--server-lr", "0.5"],
        "momentum": ["--server-lr", "0.5", "--server-momentum", "0.8"],
        "adagrad": ["--server-lr", "0.1", "--server-tau", "0.01"],
        "adam": ["--server-lr", "0.1", "--server-beta1", "0.7", "--server-beta2", "0.9"],
        "yogi": ["--server-lr", "0.1", "--server-beta1", "0.7", "--server-beta2", "0.9"],
    }
    tasks = {
        name: int(
            fleet.learn(
                "start", "--model", "digits", "--validation", str(validation), "--buffer", "2",
                "--trainable", "last:1", "--server-optimizer", name, "--max-accuracy-drop", "1",
                *args,
            ).stdout
        )
        for name, args in settings.items()
    }  # fmt: skip
    rng = np.random.default_rng(11)
    _, start = _global(fake["d0"], tasks["sgd"])
    rounds = {
        name: [
            [{n: rng.standard_normal(v.shape).astype(np.float32) * 0.01 for n, v in start.items()}
             for _ in range(2)]
            for _ in range(2)
        ]
        for name in tasks
    }  # fmt: skip
    # sgd: half way to the shipped model's head, then all the way back to the weak base: the
    # second candidate is accepted (max drop 1) but worse than the first, so not released.
    shipped = onnx.load(str(DIGITS / "1" / "model.onnx"))
    good = {t.name: numpy_helper.to_array(t) for t in shipped.graph.initializer}
    towards = {n: good[n] - start[n] for n in start}
    rounds["sgd"] = [[towards, towards], [{n: -v for n, v in towards.items()}] * 2]

    def aggregate(index: int) -> None:
        for name, task_id in tasks.items():
            for device, deltas in zip(fake.values(), rounds[name][index], strict=True):
                assert _upload(device, task_id, deltas) == "buffered"

    aggregate(0)
    for task_id in tasks.values():
        wait_for(lambda t=task_id: _global(fake["d0"], t)[0] == 1, "the first aggregation")  # type: ignore[misc]
    fleet.restart_control_plane(kill=True)
    fake = {d: FakeDevice(fleet, d) for d in fake}
    aggregate(1)
    for name, task_id in tasks.items():
        _, got = wait_for(
            lambda t=task_id: (g := _global(fake["d0"], t))[0] == 2 and g,  # type: ignore[misc]
            f"{name}'s second aggregation",
        )
        spec = fleet.task(task_id).spec
        lr, m_beta = spec.server_lr, spec.server_momentum
        b1, b2, tau = spec.server_beta1, spec.server_beta2, spec.server_tau
        for tensor, value in start.items():
            w = value.astype(np.float64)
            m = np.zeros_like(w)
            v = np.zeros_like(w)
            for round_ in rounds[name]:
                d = np.mean([u[tensor] for u in round_], axis=0, dtype=np.float64)  # equal weights
                if name == "sgd":
                    w = w + lr * d
                elif name == "momentum":
                    m = m_beta * m + d
                    w = w + lr * m
                elif name == "adagrad":
                    v = v + d * d
                    w = w + lr * d / (np.sqrt(v) + tau)
                else:
                    m = b1 * m + (1 - b1) * d
                    if name == "adam":
                        v = b2 * v + (1 - b2) * d * d
                    else:
                        v = v - (1 - b2) * d * d * np.sign(v - d * d)
                    w = w + lr * m / (np.sqrt(v) + tau)
            assert np.allclose(got[tensor], w, atol=2e-5), (name, tensor)
    versions = fleet.task(tasks["sgd"]).versions
    assert versions[1].accepted and versions[1].released_version > 1  # tasks share versions
    assert versions[1].accuracy > versions[0].accuracy + 0.3
    assert versions[2].accepted and versions[2].accuracy < versions[1].accuracy
    assert versions[2].released_version == 0  # what serves stays the best accepted global
    assert fleet.task(tasks["sgd"]).best_accuracy == versions[1].accuracy


def test_a_private_task_spends_its_epsilon_and_stops(both_backends: LearningFleet) -> None:
    """Central DP: each aggregation spends privacy; the task stops before passing its limit,
    with the epsilon the accountant computes, shown by `learn status`."""
    from edge_agent.learn import privacy

    fleet = both_backends
    fake = _published_fakes(fleet, 2)
    validation = fleet.npz("validation", *split()["validation"])
    z = 2.0
    limit = (privacy.epsilon(z, 2) + privacy.epsilon(z, 3)) / 2  # room for two aggregations
    refused = fleet.learn(
        "start", "--model", "digits", "--validation", str(validation),
        "--dp-noise-multiplier", str(z), check=False,
    )  # fmt: skip
    assert refused.returncode == 1 and "needs clip_norm > 0" in refused.stderr
    task_id = int(
        fleet.learn(
            "start", "--model", "digits", "--validation", str(validation), "--buffer", "2",
            "--trainable", "last:1", "--clip-norm", "1", "--dp-noise-multiplier", str(z),
            "--dp-max-epsilon", str(limit), "--max-accuracy-drop", "1",
        ).stdout
    )  # fmt: skip
    _, start = _global(fake["d0"], task_id)
    small = {n: np.full(v.shape, 1e-3, np.float32) for n, v in start.items()}
    # A device's own report of its training time is bounded (NaN, huge): status stays sane.
    lies = {"train_seconds": float("nan"), "paused_seconds": 1e300}
    for expected_version in (1, 2):
        for device in fake.values():
            _upload(device, task_id, small, **lies)
        wait_for(
            lambda v=expected_version: len(fleet.task(task_id).versions) > v,  # type: ignore[misc]
            f"aggregation {expected_version}",
        )
    for device in fake.values():  # a third buffer would pass the limit: the task stops instead
        _upload(device, task_id, small)
    task = wait_for(lambda: (t := fleet.task(task_id)).state == "stopped" and t, "the task to stop")
    assert len(task.versions) == 3  # the base and two aggregations, no third
    assert task.dp_epsilon == pytest.approx(privacy.epsilon(z, 2)) and task.dp_epsilon <= limit
    assert "privacy budget" in task.progress
    assert task.train_seconds == 0 and task.paused_seconds == 0  # NaN is 0, paused <= run
    status = fleet.learn("status", "--task", str(task_id)).stdout
    assert "privacy spent: epsilon" in status
