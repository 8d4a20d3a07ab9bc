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
    step = delta.aggregate([one, two], delta.Aggregation(staleness_exponent=0.5))
    w1, w2 = 10 * 1.0, 10 * (1 + 3) ** -0.5  # examples x (1 + tau)^-a
    assert step["w"][0] == pytest.approx((w1 * 1 + w2 * 3) / (w1 + w2))


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
    median = delta.aggregate(updates, delta.Aggregation(aggregator="median"))
    assert np.allclose(median["w"], 1.0)  # FedMedian: the middle of each coordinate
    five = [delta.Update({"w": np.array([v], np.float32)}, 1, 0) for v in (5, -3, 2, 9, 1)]
    assert delta.aggregate(five, delta.Aggregation(aggregator="median"))["w"][0] == 2.0


def _reference_step(
    name: str, w: float, d: float, m: float, v: float, lr: float, b1: float, b2: float, tau: float
) -> tuple[float, float, float]:
    """One server step written out from Reddi et al. (Algorithm 2) and FedAvgM, scalar."""
    if name == "sgd":
        return w + lr * d, m, v
    if name == "momentum":
        m = b1 * m + d
        return w + lr * m, m, v
    if name == "adagrad":
        v = v + d * d
        return w + lr * d / (v**0.5 + tau), m, v
    m = b1 * m + (1 - b1) * d
    v = b2 * v + (1 - b2) * d * d if name == "adam" else v - (1 - b2) * d * d * np.sign(v - d * d)
    return w + lr * m / (v**0.5 + tau), m, v


@pytest.mark.parametrize("name", delta.SERVER_OPTIMIZERS)
def test_server_optimizers_follow_their_formulas_and_resume_from_stored_state(name: str) -> None:
    lr, beta, b1, b2, tau = 0.5, 0.8, 0.9, 0.99, 1e-3
    optimizer = delta.ServerOptimizer(name, lr, beta, b1, b2, tau)
    rng = np.random.default_rng(1)
    steps = [rng.standard_normal(3).astype(np.float32) for _ in range(4)]
    weights, state = {"w": np.zeros(3, np.float32)}, {}
    for d in steps:
        # Each step's state goes through the wire format, as the control plane stores it.
        weights, new_state = optimizer.apply(weights, {"w": d}, state)
        state = delta.decode(delta.encode(new_state))
    for i in range(3):
        w = m = v = 0.0
        for d in steps:
            w, m, v = _reference_step(
                name, w, float(d[i]), m, v, lr, beta if name == "momentum" else b1, b2, tau
            )
        assert weights["w"][i] == pytest.approx(w, rel=1e-4, abs=1e-5)
    assert int(state[delta.STEP][0]) == 4


def test_server_optimizer_refuses_bad_settings() -> None:
    with pytest.raises(InvalidArgument, match="server optimizer 'nesterov'"):
        delta.ServerOptimizer("nesterov")
    with pytest.raises(InvalidArgument, match="momentum"):
        delta.ServerOptimizer("momentum", momentum=1.0)


def test_dp_noise_has_the_scale_z_times_c_over_k() -> None:
    """DP-FedAvg: N(0, (zC)^2) on the sum of K clipped updates, then / K. With updates of
    zeros the aggregate is the noise alone: its standard deviation must be z * C / K."""
    z, clip, k, size = 1.5, 2.0, 4, 200_000
    zeros = [delta.Update({"w": np.zeros(size, np.float32)}, 7, 0) for _ in range(k)]
    noisy = delta.aggregate(
        zeros,
        delta.Aggregation(buffer=k, clip_norm=clip, dp_noise_multiplier=z),
        np.random.default_rng(5),
    )
    assert float(np.std(noisy["w"])) == pytest.approx(z * clip / k, rel=0.01)
    # Fewer than K (max_wait fired): still divided by K, not by who happened to send.
    half = delta.aggregate(
        zeros[:2],
        delta.Aggregation(buffer=k, clip_norm=clip, dp_noise_multiplier=z),
        np.random.default_rng(6),
    )
    assert float(np.std(half["w"])) == pytest.approx(z * clip / k, rel=0.01)
    assert abs(float(np.mean(noisy["w"]))) < 0.01
    # With signal: the mean of the updates (each weighs 1, whatever its examples) plus that noise.
    ones = [
        delta.Update({"w": np.full(size, float(i), np.float32)}, 100 * i + 1, 0) for i in range(k)
    ]
    signal = delta.aggregate(
        ones,
        delta.Aggregation(buffer=k, clip_norm=clip, dp_noise_multiplier=z),
        np.random.default_rng(5),
    )
    assert np.allclose(signal["w"] - noisy["w"], np.mean(range(k)), atol=1e-5)


def test_epsilon_is_the_accountants_and_within_the_classical_bound() -> None:
    import dp_accounting
    from dp_accounting import rdp

    from edge_agent.learn import privacy

    z, steps, delta_ = 1.1, 30, 1e-5
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), steps))
    ours = privacy.epsilon(z, steps, delta_)
    assert ours == accountant.get_epsilon(delta_)
    # The Gaussian mechanism's RDP is alpha / (2 z^2) per step; the classical conversion
    # eps = RDP + log(1/delta) / (alpha - 1) is an upper bound on what the accountant reports.
    classical = min(
        steps * a / (2 * z * z) + np.log(1 / delta_) / (a - 1) for a in np.linspace(1.5, 200, 4000)
    )
    assert 0 < ours <= classical
    assert privacy.epsilon(z, 0) == 0.0
    assert privacy.epsilon(z, 2 * steps) > ours  # composition only spends more
    fits = privacy.aggregations_within(z, ours)
    assert fits >= steps and privacy.epsilon(z, fits + 1) > ours


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
