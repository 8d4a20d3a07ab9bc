"""What a compression costs and gains, measured: sizes, parameters, accuracy against the original
and the labels, and in-process CPU latency. Pure measurement; the CLI decides what to do with it."""

from __future__ import annotations

import gzip
import statistics
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import zstandard

from edge_agent.compress.data import input_specs

LATENCY_BATCHES = (1, 8, 64)
LATENCY_RUNS = 30
LATENCY_BUDGET_S = 2.0


def compressed_sizes(data: bytes) -> dict[str, int]:
    return {
        "gzip": len(gzip.compress(data, 9)),
        "zstd": len(zstandard.ZstdCompressor(level=19).compress(data)),
    }


def parameters(model: onnx.ModelProto) -> dict[str, int]:
    """Elements in the initializers, and how many of them are not zero."""
    total = nonzero = 0
    for tensor in model.graph.initializer:
        values = onnx.numpy_helper.to_array(tensor)
        total += values.size
        nonzero += int(np.count_nonzero(values)) if values.dtype != object else values.size
    return {"total": total, "nonzero": nonzero}


def session(data: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def classifier_output(sess: ort.InferenceSession) -> str:
    """The output compared for top-1: the first floating-point output of rank 2."""
    for output in sess.get_outputs():
        if (
            output.type in ("tensor(float)", "tensor(float16)", "tensor(double)")
            and len(output.shape) == 2
        ):
            return str(output.name)
    return str(sess.get_outputs()[0].name)


def run_all(sess: ort.InferenceSession, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Every row, in batches of 64 (int8-dynamic scales activations per batch, so its answers
    depend on the batch: 64 is the serving batch size this measures)."""
    rows = next(iter(inputs.values())).shape[0]
    parts: list[list[np.ndarray]] = []
    for start in range(0, rows, 64):
        feed = {k: v[start : start + 64] for k, v in inputs.items()}
        parts.append(sess.run(None, feed))
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def accuracy_report(
    before: ort.InferenceSession,
    after: ort.InferenceSession,
    inputs: Mapping[str, np.ndarray],
    labels: np.ndarray | None,
) -> dict[str, Any]:
    names = [o.name for o in before.get_outputs()]
    reference, candidate = run_all(before, inputs), run_all(after, inputs)
    chosen = classifier_output(before)
    index = names.index(chosen)
    top_before = reference[index].argmax(axis=1)
    top_after = candidate[index].argmax(axis=1)
    errors = [
        float(np.max(np.abs(r.astype(np.float64) - c.astype(np.float64))))
        for r, c in zip(reference, candidate, strict=True)
        if r.dtype.kind == "f" and r.size
    ]
    report: dict[str, Any] = {
        "rows": int(top_before.shape[0]),
        "output": chosen,
        "top1_agreement": float(np.mean(top_before == top_after)),
        "max_abs_error": max(errors) if errors else 0.0,
    }
    if labels is not None:
        report["accuracy_before"] = float(np.mean(top_before == labels))
        report["accuracy_after"] = float(np.mean(top_after == labels))
        report["accuracy_drop"] = report["accuracy_before"] - report["accuracy_after"]
    return report


def _latency_feed(
    model: onnx.ModelProto, batch: int, sample: Mapping[str, np.ndarray] | None
) -> dict[str, np.ndarray] | None:
    feed = {}
    for name, (dtype, dims) in input_specs(model).items():
        if dims and dims[0] is not None and dims[0] != batch:
            return None  # a fixed batch size: this one cannot be measured
        if sample is not None:
            rows = sample[name]
            reps = -(-batch // rows.shape[0])
            feed[name] = np.concatenate([rows] * reps)[:batch]
        else:
            shape = [batch, *(d if d is not None else 1 for d in dims[1:])]
            feed[name] = np.zeros(shape, dtype)
    return feed


def median_latency_ms(sess: ort.InferenceSession, feed: Mapping[str, np.ndarray]) -> float:
    for _ in range(3):
        sess.run(None, dict(feed))
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < LATENCY_RUNS and (
        time.perf_counter() - started < LATENCY_BUDGET_S or len(times) < 5
    ):
        t = time.perf_counter()
        sess.run(None, dict(feed))
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def latency_report(
    model: onnx.ModelProto,
    before: ort.InferenceSession,
    after: ort.InferenceSession,
    sample: Mapping[str, np.ndarray] | None,
) -> dict[str, dict[str, float] | None]:
    out: dict[str, dict[str, float] | None] = {}
    for batch in LATENCY_BATCHES:
        feed = _latency_feed(model, batch, sample)
        if feed is None:
            out[str(batch)] = None
            continue
        out[str(batch)] = {
            "before": median_latency_ms(before, feed),
            "after": median_latency_ms(after, feed),
        }
    return out
