"""The parameter server's arithmetic and the tensor wire format (learn/delta.py), the ONNX
helpers the control plane uses without PyTorch (learn/onnxinfo.py), and the converter's ops
against ONNX Runtime (learn/graph.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import modelgen
from edge_agent.errors import InvalidArgument
from edge_agent.learn import delta
from edge_agent.learn.onnxinfo import UnsupportedGraph, trainable_names, training_output

ROOT = Path(__file__).resolve().parents[1]


def test_round_trip_exact_below_and_int8_above_the_threshold() -> None:
    rng = np.random.default_rng(0)
    tensors = {"big": rng.standard_normal((64, 64)).astype(np.float32), "small": np.arange(8.0)}
    data = delta.encode(tensors, int8_threshold=100)
    back = delta.decode(data, {"big": (64, 64), "small": (8,)})
    assert np.array_equal(back["small"], np.arange(8.0, dtype=np.float32))  # exact
    scale = np.abs(tensors["big"]).max() / 127
    assert np.max(np.abs(back["big"] - tensors["big"])) <= scale / 2 + 1e-7
    fp32 = delta.encode(tensors)
    assert len(data) < 0.3 * len(fp32)  # ~a quarter, plus a small header


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "not a tensor set"),
        (b"\xff\xff\xff\x7f{", "not a tensor set"),
        (delta.encode({"a": np.ones(4)})[:-3], "ends before"),
        (delta.encode({"a": np.ones(4)}) + b"x", "after the last tensor"),
        (delta.encode({"a": np.array([np.inf])}), "NaN or Inf"),
    ],
)
def test_malformed_tensor_sets(payload: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        delta.decode(payload)


def test_expected_names_and_shapes() -> None:
    data = delta.encode({"a": np.ones((2, 3))})
    with pytest.raises(InvalidArgument, match="trainable"):
        delta.decode(data, {"b": (2, 3)})
    with pytest.raises(InvalidArgument, match="shape"):
        delta.decode(data, {"a": (3, 2)})


def test_fedbuff_weights_staleness_and_examples() -> None:
    one = delta.Update({"w": np.array([1.0], np.float32)}, examples=10, staleness=0)
    two = delta.Update({"w": np.array([3.0], np.float32)}, examples=10, staleness=3)
    step = delta.aggregate([one, two], delta.Aggregation(staleness_exponent=0.5, server_lr=0.5))
    w1, w2 = 10 * 1.0, 10 * (1 + 3) ** -0.5  # examples x (1 + tau)^-a
    assert step["w"][0] == pytest.approx(0.5 * (w1 * 1 + w2 * 3) / (w1 + w2))


def test_clipping_and_trimmed_mean_hold_off_a_poisoned_update() -> None:
    honest = [{"w": np.array([1.0, 1.0], np.float32)} for _ in range(3)]
    poison = {"w": np.array([-100.0, -100.0], np.float32)}
    clipped, was = delta.clip(poison, 2.0)
    assert was and delta.norm(clipped) == pytest.approx(2.0)
    updates = [delta.Update(u, 1, 0) for u in [*honest, poison]]
    trimmed = delta.aggregate(updates, delta.Aggregation(trim=0.25))
    assert np.allclose(trimmed["w"], 1.0)  # the poison is cut at each coordinate
    mean = delta.aggregate(updates, delta.Aggregation())
    assert np.all(mean["w"] < 0)  # without protection, one device drags the mean


def test_training_output_and_the_trainable_tensors(tmp_path: Path) -> None:
    digits = onnx.load(str(ROOT / "models" / "digits" / "1" / "model.onnx"))
    assert training_output(digits) == ("logits", True)  # the Softmax's input
    names, starts = trainable_names(digits, "logits", "all")
    assert names == {"w1", "b1", "w2", "b2"} and starts == ["input"]
    names, starts = trainable_names(digits, "logits", "last:1")
    assert names == {"w2", "b2"} and len(starts) == 1 and starts[0] != "input"
    with pytest.raises(InvalidArgument, match="layers"):
        trainable_names(digits, "logits", "last:3")
    cnn = onnx.load(str(modelgen.cnn(tmp_path / "cnn.onnx")))
    output, _ = training_output(cnn)
    names, _ = trainable_names(cnn, output, "last:1")
    assert names and all(n in {t.name for t in cnn.graph.initializer} for n in names)


def test_an_unsupported_op_is_named(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from edge_agent.learn.train import TrainSpec, train

    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Erf", ["h"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(np.ones((4, 3), np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedGraph, match="Erf"):
        train(model, {"x": np.ones((4, 4), np.float32)}, np.zeros(4, np.int64), TrainSpec())


def test_the_converter_matches_onnxruntime_on_a_cnn(tmp_path: Path) -> None:
    """Conv, Relu, pooling, Flatten, Gemm/MatMul... of the generated CNN, trained a step."""
    pytest.importorskip("torch")
    from edge_agent.learn.train import TrainSpec, train

    cnn = onnx.load(str(modelgen.cnn(tmp_path / "cnn.onnx")))
    x = np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32)
    result = train(cnn, {cnn.graph.input[0].name: x}, np.arange(8) % 4, TrainSpec(epochs=2))
    assert result.check_error < 1e-3 and result.deltas
    assert all(np.all(np.isfinite(d)) for d in result.deltas.values())
