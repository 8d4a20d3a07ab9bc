"""A realistic co-located workload (BENCHMARKS.md "Transports"):

    .venv/bin/python benchmarks/transport.py [--seconds 10] [--concurrency 1,4,16]
                                             [--front-end aio|sync]

A convolutional model with a 3x640x640 FP32 input (4.9 MB), built like an edge detector's
stem and neck (strided 3x3 convolutions with batch-norm folded in, SiLU-like activations,
down to 20x20, a 1x1 head: 85 channels per cell; random weights), served by the daemon and
called by a closed-loop tritonclient client per concurrency slot:
- gRPC over TCP (127.0.0.1),
- gRPC over a unix socket,
- system shared memory (inputs and outputs in regions the client registered; the request
  itself over the unix socket),
beside in-process ONNX Runtime on the same model (the compute limit, same thread settings).
Throughput (inferences/s) and p50/p99 latency. Writes benchmarks/transport_results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

SHAPE = [1, 3, 640, 640]


def detector(path: Path) -> Path:
    """Stem and neck of a small edge detector: 640 -> 20 with stride-2 convolutions."""
    rng = np.random.default_rng(0)
    channels = [3, 32, 64, 128, 128, 128]
    nodes, inits, current = [], [], "images"
    for i in range(5):
        w = (rng.standard_normal((channels[i + 1], channels[i], 3, 3)) * 0.1).astype(np.float32)
        b = np.zeros(channels[i + 1], np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        conv = helper.make_node(
            "Conv", [current, f"w{i}", f"b{i}"], [f"c{i}"], strides=[2, 2], pads=[1, 1, 1, 1]
        )
        nodes += [
            conv,
            helper.make_node("Sigmoid", [f"c{i}"], [f"s{i}"]),
            helper.make_node("Mul", [f"c{i}", f"s{i}"], [f"a{i}"]),  # SiLU
        ]
        current = f"a{i}"
    head = (rng.standard_normal((85, 128, 1, 1)) * 0.1).astype(np.float32)
    inits.append(numpy_helper.from_array(head, "head"))
    nodes.append(helper.make_node("Conv", [current, "head"], ["detections"]))
    graph = helper.make_graph(
        nodes,
        "detector",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, SHAPE)],
        [helper.make_tensor_value_info("detections", TensorProto.FLOAT, [1, 85, 20, 20])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def closed_loop(concurrency: int, seconds: float, call: Any) -> dict[str, float]:
    latencies: list[float] = []
    stop = time.monotonic() + seconds
    lock = threading.Lock()

    def worker(slot: int) -> None:
        own: list[float] = []
        state = call.setup(slot) if hasattr(call, "setup") else None
        while time.monotonic() < stop:
            started = time.perf_counter()
            call(slot, state)
            own.append(time.perf_counter() - started)
        with lock:
            latencies.extend(own)
        if hasattr(call, "teardown"):
            call.teardown(slot, state)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - began
    return {
        "throughput": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(latencies, 50) * 1000),
        "p99_ms": float(np.percentile(latencies, 99) * 1000),
        "requests": len(latencies),
    }


class GrpcCall:
    def __init__(self, url: str, x: np.ndarray) -> None:
        self.url, self.x = url, x

    def setup(self, slot: int) -> Any:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.url)
        tensor = grpcclient.InferInput("images", SHAPE, "FP32")
        tensor.set_data_from_numpy(self.x)
        return client, tensor

    def __call__(self, slot: int, state: Any) -> None:
        client, tensor = state
        client.infer("detector", [tensor]).as_numpy("detections")

    def teardown(self, slot: int, state: Any) -> None:
        state[0].close()


class SharedMemoryCall(GrpcCall):
    def setup(self, slot: int) -> Any:
        import tritonclient.grpc as grpcclient
        import tritonclient.utils.shared_memory as shm

        client = grpcclient.InferenceServerClient(self.url)
        key = f"/ea_bench_{os.getpid()}_{slot}"
        size_in, size_out = self.x.nbytes, 85 * 20 * 20 * 4
        regions = (
            shm.create_shared_memory_region(f"in{slot}", key + "_in", size_in),
            shm.create_shared_memory_region(f"out{slot}", key + "_out", size_out),
        )
        shm.set_shared_memory_region(regions[0], [self.x])
        client.register_system_shared_memory(f"in{slot}", key + "_in", size_in)
        client.register_system_shared_memory(f"out{slot}", key + "_out", size_out)
        tensor = grpcclient.InferInput("images", SHAPE, "FP32")
        tensor.set_shared_memory(f"in{slot}", size_in)
        output = grpcclient.InferRequestedOutput("detections")
        output.set_shared_memory(f"out{slot}", size_out)
        return client, tensor, output, regions

    def __call__(self, slot: int, state: Any) -> None:
        import tritonclient.utils.shared_memory as shm

        client, tensor, output, regions = state
        client.infer("detector", [tensor], outputs=[output])
        shm.get_contents_as_numpy(regions[1], np.float32, [1, 85, 20, 20])

    def teardown(self, slot: int, state: Any) -> None:
        import tritonclient.utils.shared_memory as shm

        client, _, _, regions = state
        client.unregister_system_shared_memory(f"in{slot}")
        client.unregister_system_shared_memory(f"out{slot}")
        for region in regions:
            shm.destroy_shared_memory_region(region)
        client.close()


class InProcess:
    def __init__(self, model: Path, x: np.ndarray) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        self.x = x

    def __call__(self, slot: int, state: Any) -> None:
        self.session.run(["detections"], {"images": self.x})


def main() -> None:
    from conftest import Daemon

    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--front-end", default="aio", choices=("aio", "sync"))
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        repo = Path(scratch) / "repo"
        model = detector(repo / "detector" / "1" / "model.onnx")
        (repo / "detector" / "config.pbtxt").write_text("max_batch_size: 0\n")
        socket_path = Path(scratch) / "grpc.sock"
        x = np.random.default_rng(1).random(SHAPE, dtype=np.float32)
        agent = Daemon(
            ["--model-repository", str(repo), "--execution-providers", "cpu",
             "--grpc-address", f"127.0.0.1:0,unix:{socket_path}", "--metrics-address",
             "127.0.0.1:0", "--control-address", "127.0.0.1:0", "--allow-shared-memory",
             "--front-end", args.front_end],
            address=False,
        ).wait_started()  # fmt: skip
        try:
            systems = {
                "in-process ONNX Runtime": InProcess(model, x),
                "gRPC over TCP": GrpcCall(agent.url, x),
                "gRPC over a unix socket": GrpcCall(f"unix:{socket_path}", x),
                "system shared memory": SharedMemoryCall(f"unix:{socket_path}", x),
            }
            for name, call in systems.items():
                results[name] = {}
                for concurrency in levels:
                    results[name][str(concurrency)] = closed_loop(concurrency, args.seconds, call)
                    print(name, concurrency, results[name][str(concurrency)], flush=True)
        finally:
            agent.stop()
    suffix = "" if args.front_end == "aio" else f"_{args.front_end}"
    out = ROOT / "benchmarks" / f"transport_results{suffix}.json"
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
