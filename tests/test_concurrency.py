"""Admission, deadlines, priorities, statistics and metrics through the real daemon."""

from __future__ import annotations

import queue
import re
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

import modelgen
from conftest import Daemon

SLOW_CONFIG = """
max_batch_size: 0
instance_group [ { count: 1, kind: KIND_CPU } ]
dynamic_batching { %s }
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    repo = tmp_path_factory.mktemp("concurrency")
    modelgen.copy_shipped(repo)
    for name, batching in (
        ("slow", "default_queue_policy { max_queue_size: 1 }"),
        ("slowwait", ""),
        ("slowprio", "priority_levels: 2 default_priority_level: 2"),
    ):
        modelgen.slow(repo / name / "1" / "model.onnx")
        (repo / name / "config.pbtxt").write_text(SLOW_CONFIG % batching)
    server = Daemon(["--model-repository", str(repo)]).wait_started()
    yield server
    server.stop()


@pytest.fixture
def client(daemon: Daemon) -> Iterator[Any]:
    with grpcclient.InferenceServerClient(daemon.url) as c:
        yield c


def metrics(daemon: Daemon) -> dict[str, float]:
    with urllib.request.urlopen(daemon.metrics_url, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        match = re.fullmatch(r"([a-z_]+(?:\{[^}]*\})?) (\S+)", line)
        if match:
            samples[match.group(1)] = float(match.group(2))
    return samples


def digits_input(rows: int) -> Any:
    data = np.load(modelgen.SHIPPED / "digits" / "validation.npz")["input"][:rows]
    tensor = grpcclient.InferInput("input", list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    return tensor


def slow_input() -> Any:
    tensor = grpcclient.InferInput("x", [1, 512], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 512), np.float32))
    return tensor


def stats_of(client: Any, model: str) -> Any:
    return client.get_inference_statistics(model).model_stats[0]


def test_statistics_and_metrics_count_what_happened(client: Any, daemon: Daemon) -> None:
    for _ in range(3):
        client.infer("digits", [digits_input(2)])
    bad = grpcclient.InferInput("input", [1, 63], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 63), np.float32))
    with pytest.raises(InferenceServerException):
        client.infer("digits", [bad])
    stats = stats_of(client, "digits")
    assert (stats.name, stats.version) == ("digits", "1")
    assert stats.inference_count == 6
    assert stats.inference_stats.success.count == 3
    assert stats.inference_stats.fail.count == 1
    assert 1 <= stats.execution_count <= 3
    assert stats.inference_stats.compute_infer.count == 3
    assert stats.inference_stats.queue.count == 3
    assert stats.last_inference > 0
    assert sum(b.batch_size * b.compute_infer.count for b in stats.batch_stats) == 6

    labels = '{model="digits",version="1"}'
    m = metrics(daemon)
    assert m[f"nv_inference_request_success{labels}"] == 3
    assert m['nv_inference_request_failure{model="digits",reason="OTHER",version="1"}'] == 1
    assert m[f"nv_inference_count{labels}"] == 6
    assert m[f"nv_inference_exec_count{labels}"] == stats.execution_count
    assert m[f"nv_inference_pending_request_count{labels}"] == 0
    assert m[f"nv_inference_compute_infer_duration_us{labels}"] > 0
    assert m['edge_agent_execution_provider{model="digits",provider="cpu",version="1"}'] == 1
    assert m['edge_agent_batch_size_count{model="digits",version="1"}'] == stats.execution_count


def test_timeout_parameter_expires_without_execution(client: Any, daemon: Daemon) -> None:
    before = stats_of(client, "digits").execution_count
    with pytest.raises(InferenceServerException) as info:
        client.infer("digits", [digits_input(1)], timeout=1)  # microseconds
    assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert "deadline passed" in info.value.message()
    assert stats_of(client, "digits").execution_count == before
    rejected = 'edge_agent_rejected_requests_total{cause="deadline",model="digits",version="1"}'
    assert metrics(daemon)[rejected] >= 1


def test_full_queue_answers_unavailable_at_once(client: Any, daemon: Daemon) -> None:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    sent = 16
    for _ in range(sent):
        client.async_infer(
            "slow", [slow_input()], lambda result, error: answers.put((result, error))
        )
    results = [answers.get(timeout=120) for _ in range(sent)]  # every request is answered
    refused = [e for _, e in results if e is not None]
    assert refused, "one instance and a queue of 1 cannot take 16 requests at once"
    for error in refused:
        assert error.status() == "StatusCode.UNAVAILABLE"
        assert "queue full (1 requests waiting); retry later" in error.message()
    assert sum(e is None for _, e in results) >= 1
    cause = 'edge_agent_rejected_requests_total{cause="queue_full",model="slow",version="1"}'
    assert metrics(daemon)[cause] == len(refused)


def test_client_deadline_is_answered(client: Any) -> None:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    for _ in range(3):
        client.async_infer(
            "slowwait", [slow_input()], lambda result, error: answers.put((result, error))
        )
    with pytest.raises(InferenceServerException) as info:
        client.infer("slowwait", [slow_input()], client_timeout=0.05)
    assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert all(e is None for _, e in (answers.get(timeout=120) for _ in range(3)))
    client.infer("slowwait", [slow_input()])  # and the model still serves
    # (Whether the server saw the abandoned call at all depends on timing, so its counters are
    # asserted where that is deterministic: tests/test_scheduler.py.)


def test_priority_parameter(client: Any) -> None:
    result = client.infer("slowprio", [slow_input()], priority=1)
    assert result.as_numpy("y").shape == (1, 512)
    with pytest.raises(InferenceServerException, match=r"priority 5 is outside 1\.\.2"):
        client.infer("slowprio", [slow_input()], priority=5)


def test_statistics_for_every_model_and_unknown(client: Any) -> None:
    names = {s.name for s in client.get_inference_statistics().model_stats}
    assert names == {"digits", "slow", "slowwait", "slowprio"}
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        client.get_inference_statistics("nope")


def test_metrics_endpoint_is_prometheus_text(daemon: Daemon) -> None:
    with urllib.request.urlopen(daemon.metrics_url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    assert "# TYPE nv_inference_request_success untyped" in text  # Triton's exact name
    assert "# TYPE edge_agent_rejected_requests_total counter" in text
    assert "# TYPE edge_agent_batch_size histogram" in text
