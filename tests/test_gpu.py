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


@pytest.mark.parametrize(("tf32", "atol"), [("true", 2e-3), ("false", 1e-5)])
def test_cuda_provider_is_used_and_matches_cpu(
    start_daemon: Any, tmp_path: Path, tf32: str, atol: float
) -> None:
    modelgen.copy_shipped(tmp_path)
    daemon = start_daemon(
        "--model-repository",
        str(tmp_path),
        "--strict-provider",
        env={"EDGE_AGENT_CUDA_USE_TF32": tf32},
    ).wait_started()
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
    # TF32 (ONNX Runtime's CUDA default) rounds matmul inputs to 10 mantissa bits.
    np.testing.assert_allclose(got, cpu, atol=atol)


def test_swaps_on_cuda_under_load_fail_nothing(start_daemon: Any, tmp_path: Path) -> None:
    """Two CUDA instances (a session each), swapped 5 times under load through
    RepositoryModelLoad: every version loads on CUDA, warms every batch size, and no request
    fails."""
    import threading

    modelgen.versioned(tmp_path / "m" / "1", 1)
    (tmp_path / "m" / "config.pbtxt").write_text(
        "max_batch_size: 16\ndynamic_batching {}\ninstance_group [ { count: 2, kind: KIND_GPU } ]\n"
    )
    daemon = start_daemon(
        "--model-repository",
        str(tmp_path),
        "--model-control-mode",
        "explicit",
        "--load-model",
        "m",
    ).wait_started()
    failures: list[str] = []
    answers: list[float] = []
    stop = threading.Event()

    def client_loop() -> None:
        with grpcclient.InferenceServerClient(daemon.url) as client:
            tensor = grpcclient.InferInput("x", [1, 4], "FP32")
            tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
            while not stop.is_set():
                try:
                    result = client.infer("m", [tensor])
                    a, b = result.as_numpy("a"), result.as_numpy("b")
                    assert np.array_equal(a, b)
                    answers.append(float(a[0, 0]))
                except Exception as exc:
                    failures.append(repr(exc))

    threads = [threading.Thread(target=client_loop) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        with grpcclient.InferenceServerClient(daemon.url) as control:
            for version in range(2, 7):
                modelgen.versioned(tmp_path / "m" / str(version), version)
                control.load_model("m")
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert failures == []
    assert answers and answers[-1] == 6.0
    loaded = daemon.named("model.loaded")
    assert [e["provider"] for e in loaded] == ["cuda"] * 6
    assert all(e["warmup_runs"] == 16 + 2 for e in loaded)  # every batch size, per instance
    assert not daemon.named("runtime.provider_fallback")


@pytest.mark.parametrize("mode", ["io_binding", "cuda_graph"])
def test_io_binding_and_cuda_graphs_match_the_plain_path(
    start_daemon: Any, tmp_path: Path, mode: str
) -> None:
    """On CUDA, IOBinding is the default (auto) and CUDA graphs are one parameter away: both
    answer what plain session.run answers, at every batch size the batcher forms."""
    modelgen.copy_shipped(tmp_path)
    config = tmp_path / "digits" / "config.pbtxt"
    extra = 'parameters { key: "use_tf32" value: { string_value: "false" } }\n'
    if mode == "cuda_graph":
        extra += 'parameters { key: "cuda_graph" value: { string_value: "true" } }\n'
    config.write_text(config.read_text() + extra)
    daemon = start_daemon(
        "--model-repository", str(tmp_path), "--strict-provider"
    ).wait_started()  # fmt: skip
    (loaded,) = daemon.named("model.loaded")
    assert loaded["provider"] == "cuda" and loaded["execution"] == mode
    assert not daemon.named("model.cuda_graph_unavailable")
    data = np.load(modelgen.SHIPPED / "digits" / "validation.npz")["input"]
    plain = ort.InferenceSession(
        str(modelgen.SHIPPED / "digits" / "1" / "model.onnx"),
        providers=[("CUDAExecutionProvider", {"use_tf32": "0"})],
    )
    with grpcclient.InferenceServerClient(daemon.url) as client:
        for rows in (1, 3, 64, 3, 1):  # a captured shape replayed after others
            batch = data[:rows]
            tensor = grpcclient.InferInput("input", list(batch.shape), "FP32")
            tensor.set_data_from_numpy(batch)
            got = client.infer("digits", [tensor]).as_numpy("probabilities")
            want = plain.run(["probabilities"], {"input": batch})[0]
            np.testing.assert_allclose(got, want, atol=1e-5)


def test_cuda_shared_memory_in_and_out(start_daemon: Any, tmp_path: Path) -> None:
    """A co-located GPU client: the input in a CUDA region it registered, the output written
    into another; the answers are the model's."""
    cudashm = pytest.importorskip("tritonclient.utils.cuda_shared_memory")
    modelgen.copy_shipped(tmp_path)
    daemon = start_daemon(
        "--model-repository", str(tmp_path), "--strict-provider", "--allow-shared-memory"
    ).wait_started()  # fmt: skip
    data = np.load(modelgen.SHIPPED / "digits" / "validation.npz")["input"][:8]
    want = ort.InferenceSession(
        str(modelgen.SHIPPED / "digits" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    ).run(["probabilities"], {"input": data})[0]
    source = cudashm.create_shared_memory_region("in", data.nbytes, 0)
    target = cudashm.create_shared_memory_region("out", want.nbytes, 0)
    try:
        cudashm.set_shared_memory_region(source, [data])
        with grpcclient.InferenceServerClient(daemon.url) as client:
            assert "cuda_shared_memory" in client.get_server_metadata().extensions
            client.register_cuda_shared_memory("in", cudashm.get_raw_handle(source), 0, data.nbytes)
            client.register_cuda_shared_memory(
                "out", cudashm.get_raw_handle(target), 0, want.nbytes
            )
            assert set(client.get_cuda_shared_memory_status().regions) == {"in", "out"}
            tensor = grpcclient.InferInput("input", list(data.shape), "FP32")
            tensor.set_shared_memory("in", data.nbytes)
            output = grpcclient.InferRequestedOutput("probabilities")
            output.set_shared_memory("out", want.nbytes)
            result = client.infer("digits", [tensor], outputs=[output])
            assert result.get_output("probabilities") is not None
            got = cudashm.get_contents_as_numpy(target, np.float32, list(want.shape))
            np.testing.assert_allclose(got, want, atol=2e-3)
            client.unregister_cuda_shared_memory()
            assert client.get_cuda_shared_memory_status().regions == {}
    finally:
        cudashm.destroy_shared_memory_region(source)
        cudashm.destroy_shared_memory_region(target)
