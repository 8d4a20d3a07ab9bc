"""Small ONNX models written by the tests (onnx.helper), and repository layouts around them."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from benchmarks.models import recurrent  # noqa: F401 (one recurrent cell for tests and benchmarks)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models"

# Protocol datatype -> (ONNX element type, numpy dtype) for the all-types echo model.
ALL_TYPES = {
    "BOOL": (TensorProto.BOOL, np.bool_),
    "UINT8": (TensorProto.UINT8, np.uint8),
    "UINT16": (TensorProto.UINT16, np.uint16),
    "UINT32": (TensorProto.UINT32, np.uint32),
    "UINT64": (TensorProto.UINT64, np.uint64),
    "INT8": (TensorProto.INT8, np.int8),
    "INT16": (TensorProto.INT16, np.int16),
    "INT32": (TensorProto.INT32, np.int32),
    "INT64": (TensorProto.INT64, np.int64),
    "FP16": (TensorProto.FLOAT16, np.float16),
    "FP32": (TensorProto.FLOAT, np.float32),
    "FP64": (TensorProto.DOUBLE, np.float64),
    "BYTES": (TensorProto.STRING, np.object_),
}


def _save(model: onnx.ModelProto, path: Path, **kwargs: object) -> Path:
    model.ir_version = 8
    model.opset_import[0].version = 17
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path), **kwargs)  # type: ignore[arg-type]
    return path


def echo_all_types(path: Path) -> Path:
    """in_<T> -> out_<T> (Identity) for every datatype, shapes [batch, n]."""
    inputs, outputs, nodes = [], [], []
    for name, (elem, _) in ALL_TYPES.items():
        inputs.append(helper.make_tensor_value_info(f"in_{name}", elem, ["batch", "n"]))
        outputs.append(helper.make_tensor_value_info(f"out_{name}", elem, ["batch", "n"]))
        nodes.append(helper.make_node("Identity", [f"in_{name}"], [f"out_{name}"]))
    return _save(helper.make_model(helper.make_graph(nodes, "alltypes", inputs, outputs)), path)


def add_fixed(path: Path) -> Path:
    """y = x + 1 on a fixed [2, 3] FP32 tensor: a model that cannot batch."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(np.ones((2, 3), np.float32), "one")],
    )
    return _save(helper.make_model(graph), path)


def echo(path: Path, elem: int = TensorProto.FLOAT) -> Path:
    """y = Identity(x), [batch, n] of one element type (FP32 by default)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "echo",
        [helper.make_tensor_value_info("x", elem, ["batch", "n"])],
        [helper.make_tensor_value_info("y", elem, ["batch", "n"])],
    )
    return _save(helper.make_model(graph), path)


def matmul_external(version_dir: Path, location: str = "weights.bin") -> Path:
    """y = x @ W with W (4x4) stored as external data in `location`."""
    weights = np.arange(16, dtype=np.float32).reshape(4, 4)
    init = numpy_helper.from_array(weights, "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "ext",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [init],
    )
    model = helper.make_model(graph)
    return _save(
        model,
        version_dir / "model.onnx",
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
    )


def set_external_location(model_path: Path, location: str, **fields: str) -> None:
    """Rewrite the external-data entry of every external tensor (to craft hostile models)."""
    model = onnx.load(str(model_path), load_external_data=False)
    for tensor in model.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in tensor.external_data}
            entries.update(location=location, **fields)
            del tensor.external_data[:]
            for key, value in entries.items():
                tensor.external_data.add(key=key, value=value)
    onnx.save(model, str(model_path))


def copy_shipped(repo: Path, name: str = "digits") -> Path:
    target = repo / name
    shutil.copytree(SHIPPED / name, target)
    return target


def looping(path: Path, rows: int = 1, width: int = 256, scale: float = 0.5) -> Path:
    """y = x @ W applied `n` times (a Loop whose trip count is an input): cost set by an input.
    W = scale * identity (1.0 keeps the values as they are: no denormals however long it runs)."""
    w = numpy_helper.from_array(np.eye(width, dtype=np.float32) * scale, "w")
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["state", "w"], ["next"]),
            helper.make_node("Identity", ["c"], ["c_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [rows, width]),
        ],
        [
            helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("next", TensorProto.FLOAT, [rows, width]),
        ],
    )
    graph = helper.make_graph(
        [
            helper.make_node(
                "Constant", [], ["cond"], value=numpy_helper.from_array(np.array(True), "cond")
            ),
            helper.make_node("Loop", ["n", "cond", "x"], ["y"], body=body),
        ],
        "looping",
        [
            helper.make_tensor_value_info("n", TensorProto.INT64, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, width]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, width])],
        [w],
    )
    return _save(helper.make_model(graph), path)


def slow(path: Path, rows: int = 4096, depth: int = 16) -> Path:
    """y[1, 512] from x[1, 512]: x is expanded to `rows` rows and pushed through `depth` 512x512
    matmuls, so one execution takes long enough for requests to queue behind it."""
    weight = numpy_helper.from_array(np.full((512, 512), 1.0 / 512, np.float32), "w")
    shape = numpy_helper.from_array(np.array([rows, 512], np.int64), "shape")
    nodes = [helper.make_node("Expand", ["x", "shape"], ["h0"])]
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "w"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("ReduceMean", [f"h{depth}"], ["y"], axes=[0], keepdims=1))
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 512])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 512])],
        [weight, shape],
    )
    return _save(helper.make_model(graph), path)


def versioned(version_dir: Path, value: float, golden: float | None = None) -> Path:
    """outputs a = x*0 + A and b = x*0 + B, [batch, 4] FP32, with A (in the graph) and B (in
    weights.bin, external data) both filled with `value`: an answer with a == b == value came
    from one complete version. `golden`: also write golden.npz expecting that value."""
    inline = numpy_helper.from_array(np.full(4, value, np.float32), "A")
    external = numpy_helper.from_array(np.full(4, value, np.float32), "B")
    zero = numpy_helper.from_array(np.zeros(1, np.float32), "zero")
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "zero"], ["x0"]),
            helper.make_node("Add", ["x0", "A"], ["a"]),
            helper.make_node("Add", ["x0", "B"], ["b"]),
        ],
        "versioned",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", 4]),
        ],
        [inline, external, zero],
    )
    model = helper.make_model(graph)
    model.ir_version = 8
    model.opset_import[0].version = 17
    onnx.checker.check_model(model)
    version_dir.mkdir(parents=True, exist_ok=True)
    # B alone goes to the external file, written first: the graph names it.
    onnx.external_data_helper.set_external_data(model.graph.initializer[1], "weights.bin")
    raw = model.graph.initializer[1].raw_data
    (version_dir / "weights.bin").write_bytes(raw)
    model.graph.initializer[1].ClearField("raw_data")
    model.graph.initializer[1].data_location = TensorProto.EXTERNAL
    onnx.save(model, str(version_dir / "model.onnx"))
    if golden is not None:
        x = np.ones((2, 4), np.float32)
        expected = np.full((2, 4), golden, np.float32)
        np.savez(version_dir / "golden.npz", **{"input/x": x, "output/a": expected})
    return version_dir / "model.onnx"


def versioned_files(value: float, tmp: Path) -> dict[str, bytes]:
    """The files of a `versioned` model, by name, for pushing inline."""
    versioned(tmp, value)
    return {p.name: p.read_bytes() for p in sorted(tmp.iterdir())}


def mlp(path: Path, last_layer_seed: int, width: int = 256, hidden_layers: int = 2) -> Path:
    """y = relu(...relu(x W1) ... ) Wlast, [batch, 64] -> [batch, 10] FP32. Every layer but the
    last is fixed; `last_layer_seed` changes only the last one (a "one-layer update")."""
    fixed = np.random.default_rng(0)
    weights = [fixed.standard_normal((64, width)).astype(np.float32) / 8]
    weights += [
        fixed.standard_normal((width, width)).astype(np.float32) / 16
        for _ in range(hidden_layers - 1)
    ]
    last = np.random.default_rng(last_layer_seed).standard_normal((width, 10)).astype(np.float32)
    weights.append(last)
    nodes, current = [], "x"
    for i in range(len(weights)):
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"m{i}"]))
        current = f"m{i}"
        if i < len(weights) - 1:
            nodes.append(helper.make_node("Relu", [current], [f"r{i}"]))
            current = f"r{i}"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)],
    )
    return _save(helper.make_model(graph), path)


def cnn(path: Path, seed: int = 0) -> Path:
    """A small image classifier: [batch, 3, 16, 16] -> Conv 3x3 (16) -> Relu -> Conv 3x3 (32) ->
    Relu -> GlobalAveragePool -> Flatten -> MatMul (32x10) + bias -> `logits` [batch, 10]."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((16, 3, 3, 3)) / 5).astype(np.float32)
    w2 = (rng.standard_normal((32, 16, 3, 3)) / 12).astype(np.float32)
    w3 = (rng.standard_normal((32, 10)) * 8).astype(np.float32)
    b3 = rng.standard_normal(10).astype(np.float32) / 10
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("MatMul", ["f", "w3"], ["m"]),
        helper.make_node("Add", ["m", "b3"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [
            numpy_helper.from_array(a, n)
            for a, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"), (b3, "b3"))
        ],
    )
    return _save(helper.make_model(graph), path)


def affine(
    path: Path, scale: float, bias: float, width: int = 4, names: tuple[str, str] = ("x", "y")
) -> Path:
    """y = x * scale + bias, [batch, width] FP32 (a pipeline step)."""
    graph = helper.make_graph(
        [
            helper.make_node("Mul", [names[0], "scale"], ["scaled"]),
            helper.make_node("Add", ["scaled", "bias"], [names[1]]),
        ],
        "affine",
        [helper.make_tensor_value_info(names[0], TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info(names[1], TensorProto.FLOAT, ["batch", width])],
        [
            numpy_helper.from_array(np.array([scale], np.float32), "scale"),
            numpy_helper.from_array(np.array([bias], np.float32), "bias"),
        ],
    )
    return _save(helper.make_model(graph), path)


def dense(path: Path, seed: int, width: int = 4, names: tuple[str, str] = ("x", "y")) -> Path:
    """y = tanh(x W), W [width, width] from `seed`, FP32 (a pipeline step)."""
    weight = np.random.default_rng(seed).standard_normal((width, width)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", [names[0], "W"], ["xw"]),
            helper.make_node("Tanh", ["xw"], [names[1]]),
        ],
        "dense",
        [helper.make_tensor_value_info(names[0], TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info(names[1], TensorProto.FLOAT, ["batch", width])],
        [numpy_helper.from_array(weight, "W")],
    )
    return _save(helper.make_model(graph), path)


def join(path: Path, width: int = 4) -> Path:
    """y = a + 2 b, [batch, width] FP32: two branches meet (a pipeline step)."""
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["b", "two"], ["b2"]),
            helper.make_node("Add", ["a", "b2"], ["y"]),
        ],
        "join",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", width]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", width]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        [numpy_helper.from_array(np.array([2.0], np.float32), "two")],
    )
    return _save(helper.make_model(graph), path)


def accumulator(path: Path, width: int = 4) -> Path:
    """A stateful model for the sequence batcher: total = acc + x (acc the state input, total
    its output and the answer), with the sequence's START and CORRID control inputs echoed
    (started, corrid). [batch, ...] everywhere."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["acc", "x"], ["total"]),
            helper.make_node("Identity", ["total"], ["acc_out"]),
            helper.make_node("Identity", ["START"], ["started"]),
            helper.make_node("Identity", ["CORRID"], ["corrid"]),
        ],
        "accumulator",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width]),
            helper.make_tensor_value_info("acc", TensorProto.FLOAT, ["batch", width]),
            helper.make_tensor_value_info("START", TensorProto.INT32, ["batch", 1]),
            helper.make_tensor_value_info("CORRID", TensorProto.UINT64, ["batch", 1]),
        ],
        [
            helper.make_tensor_value_info("total", TensorProto.FLOAT, ["batch", width]),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, ["batch", width]),
            helper.make_tensor_value_info("started", TensorProto.INT32, ["batch", 1]),
            helper.make_tensor_value_info("corrid", TensorProto.UINT64, ["batch", 1]),
        ],
    )
    return _save(helper.make_model(graph), path)


ACCUMULATOR_CONFIG = """max_batch_size: 8
sequence_batching {{
  max_sequence_idle_microseconds: {idle_us}
  oldest {{ max_queue_delay_microseconds: 500 }}
  control_input [
    {{ name: "START" control [ {{ kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] }} ] }},
    {{ name: "CORRID" control [ {{ kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 }} ] }}
  ]
  state [ {{ input_name: "acc" output_name: "acc_out" data_type: TYPE_FP32 dims: [ 4 ] }} ]
}}
{parameters}"""

RECURRENT_CONFIG = """max_batch_size: 16
sequence_batching {
  max_sequence_idle_microseconds: 60000000
  oldest { max_queue_delay_microseconds: 2000 }
  state [ { input_name: "h_in" output_name: "h_out" data_type: TYPE_FP32 dims: [ 64 ] } ]
}
parameters { key: "execution_inline" value { string_value: "false" } }
"""
