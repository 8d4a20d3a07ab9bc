"""How fast an overloaded daemon says no while its cores compute.

    .venv/bin/python benchmarks/overload.py [--seconds 20] [--runs 3] [--quick]

A model whose run time is set by an input (a Loop of [16, 512] @ [512, 512] MatMuls, the trip
count an input, sized to ~40 ms per request here; threaded execution, ONNX Runtime's default
intra-op pool) behind `max_queue_size: 4`. 64 closed-loop clients (one process) keep it
overloaded; a probe (another process) sends one request at a time and times its own answers:
the rejections (UNAVAILABLE, queue full) and, between them, a ServerLive health call. What is
measured is the time to a refusal and to a health answer while the model computes. Writes
benchmarks/overload_results.json; the table is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "tests"))

import modelgen  # type: ignore[import-not-found,unused-ignore]  # noqa: E402  (tests/ is on no path)
from benchmarks.run import PYTHON, Server, free_port  # noqa: E402

CONFIG = "max_batch_size: 0\ndynamic_batching { default_queue_policy { max_queue_size: 4 } }\n"
TARGET_S = 0.040
WIDTH = 512


def trip_count(model: Path) -> tuple[int, float]:
    """The trip count that makes one run take about TARGET_S here, and that run's median."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    x = np.ones((16, WIDTH), np.float32)

    def median(n: int) -> float:
        times = []
        for _ in range(5):
            started = time.perf_counter()
            session.run(None, {"n": np.array(n, np.int64), "x": x})
            times.append(time.perf_counter() - started)
        return float(np.median(times))

    n = max(1, round(50 * TARGET_S / median(50)))
    return n, median(n)


def request_bytes(n: int) -> bytes:
    from edge_agent._proto import grpc_service_pb2 as pb

    request = pb.ModelInferRequest(model_name="looping")
    request.inputs.add(name="n", datatype="INT64", shape=[])
    request.inputs.add(name="x", datatype="FP32", shape=[16, WIDTH])
    request.raw_input_contents.append(np.array(n, np.int64).tobytes())
    request.raw_input_contents.append(np.ones((16, WIDTH), np.float32).tobytes())
    return bytes(request.SerializeToString())


# -- the two client processes ----------------------------------------------------------------


async def load(url: str, n: int, seconds: float, concurrency: int) -> dict[str, Any]:
    import grpc

    payload = request_bytes(n)
    codes: Counter[str] = Counter()
    async with grpc.aio.insecure_channel(url) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        stop = time.monotonic() + seconds

        async def worker() -> None:
            while time.monotonic() < stop:
                try:
                    await call(payload, timeout=30)
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as exc:
                    codes[exc.code().name] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"codes": dict(codes)}


def probe(url: str, n: int, seconds: float) -> dict[str, Any]:
    """One call at a time on a channel of its own: an inference (timed by its outcome), then a
    health check, then 20 ms of quiet."""
    import grpc

    from edge_agent._proto import grpc_service_pb2 as pb

    payload = request_bytes(n)
    rejected: list[float] = []
    admitted: list[float] = []
    health: list[float] = []
    codes: Counter[str] = Counter()
    with grpc.insecure_channel(url) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        live = channel.unary_unary(
            "/inference.GRPCInferenceService/ServerLive",
            request_serializer=pb.ServerLiveRequest.SerializeToString,
            response_deserializer=pb.ServerLiveResponse.FromString,
        )
        live(pb.ServerLiveRequest(), timeout=10)  # connected before the clock starts
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            started = time.perf_counter()
            try:
                infer(payload, timeout=30)
                admitted.append(time.perf_counter() - started)
                codes["OK"] += 1
            except grpc.RpcError as exc:
                rejected.append(time.perf_counter() - started)
                codes[exc.code().name] += 1
            started = time.perf_counter()
            live(pb.ServerLiveRequest(), timeout=10)
            health.append(time.perf_counter() - started)
            time.sleep(0.02)
    return {
        "codes": dict(codes),
        "rejected": percentiles(rejected),
        "admitted": percentiles(admitted),
        "health": percentiles(health),
    }


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    ms = np.array(values) * 1000
    return {
        "count": len(values),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "max_ms": round(float(ms.max()), 2),
    }


# -- the run ---------------------------------------------------------------------------------


def start_daemon(repo: Path, env: dict[str, str]) -> Server:
    port = free_port()
    os.environ.update(env)
    try:
        return Server(
            [PYTHON, "-m", "edge_agent", "serve", "--model-repository", str(repo),
             "--grpc-address", f"127.0.0.1:{port}", "--metrics-address", "127.0.0.1:0",
             "--control-address", "127.0.0.1:0", "--execution-providers", "cpu",
             "--log-level", "warning"],
            port,
        )  # fmt: skip
    finally:
        for key in env:
            os.environ.pop(key, None)


def one_run(url: str, n: int, seconds: float) -> dict[str, Any]:
    me = [PYTHON, str(Path(__file__).resolve())]
    load_proc = subprocess.Popen(
        [*me, "--load", url, str(n), str(seconds + 2)], stdout=subprocess.PIPE, text=True
    )
    time.sleep(1.0)  # the load reaches its steady state first
    out = subprocess.run(
        [*me, "--probe", url, str(n), str(seconds)],
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        check=True,
    )
    loaded, _ = load_proc.communicate(timeout=seconds + 120)
    return {"probe": json.loads(out.stdout), "load": json.loads(loaded)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one run of 5 s")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "overload_results.json")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the daemon")
    parser.add_argument("--load", nargs=3, metavar=("URL", "N", "SECONDS"), help=argparse.SUPPRESS)
    parser.add_argument("--probe", nargs=3, metavar=("URL", "N", "SECONDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        url, n, seconds = args.load
        print(json.dumps(asyncio.run(load(url, int(n), float(seconds), 64))))
        return
    if args.probe:
        url, n, seconds = args.probe
        print(json.dumps(probe(url, int(n), float(seconds))))
        return
    seconds, runs = (5.0, 1) if args.quick else (args.seconds, args.runs)
    env = dict(item.split("=", 1) for item in args.env)
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        # y = x @ W, n times: W the identity keeps the values put (no denormals).
        model = modelgen.looping(repo / "looping" / "1" / "model.onnx", 16, WIDTH, scale=1.0)
        (repo / "looping" / "config.pbtxt").write_text(CONFIG)
        n, run_s = trip_count(model)
        server = start_daemon(repo, env)
        try:
            results = [one_run(f"127.0.0.1:{server.port}", n, seconds) for _ in range(runs)]
            alive = server.proc.poll() is None
        finally:
            server.stop()
    summary = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}",
        "trip_count": n,
        "run_ms_in_process": round(run_s * 1000, 1),
        "env": env,
        "seconds": seconds,
        "daemon_alive": alive,
        "runs": results,
    }
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"one run in process: {summary['run_ms_in_process']} ms (n={n}); env {env or '-'}")
    print("| run | probe answers | rejection p50 / p99 / max ms | health p50 / p99 / max ms |")
    print("| --- | --- | --- | --- |")
    for i, r in enumerate(results, 1):
        p = r["probe"]
        rej, hl = p["rejected"], p["health"]
        print(
            f"| {i} | {p['codes']} | {rej.get('p50_ms')} / {rej.get('p99_ms')} / "
            f"{rej.get('max_ms')} | {hl.get('p50_ms')} / {hl.get('p99_ms')} / {hl.get('max_ms')} |"
        )


if __name__ == "__main__":
    main()
