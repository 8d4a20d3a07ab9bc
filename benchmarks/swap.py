"""Latency and memory during hot swaps, per swap policy.

    .venv/bin/python benchmarks/swap.py [--quick] [--out FILE.json]

For the shipped `digits` model and the compute-heavier wide MLP (784-4096-4096-10, 80 MB), each
with swap policy `overlap` and then `drain_first`: the daemon (explicit mode, 1 CPU instance,
dynamic batching) serves CONCURRENCY closed-loop clients (grpc.aio, batch-1 requests) for a steady
phase, then through SWAPS swaps, each one a new version directory (copied beforehand) loaded with
RepositoryModelLoad, with a pause between swaps. A request counts as "during a swap" when it
started between the load RPC's call and its return. Memory and pauses come from the daemon's
`model.swapped` events (peak resident memory of the process during each swap).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import models  # noqa: E402
from benchmarks.progress import step  # noqa: E402
from benchmarks.run import free_port, wait_port  # noqa: E402
from edge_agent._proto import grpc_service_pb2 as pb  # noqa: E402

CONCURRENCY = 8
CONFIG = """max_batch_size: 64
instance_group [ {{ count: 1, kind: {kind} }} ]
dynamic_batching {{ default_queue_policy {{ max_queue_size: 256 }} }}
parameters {{ key: "swap_policy" value {{ string_value: "{policy}" }} }}
"""


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1000, q)) if values else float("nan")


async def measure(
    port: int, width: int, steady_s: float, swaps: int, gap_s: float, model_dir: Path
) -> dict[str, Any]:
    request = pb.ModelInferRequest(model_name="model")
    request.inputs.add(name="input", datatype="FP32", shape=[1, width])
    request.raw_input_contents.append(np.ones((1, width), np.float32).tobytes())
    payload = request.SerializeToString()
    records: list[tuple[float, float]] = []  # (start, latency)
    errors: dict[str, int] = {}
    windows: list[tuple[float, float]] = []
    stop = asyncio.Event()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        load = channel.unary_unary(
            "/inference.GRPCInferenceService/RepositoryModelLoad",
            request_serializer=pb.RepositoryModelLoadRequest.SerializeToString,
            response_deserializer=pb.RepositoryModelLoadResponse.FromString,
        )

        async def worker() -> None:
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    await infer(payload, timeout=60)
                    records.append((started, time.perf_counter() - started))
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] = errors.get(exc.code().name, 0) + 1

        tasks = [asyncio.create_task(worker()) for _ in range(CONCURRENCY)]
        await asyncio.sleep(1.0)  # warm the clients
        steady_from = time.perf_counter()
        await asyncio.sleep(steady_s)
        steady_to = time.perf_counter()
        for version in range(2, 2 + swaps):
            # The copy is the sync's job, not the swap's: done before the window opens.
            staged = model_dir / f".copy-{version}"
            await asyncio.to_thread(shutil.copytree, model_dir / "1", staged)
            os.rename(staged, model_dir / str(version))
            await asyncio.sleep(gap_s / 2)
            opened = time.perf_counter()
            await load(pb.RepositoryModelLoadRequest(model_name="model"), timeout=300)
            windows.append((opened, time.perf_counter()))
            await asyncio.sleep(gap_s / 2)
        stop.set()
        await asyncio.gather(*tasks)
    steady = [lat for start, lat in records if steady_from <= start < steady_to]
    during = [lat for start, lat in records if any(a <= start < b for a, b in windows)]
    return {
        "steady": {
            "requests": len(steady),
            "p50_ms": percentile(steady, 50),
            "p99_ms": percentile(steady, 99),
            "throughput": len(steady) / steady_s,
        },
        "during_swaps": {
            "requests": len(during),
            "p50_ms": percentile(during, 50),
            "p99_ms": percentile(during, 99),
            "max_ms": percentile(during, 100),
            "swap_seconds_median": float(np.median([b - a for a, b in windows])),
        },
        "errors": errors,
    }


def run_case(
    work: Path, name: str, model: Path, width: int, policy: str, quick: bool, provider: str
) -> Any:
    repo = work / f"repo-{name}-{policy}"
    (repo / "model" / "1").mkdir(parents=True)
    shutil.copy(model, repo / "model" / "1" / "model.onnx")
    kind = "KIND_GPU" if provider == "cuda" else "KIND_CPU"
    (repo / "model" / "config.pbtxt").write_text(CONFIG.format(policy=policy, kind=kind))
    port = free_port()
    log_path = work / f"{name}-{policy}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edge_agent",
                "serve",
                "--model-repository",
                str(repo),
                "--model-control-mode",
                "explicit",
                "--load-model",
                "model",
                "--grpc-address",
                f"127.0.0.1:{port}",
                "--metrics-address",
                "127.0.0.1:0",
                "--execution-providers",
                provider,
                "--log-format",
                "json",
            ],
            stdout=log,
            stderr=subprocess.DEVNULL,
            cwd=ROOT,
            # The swaps are driven with RepositoryModelLoad on the one listener (loopback only).
            env={**os.environ, "EDGE_AGENT_CONTROL_ON_INFERENCE_LISTENER": "true"},
        )
        try:
            wait_port(port, proc)
            steady, swaps, gap = (4.0, 4, 1.0) if quick else (15.0, 10, 2.0)
            result = asyncio.run(measure(port, width, steady, swaps, gap, repo / "model"))
        finally:
            proc.terminate()
            proc.wait(30)
    lines = log_path.read_text().splitlines()
    events = [json.loads(line) for line in lines if line.startswith("{")]
    swapped = [e for e in events if e.get("event") == "model.swapped"]
    result["swaps"] = len(swapped)
    result["rss_before_mib"] = float(np.median([e["rss_before_bytes"] for e in swapped])) / 2**20
    result["peak_rss_mib"] = float(np.median([e["peak_rss_bytes"] for e in swapped])) / 2**20
    result["pause_ms_median"] = float(np.median([e["pause_seconds"] for e in swapped])) * 1000
    result["pause_ms_max"] = max(e["pause_seconds"] for e in swapped) * 1000
    result["p99_ratio"] = result["during_swaps"]["p99_ms"] / result["steady"]["p99_ms"]
    return result


def report(results: dict[str, Any]) -> str:
    lines = [
        "| model | policy | steady p50 / p99 ms | during swaps p50 / p99 / max ms | p99 ratio "
        "| swap s | pause ms (median / max) | RSS before / peak MiB | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, r in results["cases"].items():
        name, policy = key.split("/")
        s, d = r["steady"], r["during_swaps"]
        lines.append(
            f"| {name} | {policy} | {s['p50_ms']:.2f} / {s['p99_ms']:.2f} "
            f"| {d['p50_ms']:.2f} / {d['p99_ms']:.2f} / {d['max_ms']:.1f} | {r['p99_ratio']:.2f} "
            f"| {d['swap_seconds_median']:.2f} | {r['pause_ms_median']:.0f} / "
            f"{r['pause_ms_max']:.0f} | {r['rss_before_mib']:.0f} / {r['peak_rss_mib']:.0f} "
            f"| {sum(r['errors'].values())} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short phases, for a smoke run")
    parser.add_argument("--model", choices=["digits", "wide_mlp"], help="only this model")
    parser.add_argument("--policy", action="append", choices=["overlap", "drain_first"])
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "swap_results.json")
    args = parser.parse_args()
    results: dict[str, Any] = {"provider": args.provider, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cases = {
            "digits": (ROOT / "models" / "digits" / "1" / "model.onnx", 64),
            "wide_mlp": (models.wide_mlp(work / "wide_mlp.onnx"), 784),
        }
        chosen = [n for n in cases if not args.model or n == args.model]
        policies = args.policy or ["overlap", "drain_first"]
        for index, name in enumerate(chosen):
            model, width = cases[name]
            for offset, policy in enumerate(policies, 1):
                step(index * len(policies) + offset, len(chosen) * len(policies), name, policy)
                result = run_case(work, name, model, width, policy, args.quick, args.provider)
                results["cases"][f"{name}/{policy}"] = result
                print(f"{name}/{policy}: {json.dumps(result)}", flush=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(report(results))


if __name__ == "__main__":
    main()
