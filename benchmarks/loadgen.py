"""A closed-loop load generator for overload runs (perf_analyzer stops at the first error, and
an overload run is mostly errors). Pre-serialised requests, grpc.aio, N requests in flight.

    python benchmarks/loadgen.py HOST:PORT MODEL INPUT_NAME WIDTH CONCURRENCY SECONDS

Prints one JSON object: counts and latency percentiles for admitted and rejected requests.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_agent._proto import grpc_service_pb2 as pb


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50_ms": float("nan"), "p99_ms": float("nan")}
    array = np.array(values) * 1000
    return {"p50_ms": float(np.percentile(array, 50)), "p99_ms": float(np.percentile(array, 99))}


async def main() -> None:
    url, model, input_name = sys.argv[1], sys.argv[2], sys.argv[3]
    width, concurrency, seconds = int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=input_name, datatype="FP32", shape=[1, width])
    request.raw_input_contents.append(np.ones((1, width), np.float32).tobytes())
    payload = request.SerializeToString()
    ok: list[float] = []
    rejected: list[float] = []
    codes: Counter[str] = Counter()
    async with grpc.aio.insecure_channel(url) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        stop = time.monotonic() + seconds

        async def worker() -> None:
            while time.monotonic() < stop:
                started = time.perf_counter()
                try:
                    await call(payload, timeout=30)
                    ok.append(time.perf_counter() - started)
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as exc:
                    rejected.append(time.perf_counter() - started)
                    codes[exc.code().name] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    print(
        json.dumps(
            {
                "offered_concurrency": concurrency,
                "seconds": seconds,
                "codes": dict(codes),
                "admitted_per_s": len(ok) / seconds,
                "rejected_per_s": len(rejected) / seconds,
                "admitted": percentiles(ok),
                "rejected": percentiles(rejected),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
