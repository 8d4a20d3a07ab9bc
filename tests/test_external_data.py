"""External-data references are validated before ONNX Runtime opens them (pure, no server)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import modelgen
from edge_agent.errors import ModelLoadError
from edge_agent.runtime.external_data import validate_external_data


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return modelgen.matmul_external(tmp_path / "1")


def test_plain_external_file_passes(model: Path) -> None:
    assert validate_external_data(model) == ["weights.bin"]


@pytest.mark.parametrize(
    "location",
    ["../weights.bin", "/etc/passwd", "sub/weights.bin", "..", ".", "", "a\\b"],
)
def test_location_must_be_a_plain_name(model: Path, location: str) -> None:
    modelgen.set_external_location(model, location)
    with pytest.raises(ModelLoadError, match="not a plain file name"):
        validate_external_data(model)


def test_symlink_refused(model: Path, tmp_path: Path) -> None:
    (model.parent / "link.bin").symlink_to(model.parent / "weights.bin")
    modelgen.set_external_location(model, "link.bin")
    with pytest.raises(ModelLoadError, match="not a regular file"):
        validate_external_data(model)


def test_hardlink_refused(model: Path, tmp_path: Path) -> None:
    os.link(model.parent / "weights.bin", tmp_path / "elsewhere.bin")
    with pytest.raises(ModelLoadError, match="2 hard links"):
        validate_external_data(model)


def test_directory_refused(model: Path) -> None:
    (model.parent / "adir").mkdir()
    modelgen.set_external_location(model, "adir")
    with pytest.raises(ModelLoadError, match="not a regular file"):
        validate_external_data(model)


def test_missing_file_refused(model: Path) -> None:
    modelgen.set_external_location(model, "absent.bin")
    with pytest.raises(ModelLoadError, match="No such file"):
        validate_external_data(model)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"offset": "60", "length": "64"}, "outside"),
        ({"offset": "0", "length": "65"}, "outside"),
        ({"offset": "-1", "length": "4"}, "outside"),
        ({"offset": "x"}, "not integers"),
    ],
)
def test_range_must_lie_inside_the_file(model: Path, fields: dict[str, str], message: str) -> None:
    modelgen.set_external_location(model, "weights.bin", **fields)
    with pytest.raises(ModelLoadError, match=message):
        validate_external_data(model)


def test_not_onnx(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="not a readable ONNX model"):
        validate_external_data(path)
