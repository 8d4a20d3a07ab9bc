"""Loading: a model that fails is reported (index, health, log) and the others serve."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.service_pb2 as tpb
import tritonclient.grpc.service_pb2_grpc as tpb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.utils import InferenceServerException

import modelgen

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def index(client: Any) -> dict[tuple[str, str], tuple[str, str]]:
    return {
        (m.name, m.version): (m.state, m.reason) for m in client.get_model_repository_index().models
    }


def test_failed_models_are_reported_beside_working_ones(client: Any) -> None:
    models = index(client)
    assert models[("digits", "1")] == ("READY", "")
    state, reason = models[("broken", "1")]
    assert state == "UNAVAILABLE"
    assert "not a readable ONNX model" in reason
    state, reason = models[("mismatch", "1")]
    assert (state, reason) == (
        "UNAVAILABLE",
        "config.pbtxt input 'x' is TYPE_INT32, the model has TYPE_FP32",
    )


def test_ready_index_lists_only_ready_versions(server: Any) -> None:
    with grpc.insecure_channel(server.url) as channel:
        stub = tpb_grpc.GRPCInferenceServiceStub(channel)
        everything = stub.RepositoryIndex(tpb.RepositoryIndexRequest(), timeout=10)
        ready_only = stub.RepositoryIndex(tpb.RepositoryIndexRequest(ready=True), timeout=10)
    assert ("broken", "UNAVAILABLE") in {(m.name, m.state) for m in everything.models}
    assert {m.state for m in ready_only.models} == {"READY"}
    assert {m.name for m in ready_only.models} >= {"digits", "echo", "external"}
    assert "broken" not in {m.name for m in ready_only.models}


def test_failed_model_answers_unavailable(client: Any) -> None:
    tensor = grpcclient.InferInput("x", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 4), np.float32))
    with pytest.raises(InferenceServerException) as info:
        client.infer("broken", [tensor])
    assert info.value.status() == "StatusCode.UNAVAILABLE"
    assert "no ready version" in info.value.message()


def test_load_failures_are_logged(server: Any) -> None:
    failed = {
        (e["model"], e.get("version")): e["reason"] for e in server.named("model.load_failed")
    }
    assert "not a readable ONNX model" in failed[("broken", 1)]
    assert "not a plain file name" in failed[("evil", 1)]
    loaded = {e["model"]: e for e in server.named("model.loaded")}
    assert loaded["digits"]["provider"] == "cpu"


def test_cuda_asked_for_is_obtained_or_the_fallback_says_why(
    start_daemon: Any, tmp_path: Any
) -> None:
    modelgen.copy_shipped(tmp_path)
    daemon = start_daemon(
        "--model-repository", str(tmp_path), "--execution-providers", "cuda,cpu"
    ).wait_started()
    (loaded,) = daemon.named("model.loaded")
    fallback = daemon.named("runtime.provider_fallback")
    if loaded["provider"] == "cuda":
        assert fallback == []
    else:
        assert loaded["provider"] == "cpu"
        assert fallback and fallback[0]["reason"] and fallback[0]["active"] == "cpu"


def test_health_overall_and_per_model(server: Any) -> None:
    with grpc.insecure_channel(server.url) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def status(service: str) -> int:
            return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status

        assert status("") == SERVING
        assert status("digits") == SERVING
        assert status("broken") == NOT_SERVING
        with pytest.raises(grpc.RpcError) as info:
            status("no-such-model")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_services(server: Any) -> None:
    with grpc.insecure_channel(server.url) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    names = {s.name for s in response.list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names


def test_external_data_escape_is_refused(client: Any) -> None:
    state, reason = index(client)[("evil", "1")]
    assert state == "UNAVAILABLE"
    assert "'../../external/1/weights.bin' is not a plain file name" in reason


def test_repository_of_only_failures_still_starts(start_daemon: Any, tmp_path: Any) -> None:
    (tmp_path / "bad" / "1").mkdir(parents=True)
    (tmp_path / "bad" / "1" / "model.onnx").write_bytes(b"\0")
    (tmp_path / "noversions").mkdir()
    (tmp_path / "badconfig").mkdir()
    (tmp_path / "badconfig" / "config.pbtxt").write_text("max_batch_size: banana\n")
    daemon = start_daemon("--model-repository", str(tmp_path)).wait_started()
    with grpcclient.InferenceServerClient(daemon.url) as client:
        models = index(client)
        assert client.is_server_ready()
        failed = r"failed to load: config\.pbtxt"
        with pytest.raises(InferenceServerException, match=failed) as info:
            client.get_model_metadata("badconfig", "1")
        assert info.value.status() == "StatusCode.UNAVAILABLE"
    assert models[("bad", "1")][0] == "UNAVAILABLE"
    assert "no version directories" in models[("noversions", "")][1]
    assert "config.pbtxt is invalid" in models[("badconfig", "")][1]


def test_strict_provider_refuses_cpu_fallback(start_daemon: Any, tmp_path: Any) -> None:
    modelgen.copy_shipped(tmp_path)
    daemon = start_daemon("--model-repository", str(tmp_path), "--strict-provider").wait_started()
    with grpcclient.InferenceServerClient(daemon.url) as client:
        state, reason = index(client)[("digits", "1")]
        assert state == "UNAVAILABLE"
        assert "strict provider mode: CUDA was asked for and not obtained" in reason
        assert not client.is_model_ready("digits")


def test_cpu_only_model_does_not_fall_back(start_daemon: Any, tmp_path: Any) -> None:
    model = modelgen.copy_shipped(tmp_path)
    config = (model / "config.pbtxt").read_text().replace("KIND_AUTO", "KIND_CPU")
    (model / "config.pbtxt").write_text(config)
    daemon = start_daemon("--model-repository", str(tmp_path), "--strict-provider").wait_started()
    with grpcclient.InferenceServerClient(daemon.url) as client:
        assert client.is_model_ready("digits")
    assert not daemon.named("runtime.provider_fallback")
