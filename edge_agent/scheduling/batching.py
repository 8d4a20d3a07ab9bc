"""Collate and split: pure functions between per-request tensors and one batch."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np


def shape_key(feeds: Mapping[str, np.ndarray]) -> Hashable:
    """Requests batch together only when every input agrees on dtype and non-batch shape."""
    return tuple(sorted((name, a.dtype.str, a.shape[1:]) for name, a in feeds.items()))


def collate(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One concatenation per input along the batch dimension; a single part is passed as is."""
    if len(parts) == 1:
        return dict(parts[0])
    return {name: np.concatenate([p[name] for p in parts], axis=0) for name in parts[0]}


def union_outputs(requested: Sequence[Sequence[str]]) -> list[str]:
    """Every output any request of the batch asked for, in first-asked order."""
    seen: dict[str, None] = {}
    for names in requested:
        seen.update(dict.fromkeys(names))
    return list(seen)


def split(
    results: Mapping[str, np.ndarray], rows: Sequence[int], requested: Sequence[Sequence[str]]
) -> list[list[np.ndarray]]:
    """Each request's rows of each output it asked for (views, no copies)."""
    out: list[list[np.ndarray]] = []
    start = 0
    for count, names in zip(rows, requested, strict=True):
        out.append([results[name][start : start + count] for name in names])
        start += count
    return out
