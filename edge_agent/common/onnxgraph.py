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
