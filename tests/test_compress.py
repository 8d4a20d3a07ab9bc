"""`edge-agent optimize` through its CLI: every mode on the shipped digits model and a generated
CNN; the report checked against an independent recomputation; the results served by the daemon;
the accuracy guard and bad input."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import modelgen
from conftest import ROOT, Daemon

DIGITS = ROOT / "models" / "digits" / "1" / "model.onnx"
DIGITS_SET = ROOT / "models" / "digits" / "validation.npz"
MODES = ("int8-dynamic", "int8-static", "fp16", "prune")


def optimize(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", "optimize", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("cnn")
    model = modelgen.cnn(tmp / "cnn.onnx")
    x = np.random.default_rng(1).standard_normal((200, 3, 16, 16)).astype(np.float32)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    labels = session.run(None, {"x": x})[0].argmax(axis=1)  # its own fp32 answers
    np.savez(tmp / "set.npz", x=x, labels=labels)
    return model, tmp / "set.npz"


@pytest.fixture(scope="module")
def results(
    tmp_path_factory: pytest.TempPathFactory, cnn: tuple[Path, Path]
) -> dict[tuple[str, str], tuple[Path, dict[str, Any]]]:
    out = tmp_path_factory.mktemp("optimized")
    found = {}
    for name, (model, data) in {"digits": (DIGITS, DIGITS_SET), "cnn": cnn}.items():
        for mode in MODES:
            target = out / f"{name}-{mode}.onnx"
            report = out / f"{name}-{mode}.json"
            done = optimize(
                str(model),
                "--mode",
                mode,
                "--out",
                str(target),
                "--calibration",
                str(data),
                "--validation",
                str(data),
                "--report",
                str(report),
            )
            assert done.returncode == 0, done.stderr
            assert f"mode {mode}" in done.stdout and "compression_rate" in done.stdout
            found[(name, mode)] = (target, json.loads(report.read_text()))
    return found


def run(model: Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """In batches of 64 rows, as the report does: int8-dynamic picks its activation scale per
    batch, so its answers depend on what else is in the batch."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    rows = next(iter(inputs.values())).shape[0]
    parts = [
        session.run(None, {k: v[i : i + 64] for k, v in inputs.items()}) for i in range(0, rows, 64)
    ]
    return [np.concatenate([p[n] for p in parts]) for n in range(len(parts[0]))]


def sets(cnn: tuple[Path, Path]) -> dict[str, tuple[Path, dict[str, np.ndarray], np.ndarray]]:
    out = {}
    for name, (model, path) in {"digits": (DIGITS, DIGITS_SET), "cnn": cnn}.items():
        with np.load(path) as archive:
            arrays = dict(archive)
        labels = arrays.pop("labels")
        out[name] = (model, arrays, labels)
    return out


def test_reports_match_an_independent_recomputation(
    results: dict[tuple[str, str], tuple[Path, dict[str, Any]]], cnn: tuple[Path, Path]
) -> None:
    data = sets(cnn)
    for (name, _), (target, report) in results.items():
        source, inputs, labels = data[name]
        before, after = source.stat().st_size, target.stat().st_size
        assert report["size_bytes"] == {"before": before, "after": after}
        assert report["compression_rate"] == pytest.approx((before - after) / before)
        assert report["compressed_size_bytes"]["after"]["gzip"] == len(
            gzip.compress(target.read_bytes(), 9)
        )
        weights = [onnx.numpy_helper.to_array(t) for t in onnx.load(str(target)).graph.initializer]
        assert report["parameters"]["after"] == {
            "total": sum(w.size for w in weights),
            "nonzero": sum(int(np.count_nonzero(w)) for w in weights),
        }
        references, candidates = run(source, inputs), run(target, inputs)
        reference, candidate = references[0], candidates[0]
        top_ref, top_new = reference.argmax(1), candidate.argmax(1)
        v = report["validation"]
        assert v["rows"] == len(labels)
        assert v["top1_agreement"] == pytest.approx(np.mean(top_ref == top_new))
        assert v["accuracy_before"] == pytest.approx(np.mean(top_ref == labels))
        assert v["accuracy_after"] == pytest.approx(np.mean(top_new == labels))
        assert v["max_abs_error"] == pytest.approx(
            max(
                float(np.max(np.abs(r.astype(np.float64) - c.astype(np.float64))))
                for r, c in zip(references, candidates, strict=True)
                if r.dtype.kind == "f"
            )
        )
        latency = report["latency_ms_median"]
        assert set(latency) == {"1", "8", "64"}
        assert all(t["before"] > 0 and t["after"] > 0 for t in latency.values())
        assert report["accepted"] is True


def test_what_each_mode_promises(
    results: dict[tuple[str, str], tuple[Path, dict[str, Any]]], cnn: tuple[Path, Path]
) -> None:
    int8 = results[("digits", "int8-dynamic")][1]
    assert int8["compression_rate"] >= 0.7
    assert int8["validation"]["accuracy_drop"] <= 0.01  # within one point of fp32
    data = sets(cnn)
    for name in ("digits", "cnn"):
        source, inputs, _ = data[name]
        target = results[(name, "fp16")][0]
        for a, b in zip(run(source, inputs), run(target, inputs), strict=True):
            if a.dtype.kind == "f":
                assert b.dtype == a.dtype  # inputs and outputs stay float32 by default
                assert np.max(np.abs(a - b)) <= 1e-2
        pruned = results[(name, "prune")][1]
        params = pruned["parameters"]["after"]
        assert params["nonzero"] < 0.6 * params["total"]
        # The gain of pruning is in compressed transfer size, not in the file or the speed.
        zipped = pruned["compressed_size_bytes"]
        assert zipped["after"]["gzip"] < zipped["before"]["gzip"]
        assert "zstd" in zipped["after"]
        static = onnx.load(str(results[(name, "int8-static")][0]))
        assert any(n.op_type == "QuantizeLinear" for n in static.graph.node)


def test_every_result_serves_through_the_daemon(
    results: dict[tuple[str, str], tuple[Path, dict[str, Any]]],
    cnn: tuple[Path, Path],
    tmp_path: Path,
    start_daemon: Callable[..., Daemon],
) -> None:
    import tritonclient.grpc as grpcclient

    repo = tmp_path / "repo"
    for (name, mode), (target, _) in results.items():
        (repo / f"{name}_{mode}" / "1").mkdir(parents=True)
        shutil.copy(target, repo / f"{name}_{mode}" / "1" / "model.onnx")
    daemon = start_daemon(
        "--model-repository", str(repo), "--execution-providers", "cpu"
    ).wait_started()
    data = sets(cnn)
    with grpcclient.InferenceServerClient(daemon.url) as client:
        for (name, mode), (target, _) in results.items():
            _, inputs, _ = data[name]
            ((input_name, array),) = inputs.items()
            rows = array[:4]
            tensor = grpcclient.InferInput(input_name, list(rows.shape), "FP32")
            tensor.set_data_from_numpy(rows)
            answer = client.infer(f"{name}_{mode}", [tensor])
            first = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
            out = first.get_outputs()[0].name
            expected = first.run(None, {input_name: rows})[0]
            assert np.allclose(answer.as_numpy(out), expected, atol=1e-5), (name, mode)


def test_the_accuracy_guard(tmp_path: Path) -> None:
    out, report = tmp_path / "pruned.onnx", tmp_path / "pruned.json"
    refused = optimize(
        str(DIGITS),
        "--mode",
        "prune",
        "--sparsity",
        "0.5",
        "--out",
        str(out),
        "--validation",
        str(DIGITS_SET),
        "--max-accuracy-drop",
        "0.01",
        "--report",
        str(report),
    )
    assert refused.returncode == 1 and "not written" in refused.stderr
    assert not out.exists() and not list(tmp_path.glob(".pruned*"))
    written = json.loads(report.read_text())
    assert written["accepted"] is False and written["validation"]["accuracy_drop"] > 0.01
    accepted = optimize(
        str(DIGITS),
        "--mode",
        "int8-dynamic",
        "--out",
        str(out),
        "--validation",
        str(DIGITS_SET),
        "--max-accuracy-drop",
        "0.01",
    )
    assert accepted.returncode == 0 and out.exists()


def _one_line_error(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edge-agent optimize:"), done.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_bad_input(tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    _one_line_error(optimize(str(junk), "--mode", "fp16", "--out", str(out)), "not a readable ONNX")
    _one_line_error(
        optimize(str(DIGITS), "--mode", "int8-static", "--out", str(out)), "needs --calibration"
    )
    wrong_name = tmp_path / "wrong_name.npz"
    np.savez(wrong_name, pixels=np.zeros((4, 64), np.float32))
    _one_line_error(
        optimize(
            str(DIGITS),
            "--mode",
            "int8-static",
            "--out",
            str(out),
            "--calibration",
            str(wrong_name),
        ),
        "missing ['input']",
        "unknown ['pixels']",
    )
    wrong_shape = tmp_path / "wrong_shape.npz"
    np.savez(wrong_shape, input=np.zeros((4, 63), np.float32))
    _one_line_error(
        optimize(
            str(DIGITS),
            "--mode",
            "int8-static",
            "--out",
            str(out),
            "--calibration",
            str(wrong_shape),
        ),
        "shape [4, 63]",
    )
    unlabeled = tmp_path / "unlabeled.npz"
    np.savez(unlabeled, input=np.zeros((4, 64), np.float32))
    _one_line_error(
        optimize(
            str(DIGITS),
            "--mode",
            "fp16",
            "--out",
            str(out),
            "--validation",
            str(unlabeled),
            "--max-accuracy-drop",
            "0.01",
        ),
        "labels",
    )
    no_weights = modelgen.echo(tmp_path / "echo.onnx")
    _one_line_error(
        optimize(str(no_weights), "--mode", "int8-dynamic", "--out", str(out)),
        "nothing to quantize",
    )
    _one_line_error(optimize(str(no_weights), "--mode", "fp16", "--out", str(out)), "no float32")
    _one_line_error(optimize(str(no_weights), "--mode", "prune", "--out", str(out)), "prune")
    _one_line_error(
        optimize(str(DIGITS), "--mode", "prune", "--sparsity", "1.5", "--out", str(out)), "sparsity"
    )
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["junk.onnx", "wrong_name.npz", "wrong_shape.npz", "unlabeled.npz", "echo.onnx"]
    )
