"""HTTP/REST beside gRPC on the same daemon (BENCHMARKS.md "HTTP"):

    .venv/bin/python benchmarks/rest.py [--quick] [--out FILE.json]

For the shipped `digits` model and the wide MLP (784-4096-4096-10), one daemon per model with
both listeners; Triton's perf_analyzer at concurrency 1, 16, 64 over gRPC, HTTP with binary
tensors (`--input-tensor-format binary`, its default) and HTTP with JSON tensors
(`--input-tensor-format json --output-tensor-format json`). Same settings as benchmarks/run.py
(3 s windows, 25% stability).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import models  # noqa: E402
from benchmarks.run import PYTHON, Server, free_port, perf_analyzer  # noqa: E402

MODES = {
    "grpc": ["-i", "grpc"],
    "http binary": ["-i", "http"],
    "http json": ["-i", "http", "--input-tensor-format", "json", "--output-tensor-format", "json"],
}


def measure(port: int, mode: str, concurrency: int, quick: bool) -> dict[str, float]:
    return perf_analyzer(port, concurrency, quick, MODES[mode])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "http_results.json")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sources = {
            "digits": ROOT / "models" / "digits" / "1" / "model.onnx",
            "wide_mlp": models.wide_mlp(work / "wide.onnx"),
        }
        for name, source in sources.items():
            repo = work / f"repo-{name}"
            (repo / "model" / "1").mkdir(parents=True)
            (repo / "model" / "1" / "model.onnx").symlink_to(source)
            (repo / "model" / "config.pbtxt").write_text(
                "max_batch_size: 64\ndynamic_batching: {}\n"
            )
            grpc_port, http_port = free_port(), free_port()
            server = Server(
                [
                    PYTHON, "-m", "edge_agent", "serve", "--model-repository", str(repo),
                    "--grpc-address", f"127.0.0.1:{grpc_port}",
                    "--http-address", f"127.0.0.1:{http_port}", "--metrics-address", "127.0.0.1:0",
                    "--execution-providers", "cpu", "--log-level", "warning",
                ],
                grpc_port,
            )  # fmt: skip
            try:
                results[name] = {}
                for mode in MODES:
                    port = grpc_port if mode == "grpc" else http_port
                    results[name][mode] = {}
                    for concurrency in (1, 16, 64):
                        cell = measure(port, mode, concurrency, args.quick)
                        results[name][mode][str(concurrency)] = cell
                        print(f"{name} {mode} c={concurrency}: {cell}", file=sys.stderr)
            finally:
                server.stop()
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))


def report(results: dict[str, Any]) -> str:
    lines = []
    for name, modes in results.items():
        lines += [f"### {name}", "", "| concurrency | " + " | ".join(MODES) + " | binary / gRPC |"]
        lines.append("| --- " * (len(MODES) + 2) + "|")
        for c in ("1", "16", "64"):
            cells = [
                f"{modes[m][c]['throughput']:,.0f}/s ({modes[m][c]['p50_ms']:.2f} / "
                f"{modes[m][c]['p99_ms']:.2f} ms)"
                for m in MODES
            ]
            ratio = modes["http binary"][c]["throughput"] / modes["grpc"][c]["throughput"]
            lines.append(f"| {c} | " + " | ".join(cells) + f" | {ratio:.2f} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
