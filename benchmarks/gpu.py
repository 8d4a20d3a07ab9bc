"""The CUDA path measured (BENCHMARKS.md "GPU"); run by scripts/gpu_check.sh on a lent GPU:

    python benchmarks/gpu.py [--provider cuda|cpu] [--quick] [--out FILE.json]

For the wide MLP (784-4096-4096-10) and a convolutional edge detector with a 3x640x640 FP32
input (benchmarks/transport.py's, with a dynamic batch), each served by the daemon in four ways:
`run` (plain session.run), `io_binding`, `cuda_graph` (IOBinding + a CUDA graph per batch size)
and `cuda_shm` (IOBinding, perf_analyzer --shared-memory cuda): perf_analyzer's throughput and
p50/p99 at concurrency 1, 4, 16, 64, beside in-process ONNX Runtime on the same provider at its
best batch. Then the hot swap of the wide MLP (benchmarks/swap.py) with `overlap` and
`drain_first`, sampling GPU memory (nvidia-smi, every 100 ms): steady and peak.

`--provider cpu` rehearses the whole script on a machine without a GPU (the CUDA-only modes are
reported as unavailable there), so that the GPU run is a single command that works.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import models, swap, transport  # noqa: E402
from benchmarks.run import PYTHON, Server, free_port, perf_analyzer  # noqa: E402

MODES = ("run", "io_binding", "cuda_graph", "cuda_shm")
CONCURRENCY = (1, 4, 16, 64)


def batchable_detector(path: Path) -> Path:
    """transport.detector with a dynamic batch dimension."""
    transport.detector(path)
    model = onnx.load(str(path))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    onnx.save(model, str(path))
    return path


def config(mode: str, provider: str, max_batch: int) -> str:
    text = f"max_batch_size: {max_batch}\ndynamic_batching {{}}\n"
    kind = "KIND_GPU" if provider == "cuda" else "KIND_CPU"
    text += f"instance_group [ {{ count: 1, kind: {kind} }} ]\n"
    binding = {"run": "off", "io_binding": "on", "cuda_graph": "on", "cuda_shm": "on"}[mode]
    text += f'parameters {{ key: "io_binding" value: {{ string_value: "{binding}" }} }}\n'
    if mode == "cuda_graph":
        text += 'parameters { key: "cuda_graph" value: { string_value: "true" } }\n'
    return text


WINDOW_MS = {"value": 3000}  # perf_analyzer's measurement window (--window-ms)


def perf(port: int, concurrency: int, quick: bool, extra: list[str]) -> dict[str, float]:
    return perf_analyzer(port, concurrency, quick, extra, 1000 if quick else WINDOW_MS["value"])


def serve_mode(
    work: Path, name: str, model: Path, mode: str, provider: str, max_batch: int, quick: bool
) -> dict[str, Any]:
    repo = work / f"repo-{name}-{mode}"
    (repo / "model" / "1").mkdir(parents=True)
    shutil.copy(model, repo / "model" / "1" / "model.onnx")
    (repo / "model" / "config.pbtxt").write_text(config(mode, provider, max_batch))
    port = free_port()
    log = work / f"{name}-{mode}.log"
    server = Server(
        [
            PYTHON, "-m", "edge_agent", "serve", "--model-repository", str(repo),
            "--grpc-address", f"127.0.0.1:{port}", "--metrics-address", "127.0.0.1:0",
            "--execution-providers", provider, "--allow-shared-memory", "--log-format", "json",
        ],
        port,
        log,
    )  # fmt: skip
    try:
        events = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
        loaded = [e for e in events if e.get("event") == "model.loaded"]
        execution = loaded[0].get("execution") if loaded else None
        result: dict[str, Any] = {"execution": execution, "provider": provider}
        if mode == "cuda_graph" and execution != "cuda_graph":
            return {**result, "unavailable": "CUDA graphs need the CUDA provider"}
        if mode == "cuda_shm" and provider != "cuda":
            return {**result, "unavailable": "CUDA shared memory needs a CUDA device"}
        extra = ["--shared-memory", "cuda", "--output-shared-memory-size", str(64 << 20)]
        for concurrency in CONCURRENCY if not quick else (1, 16):
            result[str(concurrency)] = perf(
                port, concurrency, quick, extra if mode == "cuda_shm" else []
            )
            print(f"  {name} {mode} c={concurrency}: {result[str(concurrency)]}", flush=True)
        return result
    finally:
        server.stop()


def in_process(model: Path, provider: str, shape: tuple[int, ...], quick: bool) -> dict[str, Any]:
    providers = ["CUDAExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(model), providers=providers)
    name = session.get_inputs()[0].name
    rates: dict[int, float] = {}
    for batch in (1, 4, 16, 64):
        data = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
        session.run(None, {name: data})
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < (0.5 if quick else 2.0):
            session.run(None, {name: data})
            runs += 1
        rates[batch] = runs * batch / (time.perf_counter() - started)
    best = max(rates, key=lambda b: rates[b])
    return {"samples_per_s": rates, "best_batch": best, "best": rates[best]}


class GpuMemory:
    """nvidia-smi's memory.used for GPU 0, sampled every 100 ms (nothing where it is absent)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.available = shutil.which("nvidia-smi") is not None

    def _sample(self) -> None:
        while not self._stop.is_set():
            done = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i",
                 "0"],
                capture_output=True, text=True, timeout=10,
            )  # fmt: skip
            if done.returncode == 0 and done.stdout.strip():
                self.samples.append(float(done.stdout.split()[0]))
            self._stop.wait(0.1)

    def __enter__(self) -> GpuMemory:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.available:
            self._thread.join(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--provider", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="concurrency 1 and 16, 1 s windows")
    parser.add_argument("--window-ms", type=int, default=3000, help="perf_analyzer's window")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "gpu_results.json")
    args = parser.parse_args()
    WINDOW_MS["value"] = args.window_ms
    results: dict[str, Any] = {"provider": args.provider, "models": {}, "swaps": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cases = {
            "wide_mlp": (models.wide_mlp(work / "wide.onnx"), (784,), 64),
            "detector_640": (batchable_detector(work / "detector.onnx"), (3, 640, 640), 8),
        }
        for name, (model, shape, max_batch) in cases.items():
            entry: dict[str, Any] = {
                "in_process": in_process(model, args.provider, shape, args.quick)
            }
            print(f"{name} in-process: {entry['in_process']}", flush=True)
            for mode in MODES:
                entry[mode] = serve_mode(
                    work, name, model, mode, args.provider, max_batch, args.quick
                )
            results["models"][name] = entry
        wide = cases["wide_mlp"][0]
        for policy in ("overlap", "drain_first"):
            with GpuMemory() as memory:
                case = swap.run_case(work, "wide_mlp", wide, 784, policy, args.quick, args.provider)
            if memory.samples:
                case["gpu_memory_mib"] = {
                    "first": memory.samples[0],
                    "peak": max(memory.samples),
                    "median": float(np.median(memory.samples)),
                }
            results["swaps"][policy] = case
            print(f"swap {policy}: {json.dumps(case)}", flush=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
