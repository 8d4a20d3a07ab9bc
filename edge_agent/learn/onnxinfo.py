"""What the trainer and the parameter server need to know of an ONNX model, without PyTorch:
the training output, which initializers train (all, or the last N layers), features from the
frozen part, accuracy, and a model with new initializer values. The control plane uses these
to start tasks and gate candidates; learn/train.py adds the PyTorch part."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from edge_agent.errors import InvalidArgument

LAYERS = ("Gemm", "MatMul", "Conv", "ConvTranspose")


class UnsupportedGraph(InvalidArgument):
    """The graph uses an op (or an attribute value) the trainer cannot run."""


def needed_nodes(
    graph: onnx.GraphProto, outputs: Sequence[str], stop: Sequence[str] = ()
) -> list[onnx.NodeProto]:
    """The nodes `outputs` depend on (not looking past the tensors in `stop`), in graph
    (topological) order."""
    producers = {o: n for n in graph.node for o in n.output}
    wanted: set[int] = set()
    stack = list(outputs)
    while stack:
        name = stack.pop()
        node = producers.get(name) if name not in stop else None
        if node is None or id(node) in wanted:
            continue
        wanted.add(id(node))
        stack.extend(i for i in node.input if i)
    return [n for n in graph.node if id(n) in wanted]


def initializer_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def training_output(model: onnx.ModelProto) -> tuple[str, bool]:
    """(the tensor trained as logits, whether the model applies Softmax after it)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    for output in model.graph.output:
        kind = output.type.tensor_type
        if kind.elem_type != onnx.TensorProto.FLOAT or len(kind.shape.dim) != 2:
            continue
        node = producers.get(output.name)
        while node is not None and node.op_type == "Identity":
            node = producers.get(node.input[0])
        if node is not None and node.op_type == "Softmax":
            return node.input[0], True
        return output.name, False
    raise UnsupportedGraph("the model has no float output of rank 2 (class scores) to train")


def trainable_names(
    model: onnx.ModelProto, output: str, trainable: str
) -> tuple[set[str], list[str]]:
    """(the initializers that train, the tensors the trained part starts from: graph inputs for
    "all", the frozen part's outputs for "last:N")."""
    floats = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    nodes = needed_nodes(model.graph, [output])
    graph_inputs = [i.name for i in model.graph.input if i.name not in floats]
    if trainable == "all":
        names = {i for n in nodes for i in n.input if i in floats}
        return names, graph_inputs
    count = int(trainable[5:])
    layers = [n for n in nodes if n.op_type in LAYERS and any(i in floats for i in n.input[1:])]
    if not 1 <= count <= len(layers):
        raise InvalidArgument(f"trainable last:{count}: the model has {len(layers)} layers")
    first = layers[-count]
    head: list[onnx.NodeProto] = []
    produced: set[str] = set()
    started = False
    for node in nodes:
        started = started or node is first
        depends = any(i in produced for i in node.input)
        if started and (node is first or depends):
            head.append(node)
            produced.update(node.output)
    initializers = {t.name for t in model.graph.initializer}
    cuts = sorted(
        {i for n in head for i in n.input if i and i not in produced and i not in initializers}
    )
    names = {i for n in head for i in n.input if i in floats}
    return names, cuts


def features(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], names: list[str]
) -> dict[str, np.ndarray]:
    """The tensors `names` computed by ONNX Runtime (the frozen part of a last:N model)."""
    import onnxruntime as ort

    graph_inputs = {i.name for i in model.graph.input}
    if set(names) <= set(feeds) and set(names) <= graph_inputs:
        return {n: feeds[n] for n in names}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name in names:
        if name not in existing:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    out = session.run(names, dict(feeds))
    return dict(zip(names, out, strict=True))


def apply(
    model: onnx.ModelProto, tensors: Mapping[str, np.ndarray], add: bool = True
) -> onnx.ModelProto:
    """A copy of `model` with these initializers replaced (or, with `add`, moved by them)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name in tensors:
            base = numpy_helper.to_array(init) if add else 0
            value = (base + tensors[init.name]).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(value, init.name))
    return out


def accuracy(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], labels: np.ndarray) -> float:
    """Top-1 accuracy of the training output, in ONNX Runtime (batches of 256)."""
    output, _ = training_output(model)
    rows = len(labels)
    scores = []
    for start in range(0, rows, 256):
        part = {k: v[start : start + 256] for k, v in feeds.items()}
        scores.append(features(model, part, [output])[output])
    predicted = np.argmax(np.concatenate(scores), axis=1)
    return float(np.mean(predicted == np.asarray(labels)))
