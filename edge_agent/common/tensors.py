"""Tensor codec of the KServe v2 protocol: pure functions between wire bytes and numpy arrays.

No protobuf import here (see edge_agent/_proto/__init__.py): callers pass the fields. Every
claimed shape is checked against the bytes actually received before anything is allocated.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from edge_agent.errors import InvalidArgument

# Protocol datatype -> numpy dtype (the wire is little-endian, row-major). BYTES is an object
# array of `bytes`. BF16 exists in the protocol but not in numpy, so it is refused with a reason.
NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}

# ONNX Runtime's type strings -> protocol datatype.
ORT_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
    "tensor(bfloat16)": "BF16",
}


def config_type_name(datatype: str) -> str:
    """Protocol datatype -> model_config DataType enum name (BYTES is TYPE_STRING)."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def protocol_datatype(config_type: str) -> str:
    """model_config DataType enum name -> protocol datatype."""
    return "BYTES" if config_type == "TYPE_STRING" else config_type.removeprefix("TYPE_")


def element_count(name: str, shape: Sequence[int]) -> int:
    """Number of elements of a claimed shape; negative dimensions are refused."""
    count = 1
    for dim in shape:
        if dim < 0:
            raise InvalidArgument(f"input '{name}': shape {list(shape)} has a negative dimension")
        count *= dim
    return count


def _dtype(name: str, datatype: str) -> np.dtype[Any]:
    try:
        return NUMPY_DTYPES[datatype]
    except KeyError:
        raise InvalidArgument(f"input '{name}': unsupported datatype {datatype!r}") from None


def decode_raw(
    name: str, datatype: str, shape: Sequence[int], raw: bytes | memoryview
) -> np.ndarray:
    """Raw little-endian bytes -> array, zero-copy for fixed-size types (read-only view)."""
    dtype = _dtype(name, datatype)
    count = element_count(name, shape)
    if datatype == "BYTES":
        return decode_bytes_elements(name, bytes(raw), count).reshape(tuple(shape))
    expected = count * dtype.itemsize
    if expected != len(raw):
        raise InvalidArgument(
            f"input '{name}': shape {list(shape)} of {datatype} needs {expected} bytes, "
            f"got {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(tuple(shape))


def decode_bytes_elements(name: str, raw: bytes, count: int) -> np.ndarray:
    """BYTES wire format: each element is a 4-byte little-endian length, then that many bytes."""
    if count * 4 > len(raw):  # each element costs at least its length prefix: check before work
        raise InvalidArgument(
            f"input '{name}': {count} BYTES elements need at least {count * 4} bytes, "
            f"got {len(raw)}"
        )
    out = np.empty(count, dtype=object)
    view = memoryview(raw)
    offset = 0
    for i in range(count):
        if offset + 4 > len(raw):
            raise InvalidArgument(f"input '{name}': BYTES element {i} is cut off")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidArgument(
                f"input '{name}': BYTES element {i} claims {length} bytes, "
                f"only {len(raw) - offset} remain"
            )
        out[i] = bytes(view[offset : offset + length])
        offset += length
    if offset != len(raw):
        raise InvalidArgument(
            f"input '{name}': {len(raw) - offset} bytes left over after {count} BYTES elements"
        )
    return out


class TensorContents(Protocol):
    """The typed `InferTensorContents` message, as far as the decoder reads it."""

    bool_contents: Sequence[bool]
    int_contents: Sequence[int]
    int64_contents: Sequence[int]
    uint_contents: Sequence[int]
    uint64_contents: Sequence[int]
    fp32_contents: Sequence[float]
    fp64_contents: Sequence[float]
    bytes_contents: Sequence[bytes]


# Which InferTensorContents field carries each datatype (FP16 travels raw only).
CONTENTS_FIELDS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def decode_typed(
    name: str, datatype: str, shape: Sequence[int], contents: TensorContents
) -> np.ndarray:
    """Typed `contents` -> array; the values must sit in the field for the datatype."""
    dtype = _dtype(name, datatype)
    field = CONTENTS_FIELDS.get(datatype)
    if field is None:
        raise InvalidArgument(f"input '{name}': {datatype} data must be sent raw, not in contents")
    for other in set(CONTENTS_FIELDS.values()) - {field}:
        if len(getattr(contents, other)):
            raise InvalidArgument(
                f"input '{name}': {datatype} data belongs in {field}, not {other}"
            )
    values = getattr(contents, field)
    count = element_count(name, shape)
    if len(values) != count:
        raise InvalidArgument(
            f"input '{name}': shape {list(shape)} needs {count} values, {field} has {len(values)}"
        )
    if datatype == "BYTES":
        out = np.empty(count, dtype=object)
        out[:] = list(values)
        return out.reshape(tuple(shape))
    if dtype.kind in "iu" and count:
        wide = np.asarray(values, dtype=np.uint64 if datatype == "UINT64" else np.int64)
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidArgument(f"input '{name}': a value is out of range for {datatype}")
        return wide.astype(dtype).reshape(tuple(shape))
    return np.asarray(values, dtype=dtype).reshape(tuple(shape))


def encode(array: np.ndarray) -> tuple[str, list[int], bytes]:
    """Array -> (datatype, shape, raw bytes) for raw_output_contents."""
    shape = list(array.shape)
    if array.dtype.kind in "OSU":
        parts: list[bytes] = []
        for item in array.reshape(-1):
            data = item.encode() if isinstance(item, str) else bytes(item)
            parts.append(struct.pack("<I", len(data)))
            parts.append(data)
        return "BYTES", shape, b"".join(parts)
    datatype = numpy_datatype(array.dtype)
    wire = NUMPY_DTYPES[datatype]
    if array.dtype != wire:  # the wire is little-endian: only a big-endian array differs
        array = array.astype(wire)
    return datatype, shape, array.tobytes()  # tobytes() writes C order whatever the layout


def numpy_datatype(dtype: np.dtype[Any]) -> str:
    """numpy dtype -> protocol datatype."""
    known = _DATATYPE_OF.get(dtype)  # every response asks: remembered per dtype
    if known is not None:
        return known
    if dtype.kind in "OSU":
        return "BYTES"
    for datatype, candidate in NUMPY_DTYPES.items():
        if datatype != "BYTES" and candidate == dtype.newbyteorder("<"):
            _DATATYPE_OF[dtype] = datatype
            return datatype
    raise InvalidArgument(f"numpy dtype {dtype} has no protocol datatype")


_DATATYPE_OF: dict[np.dtype[Any], str] = {}


def check_shape(name: str, shape: Sequence[int], dims: Sequence[int], max_batch_size: int) -> None:
    """A request's shape against the model's dims (batch dimension excluded when batching)."""
    batching = max_batch_size > 0
    body = shape[1:] if batching else shape
    if len(body) == len(dims) and (not batching or 1 <= shape[0] <= max_batch_size):
        # The common case, checked without building anything (every request comes here).
        for got, want in zip(body, dims, strict=True):
            if got < 0 or (want != -1 and got != want):
                break
        else:
            return
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"input '{name}': shape {list(shape)} has a negative dimension")
    expected: list[int | str] = ["batch", *dims] if batching else list(dims)
    if len(shape) != len(expected):
        raise InvalidArgument(
            f"input '{name}': shape {list(shape)} has {len(shape)} dimensions, the model expects "
            f"{len(expected)} {_show(expected)}"
        )
    if batching and not 1 <= shape[0] <= max_batch_size:
        raise InvalidArgument(
            f"input '{name}': batch size {shape[0]} is outside 1..{max_batch_size} (max_batch_size)"
        )
    raise InvalidArgument(
        f"input '{name}': shape {list(shape)} does not match the model's {_show(expected)}"
    )


def _show(dims: Sequence[int | str]) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def bytes_to_text(name: str, array: np.ndarray) -> np.ndarray:
    """BYTES elements -> str for ONNX Runtime, whose Python API takes string tensors as text
    (it would turn a `bytes` object into its repr). Elements that are not UTF-8 are refused."""
    out = np.empty(array.shape, dtype=object)
    flat_in, flat_out = array.reshape(-1), out.reshape(-1)
    for i, item in enumerate(flat_in):
        try:
            flat_out[i] = item.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument(
                f"input '{name}': BYTES element {i} is not UTF-8 text, which ONNX Runtime's string "
                "tensors require"
            ) from None
    return out
