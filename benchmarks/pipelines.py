"""Pipelines and streams (BENCHMARKS.md "Ensembles and sequences"):

    .venv/bin/python benchmarks/pipelines.py [--quick] [--out FILE.json]

1. A three-model camera pipeline (pre-processing -> features -> head on 3x112x112 images) as a
   Triton ensemble (one request) against the same chain driven by the client (three round
   trips, each intermediate tensor sent back and forth), concurrency 1 and 16.
2. 64 concurrent streams of a stateful recurrent cell (x [256] -> h [2048]): implicit state under
   the sequence batcher with batching across streams (its defaults), the same with one
   execution per request (max_batch_size 0), and the state carried by the client (a plain model
   with dynamic batching; the 8 KiB state crosses the network twice per request).

One daemon per configuration, one closed-loop grpc.aio load generator in this process (each
worker waits for its answer before sending its next request); throughput and p50/p99 latency
over a measured window after a warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import models  # noqa: E402
from benchmarks.run import daemon, idle_policy  # noqa: E402
from edge_agent._proto import grpc_service_pb2 as pb  # noqa: E402
from edge_agent._proto import grpc_service_pb2_grpc as pb_grpc  # noqa: E402

STEP_CONFIG = "max_batch_size: 16\ndynamic_batching { max_queue_delay_microseconds: 500 }\n"
ENSEMBLE_CONFIG = """name: "camera"
platform: "ensemble"
max_batch_size: 16
input [ { name: "IMAGE" data_type: TYPE_FP32 dims: [ 3, 112, 112 ] } ]
output [ { name: "SCORES" data_type: TYPE_FP32 dims: [ 10 ] } ]
ensemble_scheduling { step [
  { model_name: "pre" model_version: -1
    input_map { key: "image" value: "IMAGE" } output_map { key: "normalised" value: "norm" } },
  { model_name: "features" model_version: -1
    input_map { key: "normalised" value: "norm" } output_map { key: "features" value: "f" } },
  { model_name: "head" model_version: -1
    input_map { key: "features" value: "f" } output_map { key: "scores" value: "SCORES" } }
] }
"""
SEQUENCE_CONFIG = """max_batch_size: {batch}
sequence_batching {{
  max_sequence_idle_microseconds: 60000000
  oldest {{ max_queue_delay_microseconds: 1000 }}
  state [ {{ input_name: "h_in" output_name: "h_out" data_type: TYPE_FP32 dims: [ {dims} ] }} ]
}}
"""
CLIENT_STATE_CONFIG = (
    "max_batch_size: 64\ndynamic_batching { max_queue_delay_microseconds: 1000 }\n"
)
WIDTH, HIDDEN = 256, 2048


def tensor_request(model: str, arrays: dict[str, np.ndarray]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    for name, array in arrays.items():
        request.inputs.add(name=name, datatype="FP32", shape=list(array.shape))
        request.raw_input_contents.append(array.tobytes())
    return request


def output(response: pb.ModelInferResponse, index: int = 0) -> np.ndarray:
    shape = list(response.outputs[index].shape)
    return np.frombuffer(response.raw_output_contents[index], np.float32).reshape(shape)


async def closed_loop(
    port: int, worker: Callable[[Any, int], Awaitable[None]], concurrency: int, seconds: float
) -> dict[str, float]:
    """`concurrency` workers, each calling `worker(stub, n)` back to back; per call latency."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        latencies: list[float] = []
        measuring = asyncio.Event()
        stop = asyncio.Event()

        async def run(n: int) -> None:
            while not stop.is_set():
                started = time.perf_counter()
                await worker(stub, n)
                if measuring.is_set() and not stop.is_set():
                    latencies.append(time.perf_counter() - started)

        tasks = [asyncio.create_task(run(n)) for n in range(concurrency)]
        await asyncio.sleep(min(2.0, seconds / 2))  # warm-up
        measuring.set()
        began = time.perf_counter()
        await asyncio.sleep(seconds)
        stop.set()
        elapsed = time.perf_counter() - began
        await asyncio.gather(*tasks)
    values = np.array(latencies) * 1000
    return {
        "throughput": round(len(latencies) / elapsed, 1),
        "p50_ms": round(float(np.percentile(values, 50)), 3),
        "p99_ms": round(float(np.percentile(values, 99)), 3),
    }


def pipelines(work: Path, seconds: float) -> dict[str, Any]:
    repo = work / "pipeline"
    for name, path in models.pipeline(work / "models").items():
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / "model.onnx").symlink_to(path)
        (repo / name / "config.pbtxt").write_text(STEP_CONFIG)
    (repo / "camera" / "1").mkdir(parents=True)
    (repo / "camera" / "config.pbtxt").write_text(ENSEMBLE_CONFIG)
    image = np.random.default_rng(0).uniform(0, 255, (1, 3, 112, 112)).astype(np.float32)
    one_call = tensor_request("camera", {"IMAGE": image})

    async def ensemble(stub: Any, n: int) -> None:
        await stub.ModelInfer(one_call)

    first = tensor_request("pre", {"image": image})

    async def chained(stub: Any, n: int) -> None:
        normalised = output(await stub.ModelInfer(first))
        features = output(
            await stub.ModelInfer(tensor_request("features", {"normalised": normalised}))
        )
        await stub.ModelInfer(tensor_request("head", {"features": features}))

    server = daemon(repo)
    results: dict[str, Any] = {"ensemble": {}, "client chain": {}}
    try:
        for concurrency in (1, 16):
            for system, worker in (("ensemble", ensemble), ("client chain", chained)):
                print(f"   pipeline: {system} c={concurrency}", file=sys.stderr)
                results[system][str(concurrency)] = asyncio.run(
                    closed_loop(server.port, worker, concurrency, seconds)
                )
    finally:
        server.stop()
    return results


def streams(work: Path, seconds: float, count: int = 64) -> dict[str, Any]:
    cell = models.recurrent(work / "recurrent.onnx", WIDTH, HIDDEN)
    configs = {
        "sequence batcher": SEQUENCE_CONFIG.format(batch=64, dims=HIDDEN),
        "sequence batcher, one execution per request": SEQUENCE_CONFIG.format(
            batch=0, dims=f"1, {HIDDEN}"
        ),
        "state carried by the client": CLIENT_STATE_CONFIG,
    }
    rng = np.random.default_rng(1)
    chunk = rng.standard_normal((1, WIDTH)).astype(np.float32)
    results: dict[str, Any] = {}
    for system, config in configs.items():
        repo = work / f"streams-{len(results)}"
        (repo / "cell" / "1").mkdir(parents=True)
        (repo / "cell" / "1" / "model.onnx").symlink_to(cell)
        (repo / "cell" / "config.pbtxt").write_text(config)
        worker = stream_worker(system == "state carried by the client", chunk, count)
        server = daemon(repo)
        try:
            print(f"   streams: {system} ({count} streams)", file=sys.stderr)
            results[system] = asyncio.run(closed_loop(server.port, worker, count, seconds))
        finally:
            server.stop()
    return results


def stream_worker(
    client_state: bool, chunk: np.ndarray, count: int
) -> Callable[[Any, int], Awaitable[None]]:
    """Worker n drives stream n: the sequence batcher keeps its state (sequence_id n + 1), or
    the client sends it and keeps what comes back."""
    states = [np.zeros((1, HIDDEN), np.float32) for _ in range(count)]
    started = [False] * count

    async def stream(stub: Any, n: int) -> None:
        if client_state:
            request = tensor_request("cell", {"x": chunk, "h_in": states[n]})
            states[n] = output(await stub.ModelInfer(request), 1).copy()
            return
        request = tensor_request("cell", {"x": chunk})
        request.parameters["sequence_id"].int64_param = n + 1
        request.parameters["sequence_start"].bool_param = not started[n]
        started[n] = True
        await stub.ModelInfer(request)

    return stream


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "pipelines_results.json")
    args = parser.parse_args()
    seconds = 3.0 if args.quick else 8.0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores" + idle_policy(),
            "pipeline": pipelines(work, seconds),
            "streams": streams(work, seconds),
        }
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
