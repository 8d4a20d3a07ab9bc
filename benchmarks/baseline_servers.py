"""The two reference servers of the benchmark, on the same KServe v2 protocol as the daemon.

    python benchmarks/baseline_servers.py naive  MODEL.onnx PORT [THREADS]
    python benchmarks/baseline_servers.py nowork MODEL.onnx PORT
    python benchmarks/baseline_servers.py nowork-aio MODEL.onnx PORT

naive:  the obvious design: a sync grpcio server with a thread pool and one `session.run` per
        request, no batching, no queue bound.
nowork: answers every ModelInfer with a canned response (the model's outputs for one sample):
        the RPC limit of a Python gRPC server on this machine; `nowork` on the sync server (a
        thread pool), `nowork-aio` on grpc.aio, which is how the server model was chosen.
Both describe the model (ModelMetadata, ModelConfig) from ONNX Runtime so perf_analyzer can
drive them. Written for the benchmark only; not part of the agent.
"""

from __future__ import annotations

import sys
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_agent._proto import grpc_service_pb2 as pb
from edge_agent._proto import grpc_service_pb2_grpc as pb_grpc
from edge_agent._proto import model_config_pb2 as mc
from edge_agent.common.tensors import ORT_TYPES, config_type_name, decode_raw, encode

MODEL = "model"
OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
]


class Baseline(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(self, path: str, mode: str) -> None:
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.mode = mode
        self.outputs = [o.name for o in self.session.get_outputs()]
        feeds = {i.name: np.zeros([1, *i.shape[1:]], np.float32) for i in self.session.get_inputs()}
        self.canned = self._respond(self.session.run(self.outputs, feeds))

    def _respond(self, arrays: list[np.ndarray]) -> pb.ModelInferResponse:
        response = pb.ModelInferResponse(model_name=MODEL, model_version="1")
        for name, array in zip(self.outputs, arrays, strict=True):
            datatype, shape, raw = encode(array)
            response.outputs.add(name=name, datatype=datatype, shape=shape)
            response.raw_output_contents.append(raw)
        return response

    def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=True)

    def ModelReady(self, request: Any, context: Any) -> Any:
        return pb.ModelReadyResponse(ready=True)

    def ServerMetadata(self, request: Any, context: Any) -> Any:
        return pb.ServerMetadataResponse(name=f"baseline-{self.mode}", version="0")

    def ModelMetadata(self, request: Any, context: Any) -> Any:
        response = pb.ModelMetadataResponse(name=MODEL, versions=["1"], platform="onnxruntime_onnx")
        for arg in self.session.get_inputs():
            response.inputs.add(
                name=arg.name, datatype=ORT_TYPES[arg.type], shape=[-1, *arg.shape[1:]]
            )
        for arg in self.session.get_outputs():
            response.outputs.add(
                name=arg.name, datatype=ORT_TYPES[arg.type], shape=[-1, *arg.shape[1:]]
            )
        return response

    def ModelConfig(self, request: Any, context: Any) -> Any:
        config = mc.ModelConfig(name=MODEL, platform="onnxruntime_onnx", max_batch_size=64)
        for arg in self.session.get_inputs():
            config.input.add(
                name=arg.name,
                data_type=mc.DataType.Value(config_type_name(ORT_TYPES[arg.type])),
                dims=arg.shape[1:],
            )
        for arg in self.session.get_outputs():
            config.output.add(
                name=arg.name,
                data_type=mc.DataType.Value(config_type_name(ORT_TYPES[arg.type])),
                dims=arg.shape[1:],
            )
        return pb.ModelConfigResponse(config=config)

    def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        if self.mode == "nowork":
            return self.canned
        feeds = {
            t.name: decode_raw(t.name, t.datatype, list(t.shape), raw)
            for t, raw in zip(request.inputs, request.raw_input_contents, strict=True)
        }
        return self._respond(self.session.run(self.outputs, feeds))


def _as_async(servicer: Baseline) -> Any:
    class Async(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
        pass

    async_servicer = Async()
    for name in (
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelConfig",
        "ModelInfer",
    ):
        method = getattr(servicer, name)

        async def handler(request: Any, context: Any, method: Any = method) -> Any:
            return method(request, context)

        setattr(async_servicer, name, handler)
    return async_servicer


async def serve_aio(servicer: Baseline, port: int) -> None:
    server = grpc.aio.server(options=OPTIONS)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(_as_async(servicer), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


def main() -> None:
    mode, path, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    threads = int(sys.argv[4]) if len(sys.argv) > 4 else 16
    if mode == "nowork-aio":
        import asyncio

        asyncio.run(serve_aio(Baseline(path, "nowork"), port))
        return
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), options=OPTIONS)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Baseline(path, mode), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
