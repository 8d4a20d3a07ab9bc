"""Models the benchmark generates (deterministic weights; not committed: the MLP is 80 MB)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def wide_mlp(path: Path, widths: tuple[int, ...] = (784, 4096, 4096, 10)) -> Path:
    """784 -> 4096 -> 4096 -> 10 (ReLU): where batching pays on a CPU (GEMM beats GEMV)."""
    rng = np.random.default_rng(0)
    inits, nodes, current = [], [], "input"
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        w = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        inits += [
            numpy_helper.from_array(w, f"w{i}"),
            numpy_helper.from_array(np.zeros(fan_out, np.float32), f"b{i}"),
        ]
        nodes += [
            helper.make_node("MatMul", [current, f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
        ]
        current = f"a{i}"
        if i < len(widths) - 2:
            nodes.append(helper.make_node("Relu", [current], [f"r{i}"]))
            current = f"r{i}"
    nodes.append(helper.make_node("Identity", [current], ["logits"]))
    graph = helper.make_graph(
        nodes,
        "wide_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", widths[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", widths[-1]])],
        inits,
    )
    return _save(graph, path)


def small_cnn(path: Path) -> Path:
    """28x28x1 -> conv3x3(16) -> relu -> conv3x3/2(32) -> relu -> global mean -> fc(10)."""
    rng = np.random.default_rng(1)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        return numpy_helper.from_array(
            (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), name
        )

    inits = [weight("c1", 16, 1, 3, 3), weight("c2", 32, 16, 3, 3), weight("fc", 32, 10)]
    nodes = [
        helper.make_node("Conv", ["input", "c1"], ["h1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("Conv", ["r1", "c2"], ["h2"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("MatMul", ["f", "fc"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "small_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    return _save(graph, path)


def pipeline(work: Path, side: int = 112) -> dict[str, Path]:
    """Three steps of a camera pipeline on [batch, 3, side, side] images: `pre` normalises
    (x * a + b), `features` pools 4x4 and flattens, `head` classifies (fc -> softmax)."""
    rng = np.random.default_rng(2)
    pooled = 3 * (side // 4) ** 2
    image: list[str | int] = ["batch", 3, side, side]
    pre = helper.make_graph(
        [
            helper.make_node("Mul", ["image", "scale"], ["scaled"]),
            helper.make_node("Add", ["scaled", "shift"], ["normalised"]),
        ],
        "pre",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, image)],
        [helper.make_tensor_value_info("normalised", TensorProto.FLOAT, image)],
        [
            numpy_helper.from_array(np.array([1 / 58.0], np.float32), "scale"),
            numpy_helper.from_array(np.array([-2.1], np.float32), "shift"),
        ],
    )
    features = helper.make_graph(
        [
            helper.make_node(
                "AveragePool", ["normalised"], ["pooled"], kernel_shape=[4, 4], strides=[4, 4]
            ),
            helper.make_node("Flatten", ["pooled"], ["features"], axis=1),
        ],
        "features",
        [helper.make_tensor_value_info("normalised", TensorProto.FLOAT, image)],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", pooled])],
    )
    w = (rng.standard_normal((pooled, 10)) / np.sqrt(pooled)).astype(np.float32)
    head = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["scores"], axis=1),
        ],
        "head",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", pooled])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(w, "w")],
    )
    return {
        name: _save(graph, work / f"{name}.onnx")
        for name, graph in (("pre", pre), ("features", features), ("head", head))
    }


def recurrent(path: Path, width: int = 64, hidden: int = 256) -> Path:
    """A recurrent cell for stream benchmarks: h' = tanh(x W + h U), answered as y = h' and
    kept as the state (h_in -> h_out); x [batch, width], h [batch, hidden]."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((width, hidden)) / np.sqrt(width)).astype(np.float32)
    u = (rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("MatMul", ["h_in", "U"], ["hu"]),
            helper.make_node("Add", ["xw", "hu"], ["pre"]),
            helper.make_node("Tanh", ["pre"], ["y"]),
            helper.make_node("Identity", ["y"], ["h_out"]),
        ],
        "recurrent",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width]),
            helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["batch", hidden]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", hidden]),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["batch", hidden]),
        ],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(u, "U")],
    )
    return _save(graph, path)
