"""KServe v2 over HTTP/REST: tritonclient.http and perf_analyzer -i http against the agent, the
same answers and errors as gRPC, and bad input answered 400 with the daemon unaffected."""

from __future__ import annotations

import http.client
import json
import platform
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from test_perf_analyzer import STEADY_ENOUGH
from tritonclient.utils import InferenceServerException

from conftest import Daemon

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = np.load(ROOT / "models" / "digits" / "sample.npy")
TOOL = ROOT / "scripts" / "perf_analyzer"


@pytest.fixture(scope="module")
def agent() -> Iterator[Daemon]:
    daemon = Daemon(
        [
            "--model-repository", str(ROOT / "models"), "--execution-providers", "cpu",
            "--http-address", "127.0.0.1:0", "--http-control-address", "127.0.0.1:0",
            "--max-message-bytes", str(1 << 20),
            "--model-control-mode", "explicit", "--load-model", "digits",
        ],
        # The default: load / unload on the control listener only.
        env={"EDGE_AGENT_CONTROL_ON_INFERENCE_LISTENER": "false"},
    ).wait_started()  # fmt: skip
    yield daemon
    daemon.stop()


def http_url(agent: Daemon, control: bool = False) -> str:
    started = agent.named("agent.started")[0]
    return f"127.0.0.1:{started['http_control_port' if control else 'http_port']}"


def raw(
    agent: Daemon, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
    host, port = http_url(agent).split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    answer = conn.getresponse()
    data = answer.read()
    conn.close()
    try:
        document = json.loads(data) if data else None
    except ValueError:
        document = None
    return answer.status, document, dict(answer.getheaders())


def test_tritonclient_http_metadata_config_and_health(agent: Daemon) -> None:
    client = httpclient.InferenceServerClient(http_url(agent))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits") and not client.is_model_ready("nope")
    server = client.get_server_metadata()
    assert server["name"] == "edge-agent" and "model_repository" in server["extensions"]
    metadata = client.get_model_metadata("digits")
    grpc_metadata = grpcclient.InferenceServerClient(agent.url).get_model_metadata(
        "digits", as_json=True
    )
    assert metadata["name"] == "digits" and metadata["versions"] == ["1"]
    assert [(i["name"], i["datatype"]) for i in metadata["inputs"]] == [
        (i["name"], i["datatype"]) for i in grpc_metadata["inputs"]
    ]
    assert metadata["inputs"][0]["shape"] == [-1, 64]  # numbers, as Triton writes them
    config = client.get_model_config("digits")
    assert config["name"] == "digits" and config["max_batch_size"] == 64
    assert isinstance(config["max_batch_size"], int)


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_http_infer_json_and_binary(agent: Daemon, binary: bool) -> None:
    client = httpclient.InferenceServerClient(http_url(agent))
    batch = np.repeat(SAMPLE, 3, axis=0)
    tensor = httpclient.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch, binary_data=binary)
    outputs = [
        httpclient.InferRequestedOutput("probabilities", binary_data=binary),
        httpclient.InferRequestedOutput("label", binary_data=binary),
    ]
    result = client.infer("digits", [tensor], outputs=outputs, request_id="r-1")
    via_grpc = grpcclient.InferenceServerClient(agent.url)
    grpc_input = grpcclient.InferInput("input", list(batch.shape), "FP32")
    grpc_input.set_data_from_numpy(batch)
    expected = via_grpc.infer("digits", [grpc_input])
    assert np.allclose(result.as_numpy("probabilities"), expected.as_numpy("probabilities"))
    assert (result.as_numpy("label") == [7, 7, 7]).all()
    assert result.get_response()["id"] == "r-1"


def test_errors_carry_the_grpc_message(agent: Daemon) -> None:
    client = httpclient.InferenceServerClient(http_url(agent))
    via_grpc = grpcclient.InferenceServerClient(agent.url)
    for call in (
        lambda c, m: c.get_model_metadata("nope"),
        lambda c, m: c.infer("digits", [wrong_shape(m)]),
    ):
        with pytest.raises(InferenceServerException) as over_http:
            call(client, httpclient)
        with pytest.raises(InferenceServerException) as over_grpc:
            call(via_grpc, grpcclient)
        assert over_http.value.message() == over_grpc.value.message()


def wrong_shape(module: Any) -> Any:
    tensor = module.InferInput("input", [1, 63], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 63), np.float32))
    return tensor


def test_statistics_count_http_requests(agent: Daemon) -> None:
    client = httpclient.InferenceServerClient(http_url(agent))
    before = client.get_inference_statistics("digits")["model_stats"][0]
    tensor = httpclient.InferInput("input", [1, 64], "FP32")
    tensor.set_data_from_numpy(SAMPLE)
    client.infer("digits", [tensor])
    after = client.get_inference_statistics("digits")["model_stats"][0]
    count = after["inference_stats"]["success"]["count"]
    assert isinstance(count, int) and count == before["inference_stats"]["success"]["count"] + 1
    everything = client.get_inference_statistics()
    assert [m["name"] for m in everything["model_stats"]] == ["digits"]


def infer_body(data: Any, shape: list[int], datatype: str = "FP32") -> bytes:
    return json.dumps(
        {"inputs": [{"name": "input", "shape": shape, "datatype": datatype, "data": data}]}
    ).encode()


def test_bad_input_answers_400_and_the_daemon_lives_on(agent: Daemon) -> None:
    path = "/v2/models/digits/infer"
    cases: list[tuple[bytes, dict[str, str], int, str]] = [
        (b"{not json", {}, 400, "not valid JSON"),
        (b"[1, 2]", {}, 400, "must be a JSON object"),
        (infer_body([0.0] * 63, [1, 64]), {}, 400, "63 values in 'data'"),
        (infer_body(["x"] * 64, [1, 64]), {}, 400, "is not a FP32 value"),
        (infer_body([0.0] * 64, [1, 64], "FP64"), {}, 400, "datatype"),
        (infer_body([0] * 64, [1, -64]), {}, 400, "'shape' must be a list of sizes"),
        (infer_body([0.0], [1 << 30, 64]), {}, 400, "exceed the limit"),
        (infer_body([0.0] * 64, [1, 64]), {"Inference-Header-Content-Length": "99999"}, 400,
         "the body has only"),
        (infer_body([0.0] * 64, [1, 64]) + b"\0" * 8,
         {"Inference-Header-Content-Length": str(len(infer_body([0.0] * 64, [1, 64])))}, 400,
         "belong to no input"),
        (b'{"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", '
         b'"parameters": {"binary_data_size": 256}}]}', {}, 400, "bytes of binary data remain"),
        (b"x" * (2 << 20), {}, 413, "exceeds"),
        (infer_body([0.0] * 64, [1, 64]), {"Content-Encoding": "gzip"}, 400, "compressed"),
    ]  # fmt: skip
    for body, headers, status, words in cases:
        code, document, _ = raw(agent, "POST", path, body, headers)
        assert code == status, (words, code, document)
        assert document is not None and words in document["error"], (words, document)
    code, document, headers = raw(agent, "DELETE", path)
    assert code == 405 and document is not None and "error" in document
    assert "POST" in headers.get("Allow", "")
    code, document, _ = raw(agent, "GET", "/v2/nothing/here")
    assert code == 404 and document is not None
    code, _, _ = raw(agent, "GET", "/v2/health/ready")
    assert code == 200
    good = raw(agent, "POST", path, infer_body(SAMPLE.reshape(-1).tolist(), [1, 64]))
    assert good[0] == 200 and good[1] is not None
    assert good[1]["outputs"][1]["data"] == [7]
    assert agent.proc.poll() is None


def test_repository_endpoints_only_on_the_control_listener(agent: Daemon) -> None:
    code, document, _ = raw(agent, "POST", "/v2/repository/index", b"{}")
    assert code == 403 and document is not None and "control listener" in document["error"]
    control = httpclient.InferenceServerClient(http_url(agent, control=True))
    index = control.get_model_repository_index()
    assert {(m["name"], m.get("state")) for m in index} >= {("digits", "READY")}
    control.unload_model("digits")
    assert not control.is_model_ready("digits")
    control.load_model("digits")
    assert control.is_model_ready("digits")


@pytest.mark.skipif(platform.machine() != "x86_64", reason="perf_analyzer ships for x86_64 only")
def test_perf_analyzer_over_http(agent: Daemon) -> None:
    result = subprocess.run(
        [str(TOOL), "-m", "digits", "-u", http_url(agent), "-i", "http",
         "--concurrency-range", "2", "--measurement-interval", "1000", *STEADY_ENOUGH],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    throughput = re.search(r"Throughput: ([0-9.]+) infer/sec", result.stdout)
    assert throughput is not None and float(throughput.group(1)) > 0, result.stdout[-3000:]


def test_https_and_mtls_follow_the_grpc_tls_settings(tmp_path: Path, start_daemon: Any) -> None:
    import ssl
    import urllib.error
    import urllib.request

    from test_security import make_pki

    pki = make_pki(tmp_path)
    daemon = start_daemon(
        "--model-repository", str(ROOT / "models"), "--execution-providers", "cpu",
        "--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"]),
        "--tls-client-ca", str(pki["ca"]), "--http-address", "127.0.0.1:0",
    ).wait_started()  # fmt: skip
    url = f"https://localhost:{daemon.named('agent.started')[0]['http_port']}/v2/health/ready"

    def get(context: ssl.SSLContext | None) -> int:
        try:
            with urllib.request.urlopen(url.replace("https", "http") if context is None else url,
                                        timeout=10, context=context) as answer:  # fmt: skip
                return int(answer.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except (urllib.error.URLError, ssl.SSLError, ConnectionError):
            return -1

    trusting = ssl.create_default_context(cafile=str(pki["ca"]))
    assert get(None) == -1  # plaintext against TLS
    assert get(trusting) == -1  # no client certificate: refused in the handshake
    trusting.load_cert_chain(str(pki["client_cert"]), str(pki["client_key"]))
    assert get(trusting) == 200
