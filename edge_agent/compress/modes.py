"""The conversions, on top of the well-kept tools: onnxruntime.quantization (int8 dynamic and
static QDQ) and onnxruntime.transformers.float16 (fp16); pruning is a few lines of numpy.

Calibration for int8-static: MinMax (the range of each activation over the calibration set),
per-channel weight scales, QDQ format, unsigned 8-bit activations with signed 8-bit weights (the
combination ONNX Runtime's CPU kernels are fastest with).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edge_agent.common.layout import MODEL_FILE
from edge_agent.compress.data import batches
from edge_agent.errors import InvalidArgument

MODES = ("int8-dynamic", "int8-static", "fp16", "prune")
QUANTIZED_OPS = {"MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv", "DequantizeLinear"}
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE}


def _no_phase(name: str) -> None:
    del name


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over an in-memory set. The quantizer reads
    it to its end before it quantizes, so its end is when calibration is over: `at_end` is
    called then, once."""

    def __init__(
        self, inputs: Mapping[str, np.ndarray], at_end: Callable[[], None] = lambda: None
    ) -> None:
        self._batches: Iterator[dict[str, np.ndarray]] = iter(batches(inputs, 16))
        self._at_end = at_end
        self._ended = False

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        if batch is None and not self._ended:
            self._ended = True
            self._at_end()
        return batch


def _quiet() -> None:
    # The quantizer logs advice ("consider pre-processing") on the root logger at WARNING.
    logging.getLogger().setLevel(logging.ERROR)


def int8_dynamic(source: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _quiet()
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / MODEL_FILE
        quantize_dynamic(source, out, weight_type=QuantType.QInt8)
        return _quantized(onnx.load(str(out)), "int8-dynamic")


def int8_static(
    source: Path, calibration: Mapping[str, np.ndarray], phase: Callable[[str], None] = _no_phase
) -> onnx.ModelProto:
    """`phase(name)` is told when calibration starts and when quantizing does (progress)."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    _quiet()
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / MODEL_FILE
        rows = len(next(iter(calibration.values()), ()))
        phase(f"calibrating on {rows} rows (int8-static)")
        quantize_static(
            source,
            out,
            _Reader(calibration, lambda: phase("quantizing (int8-static)")),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        return _quantized(onnx.load(str(out)), "int8-static")


def _quantized(model: onnx.ModelProto, mode: str) -> onnx.ModelProto:
    if not any(node.op_type in QUANTIZED_OPS for node in model.graph.node):
        raise InvalidArgument(
            f"mode {mode}: nothing to quantize (no MatMul, Gemm or Conv with constant weights)"
        )
    return compact(model)


def fp16(source: Path, keep_io_types: bool, block_ops: Sequence[str]) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(source))
    if not any(t.data_type in FLOAT_TYPES for t in model.graph.initializer):
        raise InvalidArgument("mode fp16: the model has no float32 weights to convert")
    converted = convert_float_to_float16(
        model,
        keep_io_types=keep_io_types,
        op_block_list=sorted({*DEFAULT_OP_BLOCK_LIST, *block_ops}),
    )
    return compact(converted)


def prune(source: Path, sparsity: float) -> onnx.ModelProto:
    """Zero the smallest-magnitude `sparsity` share of every float weight matrix (2+ dims)."""
    if not 0 < sparsity < 1:
        raise InvalidArgument(f"--sparsity must lie strictly between 0 and 1, got {sparsity}")
    model = onnx.load(str(source))
    pruned = 0
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.data_type not in FLOAT_TYPES or len(tensor.dims) < 2:
            continue
        weights = numpy_helper.to_array(tensor).copy()
        count = int(weights.size * sparsity)
        if count == 0:
            continue
        threshold_index = np.argpartition(np.abs(weights).ravel(), count - 1)[:count]
        weights.ravel()[threshold_index] = 0
        model.graph.initializer[index].CopyFrom(numpy_helper.from_array(weights, tensor.name))
        pruned += 1
    if not pruned:
        raise InvalidArgument("mode prune: the model has no float weight matrices to prune")
    return compact(model)


def compact(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop what execution never reads: doc strings, node names, intermediate shape annotations,
    and long generated tensor names (initializers and intermediates renamed t0, t1, ...; the
    graph's inputs and outputs keep theirs). On a 20 KB model the quantizer's names are 5% of
    the file."""
    graph = model.graph
    del graph.value_info[:]
    model.doc_string = ""
    graph.doc_string = ""
    if any(a.HasField("g") or a.graphs for n in graph.node for a in n.attribute):
        return model  # subgraphs may name outer tensors: leave the names alone
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    produced = [name for node in graph.node for name in node.output]
    names: dict[str, str] = {}
    for name in [t.name for t in graph.initializer] + produced:  # nodes need not be sorted
        if name and name not in keep and name not in names:
            names[name] = f"t{len(names)}"
    for tensor in graph.initializer:
        tensor.name = names.get(tensor.name, tensor.name)
    for node in graph.node:
        node.name = ""
        node.doc_string = ""
        for i, name in enumerate(node.output):
            node.output[i] = names.get(name, name)
        for i, name in enumerate(node.input):
            node.input[i] = names.get(name, name)
    return model
