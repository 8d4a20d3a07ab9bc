"""Size, accuracy and CPU latency of each `edge-agent optimize` mode.

    .venv/bin/python benchmarks/compress.py [--out FILE.json]

Models: the shipped digits classifier (its validation set has real labels), the small CNN and the
wide MLP of benchmarks/models.py (random inputs; their labels are the fp32 model's own answers,
so fp32 accuracy is 1 by construction and "accuracy after" is top-1 agreement). Each mode runs
through the real command with --report; calibration (int8-static) uses the validation inputs.
Latency: in-process ONNX Runtime, CPU provider, median of up to 30 runs per batch size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import models  # noqa: E402

MODES = ("int8-dynamic", "int8-static", "fp16", "prune")


def own_labels(model: Path, name: str, shape: tuple[int, ...], out: Path) -> Path:
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    labels = session.run(None, {name: x})[0].argmax(axis=1)
    np.savez(out, **{name: x, "labels": labels})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "compress_results.json")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        cnn = models.small_cnn(tmp / "cnn.onnx")
        mlp = models.wide_mlp(tmp / "mlp.onnx")
        cases = {
            "digits": (ROOT / "models/digits/1/model.onnx", ROOT / "models/digits/validation.npz"),
            "small_cnn": (cnn, own_labels(cnn, "input", (256, 1, 28, 28), tmp / "cnn.npz")),
            "wide_mlp": (mlp, own_labels(mlp, "input", (256, 784), tmp / "mlp.npz")),
        }
        for name, (model, data) in cases.items():
            for mode in MODES:
                report = tmp / f"{name}-{mode}.json"
                done = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "edge_agent",
                        "optimize",
                        str(model),
                        "--mode",
                        mode,
                        "--out",
                        str(tmp / f"{name}-{mode}.onnx"),
                        "--calibration",
                        str(data),
                        "--validation",
                        str(data),
                        "--report",
                        str(report),
                    ],
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                )
                if done.returncode != 0:
                    rows.append({"model": name, "mode": mode, "error": done.stderr.strip()})
                    print(f"{name} {mode}: {done.stderr.strip()}", flush=True)
                    continue
                r = json.loads(report.read_text())
                rows.append({"model": name, **r})
                v, lat = r["validation"], r["latency_ms_median"]
                print(
                    f"| {name} | {mode} | {r['size_bytes']['before']:,} → "
                    f"{r['size_bytes']['after']:,} B | {r['compression_rate']:.3f} | "
                    f"{r['compressed_size_bytes']['after']['zstd']:,} B | "
                    f"{v['accuracy_before']:.4f} → {v['accuracy_after']:.4f} | "
                    f"{v['top1_agreement']:.4f} | {v['max_abs_error']:.3g} | "
                    + " | ".join(
                        f"{lat[b]['before']:.3f} → {lat[b]['after']:.3f}" for b in ("1", "8", "64")
                    )
                    + " |",
                    flush=True,
                )
    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
