"""Calibration and validation sets: .npz files holding one array per model input, named after the
input; a validation set may add `labels` (class indices, one per row)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx

from edge_agent.errors import InvalidArgument

LABELS = "labels"

# ONNX element type -> numpy dtype, for the inputs a set must match.
_NUMPY = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.BOOL: np.bool_,
}


def input_specs(model: onnx.ModelProto) -> dict[str, tuple[type, list[int | None]]]:
    """Graph inputs that are not initializers -> (numpy dtype, dims; None where symbolic)."""
    initializers = {t.name for t in model.graph.initializer}
    specs: dict[str, tuple[type, list[int | None]]] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        if tensor.elem_type not in _NUMPY:
            raise InvalidArgument(
                f"input {value.name!r}: element type "
                f"{onnx.TensorProto.DataType.Name(tensor.elem_type)} is not supported here"
            )
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        specs[value.name] = (_NUMPY[tensor.elem_type], dims)
    return specs


def load_set(
    path: Path, model: onnx.ModelProto, what: str
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """(inputs by name, labels or None), checked against the model's inputs: every input present
    with the right rank, fixed dims and dtype (converted when lossless), same number of rows."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"{what} set {path}: not a readable .npz file ({exc})") from exc
    specs = input_specs(model)
    labels = arrays.pop(LABELS, None)
    unknown = sorted(set(arrays) - set(specs))
    missing = sorted(set(specs) - set(arrays))
    if unknown or missing:
        raise InvalidArgument(
            f"{what} set {path}: arrays must be named after the model's inputs {sorted(specs)}"
            + (f"; missing {missing}" if missing else "")
            + (f"; unknown {unknown}" if unknown else "")
        )
    rows = {a.shape[0] if a.ndim else 0 for a in arrays.values()}
    inputs = {}
    for name, (dtype, dims) in specs.items():
        array = arrays[name]
        fits = array.ndim == len(dims) and all(
            d is None or d == s for d, s in zip(dims[1:], array.shape[1:], strict=True)
        )
        if not fits:
            raise InvalidArgument(
                f"{what} set {path}: input {name!r} has shape {list(array.shape)}, the model "
                f"expects {['N' if d is None else d for d in dims]}"
            )
        if not np.can_cast(array.dtype, dtype, casting="same_kind"):
            raise InvalidArgument(
                f"{what} set {path}: input {name!r} is {array.dtype}, the model expects "
                f"{np.dtype(dtype).name}"
            )
        inputs[name] = array.astype(dtype, copy=False)
    if len(rows) != 1 or 0 in rows:
        raise InvalidArgument(f"{what} set {path}: every input needs the same, nonzero row count")
    if labels is not None and (
        labels.ndim != 1 or labels.shape[0] != next(iter(rows)) or labels.dtype.kind not in "iu"
    ):
        raise InvalidArgument(
            f"{what} set {path}: 'labels' must be one integer class index per row"
        )
    return inputs, labels


def batches(inputs: Mapping[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    rows = next(iter(inputs.values())).shape[0]
    return [{k: v[i : i + size] for k, v in inputs.items()} for i in range(0, rows, size)]
