"""Inline execution that cannot block the event loop, and a warmup that does not refuse a valid
model, against the real daemon with tritonclient."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import modelgen
from conftest import Daemon, wait_for
from edge_agent.scheduling.policy import PROMOTE_AFTER


def _save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def one_hot(path: Path) -> Path:
    """The sum of a one-hot row of `depth + 1` values: cheap on zeros, as slow as `depth` asks,
    and no op the graph rule knows as data-dependent (the run-time demotion must catch it)."""
    one = numpy_helper.from_array(np.array([1], np.int64), "one")
    values = numpy_helper.from_array(np.array([0.0, 1.0], np.float32), "values")
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["depth", "one"], ["size"]),
            helper.make_node("OneHot", ["index", "size", "values"], ["hot"], axis=-1),
            helper.make_node("ReduceSum", ["hot"], ["y"], keepdims=0),
        ],
        "one_hot",
        [
            helper.make_tensor_value_info("index", TensorProto.INT64, [1]),
            helper.make_tensor_value_info("depth", TensorProto.INT64, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
        [one, values],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def needs_length(path: Path) -> Path:
    """x[:, 1:3] reshaped to [1, 2]: fine for every real input of length >= 3, impossible for
    the synthetic warmup's length 1 along the dynamic axis."""
    starts = numpy_helper.from_array(np.array([1], np.int64), "starts")
    ends = numpy_helper.from_array(np.array([3], np.int64), "ends")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    shape = numpy_helper.from_array(np.array([1, 2], np.int64), "shape")
    graph = helper.make_graph(
        [
            helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["part"]),
            helper.make_node("Reshape", ["part", "shape"], ["y"]),
        ],
        "needs_length",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "length"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [starts, ends, axes, shape],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def relu_any_length(path: Path) -> Path:
    """Relu over [batch, length]: cheap at the probe's length 1, as costly as a real length."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu_any_length",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "length"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "length"])],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def matmul_chain(path: Path, links: int = 32, width: int = 1024) -> Path:
    """y = x @ W, `links` times over (one shared W): ~2 * links * width**2 flops per sample,
    a hundred times and more above the one-thread rule's line on any CPU."""
    w = numpy_helper.from_array(np.eye(width, dtype=np.float32), "w")
    nodes = [
        helper.make_node("MatMul", [f"h{i}", "w"], [f"h{i + 1}" if i + 1 < links else "y"])
        for i in range(links)
    ]
    graph = helper.make_graph(
        nodes,
        "matmul_chain",
        [helper.make_tensor_value_info("h0", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        [w],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def repository(tmp: Path) -> Path:
    repo = tmp / "repo"
    modelgen.copy_shipped(repo)
    modelgen.looping(repo / "looping" / "1" / "model.onnx")
    (repo / "looping" / "config.pbtxt").write_text(
        "max_batch_size: 0\ndynamic_batching { default_queue_policy { max_queue_size: 2 } }\n"
    )
    one_hot(repo / "one_hot" / "1" / "model.onnx")
    (repo / "one_hot" / "config.pbtxt").write_text("max_batch_size: 0\n")
    needs_length(repo / "needs_length" / "1" / "model.onnx")
    (repo / "needs_length" / "config.pbtxt").write_text("max_batch_size: 0\n")
    return repo


def call(url: str, model: str, feeds: dict[str, np.ndarray], timeout: float = 60) -> Any:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    with grpcclient.InferenceServerClient(url) as client:
        tensors = []
        for name, value in feeds.items():
            tensor = grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
            tensor.set_data_from_numpy(value)
            tensors.append(tensor)
        return client.infer(model, tensors, client_timeout=timeout)


def test_inline_is_decided_by_the_graph_and_by_observed_runs(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    import tritonclient.grpc as grpcclient

    agent = start_daemon(
        "--model-repository", str(repository(tmp_path)), "--execution-providers", "cpu"
    ).wait_started()
    loaded = {e["model"]: e for e in agent.named("model.loaded")}
    assert loaded["digits"]["inline"] is True  # fixed dims, fast, no data-dependent op
    assert loaded["looping"]["inline"] is False  # a Loop: never inline, whatever warmup says
    assert loaded["one_hot"]["inline"] is True  # nothing in the graph says so: warmup decides

    # Slow requests demote the version (on evidence: policy.InlineJudge); each gets its answer.
    slow = {"index": np.array([3], np.int64), "depth": np.array([30_000_000], np.int64)}
    for _ in range(3):
        assert call(agent.url, "one_hot", slow).as_numpy("y") == 1.0
    (demoted,) = wait_for(lambda: agent.named("model.inline_demoted"), "the demotion")
    assert demoted["model"] == "one_hot/1" and demoted["run_seconds"] > 0.005
    # Cheap again for a long streak on its thread: back inline.
    cheap = {"index": np.array([3], np.int64), "depth": np.array([8], np.int64)}
    for _ in range(2 * PROMOTE_AFTER):
        call(agent.url, "one_hot", cheap)
        if agent.named("model.inline_promoted"):
            break
    assert agent.named("model.inline_promoted")[0]["model"] == "one_hot/1"

    # A slow request of a data-dependent model runs on a thread: meanwhile other models'
    # requests and health checks are answered (before it finishes: the event loop is free).
    finished: list[float] = []
    feeds = {"n": np.array(300_000, np.int64), "x": np.ones((1, 256), np.float32)}

    def slow_call() -> None:
        call(agent.url, "looping", feeds)
        finished.append(time.monotonic())

    thread = threading.Thread(target=slow_call)
    thread.start()
    time.sleep(0.2)  # the slow request is running
    x = np.load(Path(__file__).parents[1] / "models" / "digits" / "sample.npy")
    answered = []
    with grpcclient.InferenceServerClient(agent.url) as client:
        for _ in range(5):
            assert client.is_server_live()
            assert call(agent.url, "digits", {"input": x.astype(np.float32).reshape(1, 64)})
            answered.append(time.monotonic())
    thread.join()
    assert finished and max(answered) < finished[0], (answered, finished)
    import urllib.request

    metrics = urllib.request.urlopen(agent.metrics_url, timeout=10).read().decode()
    assert 'edge_agent_inline_demotions_total{model="one_hot",version="1"} 1.0' in metrics


def test_overload_on_an_input_dependent_model_is_answered_unavailable(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    from tritonclient.utils import InferenceServerException

    agent = start_daemon(
        "--model-repository", str(repository(tmp_path)), "--execution-providers", "cpu"
    ).wait_started()
    codes: list[str] = []
    feeds = {"n": np.array(3_000, np.int64), "x": np.ones((1, 256), np.float32)}

    def client() -> None:
        for _ in range(4):
            try:
                call(agent.url, "looping", feeds)
                codes.append("OK")
            except InferenceServerException as exc:
                codes.append(str(exc.status()))

    threads = [threading.Thread(target=client) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(codes) <= {"OK", "StatusCode.UNAVAILABLE"}, set(codes)
    assert "OK" in codes and "StatusCode.UNAVAILABLE" in codes


def test_a_model_the_synthetic_warmup_cannot_run_still_serves(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    agent = start_daemon(
        "--model-repository", str(repository(tmp_path)), "--execution-providers", "cpu"
    ).wait_started()
    (skipped,) = [e for e in agent.named("model.warmup_skipped") if e["model"] == "needs_length"]
    assert "warmup inference at batch size 1 failed" in skipped["reason"]
    loaded = {e["model"]: e for e in agent.named("model.loaded")}
    assert loaded["needs_length"]["inline"] is False
    x = np.arange(5, dtype=np.float32).reshape(1, 5)
    assert np.array_equal(call(agent.url, "needs_length", {"x": x}).as_numpy("y"), [[1.0, 2.0]])
    # A configured model_warmup stays fatal, as before.
    model = tmp_path / "repo" / "needs_length"
    (model / "config.pbtxt").write_text(
        'max_batch_size: 0\nmodel_warmup [ { name: "real" inputs { key: "x" value { '
        "data_type: TYPE_FP32 dims: [ 1, 1 ] zero_data: true } } } ]\n"
    )
    again = start_daemon(
        "--model-repository", str(tmp_path / "repo"), "--execution-providers", "cpu"
    ).wait_started()
    failed = [e for e in again.named("model.load_failed") if e["model"] == "needs_length"]
    assert failed and "model_warmup 'real'" in failed[0]["reason"]


def test_a_cheap_cpu_model_gets_one_intra_op_thread(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    """ONNX Runtime's default pool only for a model that may use it: a cheap model runs on one
    intra-op thread (its pool threads would spin-wait after every run); a costly one, one whose
    cost zeros cannot show (a Loop, a dynamic length) and a configured thread count keep theirs."""
    repo = tmp_path / "repo"
    modelgen.copy_shipped(repo)
    matmul_chain(repo / "chain" / "1" / "model.onnx")
    (repo / "chain" / "config.pbtxt").write_text("max_batch_size: 2\n")
    modelgen.looping(repo / "looping" / "1" / "model.onnx")  # instant on zeros; a Loop
    (repo / "looping" / "config.pbtxt").write_text("max_batch_size: 0\n")
    relu_any_length(repo / "any_length" / "1" / "model.onnx")
    (repo / "any_length" / "config.pbtxt").write_text("max_batch_size: 8\n")
    pinned = repo / "pinned"
    (pinned / "1").mkdir(parents=True)
    (pinned / "1" / "model.onnx").write_bytes((repo / "digits" / "1" / "model.onnx").read_bytes())
    (pinned / "config.pbtxt").write_text(
        'max_batch_size: 8\nparameters { key: "intra_op_thread_count" '
        'value { string_value: "2" } }\n'
    )
    agent = start_daemon(
        "--model-repository", str(repo), "--execution-providers", "cpu"
    ).wait_started()
    loaded = {e["model"]: e for e in agent.named("model.loaded")}
    assert loaded["digits"]["intra_op_threads"] == 1
    assert loaded["chain"]["intra_op_threads"] == 0  # ONNX Runtime's default pool
    assert loaded["pinned"]["intra_op_threads"] == 2
    # Cheap on the probe's zeros, but zeros do not show their cost: the default stays.
    assert loaded["looping"]["intra_op_threads"] == 0
    assert loaded["any_length"]["intra_op_threads"] == 0
    assert [e["model"] for e in agent.named("model.one_intra_op_thread")] == ["digits"]
    # Their inputs decide how long they run: their pools sleep instead of spinning.
    spinning_off = sorted(e["model"] for e in agent.named("model.spinning_off"))
    assert spinning_off == ["any_length", "looping"]
    # The session made again serves, and warmed (the cheap model still runs inline).
    assert loaded["digits"]["inline"] is True
    x = np.zeros((1, 64), np.float32)
    assert call(agent.url, "digits", {"input": x}).as_numpy("probabilities").shape == (1, 10)
    y = call(agent.url, "chain", {"h0": np.ones((1, 1024), np.float32)}).as_numpy("y")
    assert np.array_equal(y, np.ones((1, 1024), np.float32))
