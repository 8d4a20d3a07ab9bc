"""The optional golden check of a model version, run before it may serve.

`<version>/golden.npz` holds inputs as `input/<name>`, expected outputs as `output/<name>` (batch
dimension included), and optionally `atol` / `rtol` scalars (defaults 1e-4 / 1e-3). Every listed
output must match (exactly for strings), or the version is refused with the worst difference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.common.layout import GOLDEN_FILE
from edge_agent.errors import ModelLoadError

Golden = tuple[dict[str, np.ndarray], dict[str, np.ndarray], float, float]


def read_golden(path: Path, inputs: set[str]) -> Golden | None:
    """The golden file's (inputs, expected outputs, atol, rtol), or None when there is none."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except Exception as exc:
        raise ModelLoadError(f"{path.parent.name}/{GOLDEN_FILE} is unreadable: {exc}") from exc
    feeds = {k.removeprefix("input/"): v for k, v in arrays.items() if k.startswith("input/")}
    expected = {k.removeprefix("output/"): v for k, v in arrays.items() if k.startswith("output/")}
    if not feeds or not expected:
        raise ModelLoadError(f"{GOLDEN_FILE} needs input/<name> and output/<name> arrays")
    unknown = sorted(set(feeds) - set(inputs))
    if unknown:
        raise ModelLoadError(f"{GOLDEN_FILE}: unknown inputs {unknown}")
    for name, array in feeds.items():
        if array.dtype.kind in "SU":  # ORT takes strings as an object array of str
            feeds[name] = array.astype(str).astype(object)
    atol = float(arrays.get("atol", 1e-4))
    rtol = float(arrays.get("rtol", 1e-3))
    return feeds, expected, atol, rtol


def check_golden(
    session: Any,
    feeds: dict[str, np.ndarray],
    expected: dict[str, np.ndarray],
    atol: float,
    rtol: float,
) -> None:
    names = list(expected)
    try:
        produced = session.run(names, feeds)
    except Exception as exc:
        raise ModelLoadError(f"golden check: the model failed on the golden inputs: {exc}") from exc
    for name, want, got in zip(names, (expected[n] for n in names), produced, strict=True):
        got = np.asarray(got)
        if got.shape != want.shape:
            raise ModelLoadError(
                f"golden check failed: output '{name}' has shape {list(got.shape)}, "
                f"expected {list(want.shape)}"
            )
        if want.dtype.kind in "SUO" or got.dtype.kind in "SUO":
            if not np.array_equal(got.astype(str), want.astype(str)):
                raise ModelLoadError(f"golden check failed: output '{name}' differs")
            continue
        if not np.allclose(got, want, atol=atol, rtol=rtol):
            worst = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
            raise ModelLoadError(
                f"golden check failed: output '{name}' differs by up to {worst:g} "
                f"(atol {atol:g}, rtol {rtol:g})"
            )
