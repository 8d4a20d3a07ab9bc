"""Reproduce the shipped model: a handwritten-digit classifier on scikit-learn's digits data set.

    pip install -e '.[model]' && python scripts/make_digits_model.py

Writes models/digits/{config.pbtxt, 1/model.onnx, validation.npz, sample.npy}. Deterministic:
a fixed split and seed (same scikit-learn and numpy give the same bytes). The network is an MLP
(64 -> 64 ReLU -> 10) trained by scikit-learn and written as a plain ONNX graph, so the runtime
needs nothing but ONNX Runtime. Inputs are the 8x8 images flattened, pixel values 0..16 as float32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

OUT = Path(__file__).resolve().parents[1] / "models" / "digits"
SEED = 0

CONFIG = """\
# A handwritten-digit classifier (scripts/make_digits_model.py). Input: 8x8 images flattened,
# pixel values 0..16. Outputs: the class probabilities and the most likely digit.
name: "digits"
platform: "onnxruntime_onnx"
max_batch_size: 64
input [
  { name: "input", data_type: TYPE_FP32, dims: [ 64 ] }
]
output [
  { name: "probabilities", data_type: TYPE_FP32, dims: [ 10 ] },
  { name: "label", data_type: TYPE_INT64, dims: [ ] }
]
instance_group [ { count: 1, kind: KIND_AUTO } ]
# Batch concurrent requests: no added delay, so a batch forms from whatever queued while the
# instance was busy; a bounded queue answers UNAVAILABLE at once when full.
dynamic_batching {
  default_queue_policy { max_queue_size: 256 }
}
"""


def build_graph(clf: MLPClassifier) -> onnx.ModelProto:
    (w1, w2), (b1, b2) = clf.coefs_, clf.intercepts_
    inits = [
        numpy_helper.from_array(w1.astype(np.float32), "w1"),
        numpy_helper.from_array(b1.astype(np.float32), "b1"),
        numpy_helper.from_array(w2.astype(np.float32), "w2"),
        numpy_helper.from_array(b2.astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["l0"]),
        helper.make_node("Add", ["l0", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        helper.make_node("ArgMax", ["logits"], ["label"], axis=-1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "digits",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10]),
            helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
        ],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edge-agent"
    )
    model.ir_version = 8  # readable by every onnxruntime >= 1.14
    onnx.checker.check_model(model)
    return model


def main() -> None:
    digits = load_digits()
    x = digits.data.astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_val, y_train, y_val = train_test_split(
        x, y, test_size=0.2, random_state=SEED, stratify=y
    )
    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=500, random_state=SEED)
    clf.fit(x_train, y_train)
    accuracy = clf.score(x_val, y_val)
    (OUT / "1").mkdir(parents=True, exist_ok=True)
    onnx.save(build_graph(clf), OUT / "1" / "model.onnx")
    (OUT / "config.pbtxt").write_text(CONFIG)
    np.savez(OUT / "validation.npz", input=x_val, labels=y_val)
    np.save(OUT / "sample.npy", x_val[:1])
    print(
        f"validation accuracy {accuracy:.4f} on {len(y_val)} held-out digits; "
        f"sample.npy is a {int(y_val[0])}"
    )


if __name__ == "__main__":
    main()
