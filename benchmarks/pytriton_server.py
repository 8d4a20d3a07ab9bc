"""PyTriton serving an ONNX model, the way its documentation shows: one Python function bound to
Triton with dynamic batching, running ONNX Runtime on each batch.

    PYTRITON_PYTHON benchmarks/pytriton_server.py MODEL.onnx GRPC_PORT [MAX_BATCH]

PYTRITON_PYTHON is a separate virtual environment with `nvidia-pytriton` and `onnxruntime`
(PyTriton pins its own protobuf and grpcio; it does not share edge-agent's environment). Make it
with the system's Python: the wheel's Python backend stub links the system libpython, and with
another interpreter (pyenv's) the model fails to load inside Triton:

    /usr/bin/python3 -m venv /tmp/pytriton-venv
    /tmp/pytriton-venv/bin/pip install nvidia-pytriton==0.7.0 onnxruntime numpy

It serves the model as "model" on GRPC_PORT (HTTP and metrics on free ports), batching up to
MAX_BATCH (64, as the daemon's benchmark config) with Triton's default: no queue delay. Written
for the benchmark only: this file imports nothing of edge-agent.
"""

from __future__ import annotations

import socket
import sys

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dims(shape: list[int | str]) -> tuple[int, ...]:
    """A sample's dims for Triton: symbolic ones -1; a scalar sample is [1]."""
    return tuple(d if isinstance(d, int) else -1 for d in shape) or (1,)


def main() -> None:
    path, grpc_port = sys.argv[1], int(sys.argv[2])
    max_batch = int(sys.argv[3]) if len(sys.argv) > 3 else 64
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    inputs, outputs = session.get_inputs(), session.get_outputs()
    names = [o.name for o in outputs]

    @batch  # type: ignore[misc]
    def infer(**feeds: np.ndarray) -> dict[str, np.ndarray]:
        answers = session.run(names, feeds)
        # Triton needs dims on every output: one value per sample travels as [batch, 1].
        return {
            n: a.reshape(len(a), -1) if a.ndim == 1 else a
            for n, a in zip(names, answers, strict=True)
        }

    config = TritonConfig(
        grpc_address="127.0.0.1",
        grpc_port=grpc_port,
        http_address="127.0.0.1",
        http_port=free_port(),
        metrics_port=free_port(),
        log_verbose=0,
    )
    # perf_analyzer reads the statistics endpoint, which PyTriton puts behind a token by
    # default; this server listens on 127.0.0.1 only.
    open_endpoints = TritonSecurityConfig(restricted_endpoints=[])
    with Triton(config=config, security_config=open_endpoints) as triton:
        triton.bind(
            model_name="model",
            infer_func=infer,
            inputs=[
                Tensor(name=i.name, dtype=ORT_TO_NUMPY[i.type], shape=dims(i.shape[1:]))
                for i in inputs
            ],
            outputs=[
                Tensor(name=o.name, dtype=ORT_TO_NUMPY[o.type], shape=dims(o.shape[1:]))
                for o in outputs
            ],
            config=ModelConfig(
                max_batch_size=max_batch,
                batcher=DynamicBatcher(max_queue_delay_microseconds=0),
            ),
            strict=False,
        )
        triton.serve()


if __name__ == "__main__":
    main()
