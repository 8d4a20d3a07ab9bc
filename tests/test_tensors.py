"""The tensor codec: pure functions, no server."""

from __future__ import annotations

import struct
from types import SimpleNamespace

import numpy as np
import pytest

from edge_agent.common.tensors import (
    NUMPY_DTYPES,
    check_shape,
    decode_raw,
    decode_typed,
    encode,
    numpy_datatype,
)
from edge_agent.errors import InvalidArgument


@pytest.mark.parametrize("datatype", [d for d in NUMPY_DTYPES if d != "BYTES"])
def test_raw_round_trip_is_zero_copy(datatype: str) -> None:
    array = np.arange(6).astype(NUMPY_DTYPES[datatype]).reshape(2, 3)
    name, shape, raw = encode(array)
    assert (name, shape) == (datatype, [2, 3])
    decoded = decode_raw("t", datatype, shape, raw)
    np.testing.assert_array_equal(decoded, array)
    assert not decoded.flags.owndata  # a view on the received bytes


def test_big_endian_arrays_go_out_little_endian() -> None:
    array = np.array([1, 2], dtype=">i4")
    _, _, raw = encode(array)
    assert raw == struct.pack("<2i", 1, 2)


def test_bytes_round_trip() -> None:
    array = np.array([b"", b"a", b"\x00\xff" * 10], dtype=object)
    datatype, shape, raw = encode(array)
    assert datatype == "BYTES"
    assert raw[:4] == b"\0\0\0\0"
    assert decode_raw("t", "BYTES", shape, raw).tolist() == array.tolist()


def test_absurd_shape_is_refused_before_allocation() -> None:
    with pytest.raises(InvalidArgument, match="needs 4398046511104 bytes, got 4"):
        decode_raw("t", "FP32", [2**40], b"\0" * 4)
    with pytest.raises(InvalidArgument, match="need at least"):
        decode_raw("t", "BYTES", [2**40], b"\0" * 4)


def contents(**fields: list[object]) -> SimpleNamespace:
    names = ["bool", "int", "int64", "uint", "uint64", "fp32", "fp64", "bytes"]
    base: dict[str, list[object]] = {f"{n}_contents": [] for n in names}
    return SimpleNamespace(**{**base, **fields})


def test_typed_contents() -> None:
    got = decode_typed("t", "INT16", [2, 2], contents(int_contents=[1, -2, 3, 32767]))
    assert got.dtype == np.int16 and got.tolist() == [[1, -2], [3, 32767]]
    got = decode_typed("t", "UINT64", [1], contents(uint64_contents=[2**64 - 1]))
    assert got.tolist() == [2**64 - 1]
    with pytest.raises(InvalidArgument, match="out of range for UINT8"):
        decode_typed("t", "UINT8", [1], contents(uint_contents=[256]))
    with pytest.raises(InvalidArgument, match="must be sent raw"):
        decode_typed("t", "FP16", [1], contents(fp32_contents=[1.0]))


@pytest.mark.parametrize(
    ("shape", "dims", "max_batch", "message"),
    [
        ([1, 3], [3], 4, None),
        ([4, 3], [-1], 4, None),
        ([5, 3], [3], 4, "outside 1..4"),
        ([1, 2], [3], 4, "does not match"),
        ([3], [3], 4, "has 1 dimensions, the model expects 2 [batch, 3]"),
        ([2, 3], [2, 3], 0, None),
        ([2, -3], [2, -1], 0, "negative"),
    ],
)
def test_check_shape(
    shape: list[int], dims: list[int], max_batch: int, message: str | None
) -> None:
    if message is None:
        check_shape("t", shape, dims, max_batch)
    else:
        with pytest.raises(InvalidArgument, match=message.replace("[", r"\[").replace("]", r"\]")):
            check_shape("t", shape, dims, max_batch)


def test_numpy_datatype() -> None:
    assert numpy_datatype(np.dtype(">f8")) == "FP64"
    assert numpy_datatype(np.dtype("U3")) == "BYTES"
    with pytest.raises(InvalidArgument):
        numpy_datatype(np.dtype("complex64"))
