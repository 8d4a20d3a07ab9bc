"""The daemon through stock tritonclient: metadata, config, inference, streaming."""

from __future__ import annotations

import queue
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

import modelgen

DIGITS = modelgen.SHIPPED / "digits"


def reference(model_path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def infer_digits(client: Any, batch: np.ndarray, outputs: list[str] | None = None) -> Any:
    tensor = grpcclient.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    requested = [grpcclient.InferRequestedOutput(n) for n in outputs] if outputs else None
    return client.infer("digits", [tensor], outputs=requested)


def test_server_health_and_metadata(client: Any) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta.name == "edge-agent"
    # Only what is implemented: perf_analyzer aborts on an advertised but missing extension.
    assert list(meta.extensions) == [
        "model_configuration",
        "model_repository",
        "statistics",
        "schedule_policy",
    ]


def test_model_metadata(client: Any) -> None:
    meta = client.get_model_metadata("digits")
    assert meta.name == "digits"
    assert list(meta.versions) == ["1"]
    assert meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("input", "FP32", [-1, 64])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("probabilities", "FP32", [-1, 10]),
        ("label", "INT64", [-1]),
    ]
    assert client.is_model_ready("digits")
    assert client.is_model_ready("digits", "1")
    assert not client.is_model_ready("digits", "7")
    assert not client.is_model_ready("broken")


def test_model_config_from_pbtxt(client: Any) -> None:
    config = client.get_model_config("digits").config
    assert config.name == "digits"
    assert config.max_batch_size == 64
    assert config.input[0].name == "input"
    assert list(config.input[0].dims) == [64]
    assert config.version_policy.latest.num_versions == 1
    # The provider actually obtained is exposed: no GPU here, so the CPU fallback.
    assert config.parameters["edge_agent.active_provider"].string_value == "cpu"


def test_model_config_completed_from_graph(client: Any) -> None:
    echo = client.get_model_config("echo").config  # no config.pbtxt, dynamic first dimension
    assert echo.max_batch_size == 32
    assert [(i.name, list(i.dims)) for i in echo.input] == [("x", [-1])]
    assert [(o.name, list(o.dims)) for o in echo.output] == [("y", [-1])]
    fixed = client.get_model_config("fixed").config  # fixed first dimension: no batching
    assert fixed.max_batch_size == 0
    assert list(fixed.input[0].dims) == [2, 3]


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_infer_matches_in_process_onnxruntime(client: Any, batch_size: int) -> None:
    data = np.load(DIGITS / "validation.npz")["input"][:batch_size]
    result = infer_digits(client, data)
    expected = reference(DIGITS / "1" / "model.onnx", {"input": data})
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), expected["probabilities"], rtol=1e-6
    )
    np.testing.assert_array_equal(result.as_numpy("label"), expected["label"])
    assert result.get_response().model_version == "1"


def test_shipped_model_classifies_the_validation_set(client: Any) -> None:
    validation = np.load(DIGITS / "validation.npz")
    labels = np.concatenate(
        [
            infer_digits(client, validation["input"][i : i + 64], ["label"]).as_numpy("label")
            for i in range(0, len(validation["labels"]), 64)
        ]
    )
    assert (labels == validation["labels"]).mean() > 0.95


def test_output_subset(client: Any) -> None:
    result = infer_digits(client, np.load(DIGITS / "sample.npy"), ["label"])
    response = result.get_response()
    assert [o.name for o in response.outputs] == ["label"]
    assert result.as_numpy("probabilities") is None
    assert result.as_numpy("label").tolist() == [7]


def test_request_names_a_version(client: Any) -> None:
    data = np.ones((1, 5), np.float32)
    for version in ("1", "2", ""):
        tensor = grpcclient.InferInput("x", [1, 5], "FP32")
        tensor.set_data_from_numpy(data)
        result = client.infer("echo", [tensor], model_version=version)
        assert result.get_response().model_version == (version or "2")  # newest by default
    assert list(client.get_model_metadata("echo").versions) == ["1", "2"]
    index = {(m.name, m.version): m.state for m in client.get_model_repository_index().models}
    assert index[("echo", "1")] == index[("echo", "2")] == "READY"  # policy all
    # Default policy (latest 1): only the newest of fixed's two versions is served.
    assert index[("fixed", "2")] == "READY" and ("fixed", "1") not in index
    with pytest.raises(InferenceServerException, match="no version '1'"):
        client.get_model_metadata("fixed", "1")


def test_all_datatypes_round_trip(client: Any) -> None:
    rng = np.random.default_rng(0)
    inputs, sent = [], {}
    for name, (_, dtype) in modelgen.ALL_TYPES.items():
        if name == "BYTES":
            array = np.array([["", "héllo"], ["x" * 300, "\u00e9\u00e9"]], dtype=object)
            array = np.vectorize(lambda s: s.encode())(array).astype(object)
        elif name == "BOOL":
            array = rng.integers(0, 2, (2, 2)).astype(np.bool_)
        elif np.dtype(dtype).kind == "f":
            array = rng.standard_normal((2, 2)).astype(dtype)
        else:
            info = np.iinfo(dtype)
            array = np.array([[info.min, info.max], [0, 1]], dtype=dtype)
        tensor = grpcclient.InferInput(f"in_{name}", [2, 2], name)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
        sent[name] = array
    result = client.infer("alltypes", inputs)
    for name, array in sent.items():
        got = result.as_numpy(f"out_{name}")
        assert got.dtype == array.dtype or name == "BYTES", name
        np.testing.assert_array_equal(got, array, err_msg=name)


def test_large_message_above_grpc_default(client: Any) -> None:
    data = np.arange(2_000_000, dtype=np.float32).reshape(1, -1)  # 8 MB, over gRPC's 4 MiB
    tensor = grpcclient.InferInput("x", list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    np.testing.assert_array_equal(client.infer("echo", [tensor]).as_numpy("y"), data)


def test_external_data_model_serves(client: Any) -> None:
    x = np.eye(4, dtype=np.float32)[:2]
    tensor = grpcclient.InferInput("x", [2, 4], "FP32")
    tensor.set_data_from_numpy(x)
    weights = np.arange(16, dtype=np.float32).reshape(4, 4)
    np.testing.assert_array_equal(client.infer("external", [tensor]).as_numpy("y"), x @ weights)


def test_stream_infer_answers_each_request_and_survives_errors(server: Any) -> None:
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    data = np.load(DIGITS / "validation.npz")["input"][:3]
    expected = reference(DIGITS / "1" / "model.onnx", {"input": data})["label"]
    with grpcclient.InferenceServerClient(server.url) as client:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        for i in range(3):
            tensor = grpcclient.InferInput("input", [1, 64], "FP32")
            tensor.set_data_from_numpy(data[i : i + 1])
            client.async_stream_infer("digits", [tensor], request_id=f"ok-{i}")
        bad = grpcclient.InferInput("input", [1, 63], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 63), np.float32))
        client.async_stream_infer("digits", [bad], request_id="bad")
        tensor = grpcclient.InferInput("input", [1, 64], "FP32")
        tensor.set_data_from_numpy(data[:1])
        client.async_stream_infer("digits", [tensor], request_id="after")
        answers = [results.get(timeout=30) for _ in range(5)]
        client.stop_stream()
    oks = {r.get_response().id: r.as_numpy("label")[0] for r, e in answers if e is None}
    assert oks == {
        "ok-0": expected[0],
        "ok-1": expected[1],
        "ok-2": expected[2],
        "after": expected[0],
    }
    errors = [e for _, e in answers if e is not None]
    assert len(errors) == 1
    assert isinstance(errors[0], InferenceServerException)
    assert "input 'input'" in errors[0].message()
