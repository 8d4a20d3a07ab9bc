"""The CUDA path: runs only where a CUDA device and onnxruntime-gpu's CUDA provider work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient

import modelgen


def cuda_works() -> bool:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    if not Path("/dev/nvidiactl").exists():
        return False
    session = ort.InferenceSession(
        str(modelgen.SHIPPED / "digits" / "1" / "model.onnx"),
        providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    return "CUDAExecutionProvider" in session.get_providers()


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not cuda_works(), reason="no working CUDA device / CUDA provider here"),
]


def test_cuda_provider_is_used_and_matches_cpu(start_daemon: Any, tmp_path: Path) -> None:
    modelgen.copy_shipped(tmp_path)
    daemon = start_daemon("--model-repository", str(tmp_path), "--strict-provider").wait_started()
    assert daemon.named("model.loaded")[0]["provider"] == "cuda"
    assert not daemon.named("runtime.provider_fallback")
    data = np.load(modelgen.SHIPPED / "digits" / "validation.npz")["input"][:64]
    cpu = ort.InferenceSession(
        str(modelgen.SHIPPED / "digits" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    ).run(["probabilities"], {"input": data})[0]
    with grpcclient.InferenceServerClient(daemon.url) as client:
        config = client.get_model_config("digits").config
        assert config.parameters["edge_agent.active_provider"].string_value == "cuda"
        tensor = grpcclient.InferInput("input", list(data.shape), "FP32")
        tensor.set_data_from_numpy(data)
        got = client.infer("digits", [tensor]).as_numpy("probabilities")
    np.testing.assert_allclose(got, cpu, atol=1e-4)
