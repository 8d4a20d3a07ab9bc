"""Validation of ONNX external-data references before ONNX Runtime opens them.

Every tensor counts (common/onnxgraph.py: sparse initializers, node attributes, subgraphs,
functions), not only graph initializers. External-data `location`s are an attack surface
(CVE-2024-27318 and later: `../`, absolute paths, symlinks, hardlinks). ONNX Runtime memory-maps
what they name, so every reference must be a plain file name inside the version directory,
naming a regular file with a single link, and its offset+length must lie inside that file.
Anything else refuses the model.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import onnx

from edge_agent.common.onnxgraph import model_tensors
from edge_agent.errors import ModelLoadError


def _check_name(location: str, tensor: str) -> None:
    plain = (
        location
        and location not in (".", "..")
        and "/" not in location
        and "\\" not in location
        and "\0" not in location
        and not os.path.isabs(location)
    )
    if not plain:
        raise ModelLoadError(
            f"external data of tensor '{tensor}': location {location!r} is not a plain file name "
            "inside the version directory"
        )


def validate_external_data(model_path: Path) -> list[str]:
    """Check every external-data reference of `model_path`; returns the file names referenced."""
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ValueError...
        raise ModelLoadError(f"{model_path.name} is not a readable ONNX model: {exc}") from exc
    version_dir = model_path.parent
    referenced: list[str] = []
    for tensor in model_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {e.key: e.value for e in tensor.external_data}
        location = entries.get("location", "")
        _check_name(location, tensor.name)
        path = version_dir / location
        try:
            info = path.lstat()
        except OSError as exc:
            raise ModelLoadError(
                f"external data of tensor '{tensor.name}': {location!r}: {exc.strerror}"
            ) from exc
        if not stat.S_ISREG(info.st_mode):
            raise ModelLoadError(
                f"external data of tensor '{tensor.name}': {location!r} is not a regular file "
                "(symlinks and special files are refused)"
            )
        if info.st_nlink != 1:
            raise ModelLoadError(
                f"external data of tensor '{tensor.name}': {location!r} has {info.st_nlink} hard "
                "links (hardlinked weight files are refused)"
            )
        try:
            offset = int(entries.get("offset", "0"))
            length = int(entries["length"]) if "length" in entries else info.st_size - offset
        except ValueError as exc:
            raise ModelLoadError(
                f"external data of tensor '{tensor.name}': offset/length are not integers"
            ) from exc
        if offset < 0 or length < 0 or offset + length > info.st_size:
            raise ModelLoadError(
                f"external data of tensor '{tensor.name}': bytes {offset}..{offset + length} lie "
                f"outside {location!r} ({info.st_size} bytes)"
            )
        referenced.append(location)
    return referenced
