"""Every tensor an ONNX model holds, wherever it hides: initializers, sparse initializers (values
and indices), node attributes (tensor, tensors, sparse_tensor, sparse_tensors), subgraphs of
attributes (If, Loop, Scan bodies) and the nodes of model-local functions. An external-data
check that looks at graph.initializer alone misses the others."""

from __future__ import annotations

from collections.abc import Iterator

import onnx


def _sparse(sparse: onnx.SparseTensorProto) -> Iterator[onnx.TensorProto]:
    yield sparse.values
    yield sparse.indices


def _nodes(nodes: Iterator[onnx.NodeProto] | list[onnx.NodeProto]) -> Iterator[onnx.TensorProto]:
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield from _sparse(attr.sparse_tensor)
            for sparse in attr.sparse_tensors:
                yield from _sparse(sparse)
            if attr.HasField("g"):
                yield from graph_tensors(attr.g)
            for sub in attr.graphs:
                yield from graph_tensors(sub)


def graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from _sparse(sparse)
    yield from _nodes(graph.node)


def model_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from model.graph.initializer
    yield from nested_tensors(model)


def nested_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor but the main graph's initializers."""
    for sparse in model.graph.sparse_initializer:
        yield from _sparse(sparse)
    yield from _nodes(model.graph.node)
    for function in model.functions:
        yield from _nodes(function.node)


# Ops whose cost (or whether they run at all) depends on the values of their inputs, not only
# on shapes: timing a warmup on zeros says nothing about a real request's cost.
_ALWAYS_DATA_DEPENDENT = frozenset(
    {"Loop", "If", "Scan", "NonMaxSuppression", "Range", "NonZero", "Unique", "Compress"}
)
# Ops whose output size comes from one input (index): data-dependent unless that input is fixed.
_SIZED_BY = {"TopK": 1, "Expand": 1, "Tile": 1, "ConstantOfShape": 0, "Pad": 1, "Resize": 3}


def data_dependent_ops(model: onnx.ModelProto) -> list[str]:
    """The data-dependent ops of `model` (subgraphs and functions included), sorted."""
    fixed = {t.name for t in model.graph.initializer}
    found: set[str] = set()

    def visit(nodes: list[onnx.NodeProto] | Iterator[onnx.NodeProto]) -> None:
        for node in nodes:
            if node.op_type == "Constant":
                fixed.update(node.output)
            if node.op_type in _ALWAYS_DATA_DEPENDENT:
                found.add(node.op_type)
            index = _SIZED_BY.get(node.op_type)
            if index is not None and len(node.input) > index:
                size_input = node.input[index]
                if size_input and size_input not in fixed:
                    found.add(node.op_type)
            for attr in node.attribute:
                if attr.HasField("g"):
                    visit(list(attr.g.node))
                for sub in attr.graphs:
                    visit(list(sub.node))

    visit(list(model.graph.node))
    for function in model.functions:
        visit(list(function.node))
    return sorted(found)
