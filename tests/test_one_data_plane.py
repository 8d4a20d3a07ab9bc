"""The three front ends share one data plane: the same bad request, sent over the asyncio gRPC
listener, gRPC's sync server (front_end = "sync") and HTTP, is refused with the same status and
the same message on each."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc.service_pb2 as tpb
import tritonclient.grpc.service_pb2_grpc as tpb_grpc

from conftest import Daemon

ROOT = Path(__file__).resolve().parents[1]
# The HTTP statuses api/http.py maps these gRPC codes to (Triton's).
HTTP_STATUS = {"NOT_FOUND": 404, "INVALID_ARGUMENT": 400}
ONE = np.zeros((1, 64), np.float32).tobytes()


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    data: bytes


@dataclass
class Bad:
    """One request, as either transport carries it."""

    inputs: list[Tensor]
    model: str = "digits"
    version: str = ""
    outputs: list[str] = field(default_factory=list)
    parameters: dict[str, int | str] = field(default_factory=dict)

    def grpc(self) -> tpb.ModelInferRequest:
        request = tpb.ModelInferRequest(model_name=self.model, model_version=self.version)
        for tensor in self.inputs:
            request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
            request.raw_input_contents.append(tensor.data)
        for name in self.outputs:
            request.outputs.add(name=name)
        for key, value in self.parameters.items():
            if isinstance(value, str):
                request.parameters[key].string_param = value
            else:
                request.parameters[key].int64_param = value
        return request

    def http(self) -> tuple[str, bytes, dict[str, str]]:
        """Path, body and headers: the tensors as binary data, the bytes exactly as over gRPC."""
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": t.name,
                        "datatype": t.datatype,
                        "shape": t.shape,
                        "parameters": {"binary_data_size": len(t.data)},
                    }
                    for t in self.inputs
                ],
                "outputs": [{"name": name} for name in self.outputs],
                "parameters": self.parameters,
            }
        ).encode()
        body = header + b"".join(t.data for t in self.inputs)
        version = f"/versions/{self.version}" if self.version else ""
        path = f"/v2/models/{self.model}{version}/infer"
        return path, body, {"Inference-Header-Content-Length": str(len(header))}


def digits(
    shape: list[int], data: bytes = ONE, datatype: str = "FP32", name: str = "input"
) -> Tensor:
    return Tensor(name, datatype, shape, data)


CASES = {
    "unknown model": Bad([digits([1, 64])], model="nope"),
    "unknown version": Bad([digits([1, 64])], version="9"),
    "wrong datatype": Bad([digits([1, 64], datatype="FP64")]),
    "bytes for another shape": Bad([digits([2, 64])]),
    "bytes short": Bad([digits([1, 64], ONE[:-1])]),
    "wrong rank": Bad([digits([64])]),
    "wrong dimension": Bad([digits([1, 63], ONE[:-4])]),
    "unknown input": Bad([digits([1, 64], name="nope")]),
    "input twice": Bad([digits([1, 64]), digits([1, 64])]),
    "unknown output": Bad([digits([1, 64])], outputs=["nope"]),
    "output twice": Bad([digits([1, 64])], outputs=["label", "label"]),
    "negative priority": Bad([digits([1, 64])], parameters={"priority": -1}),
    "priority not a number": Bad([digits([1, 64])], parameters={"priority": "high"}),
    "negative timeout": Bad([digits([1, 64])], parameters={"timeout": -5}),
    "too many elements": Bad([digits([1 << 20, 64])]),
}


def start(front_end: str) -> Daemon:
    return Daemon(
        [
            "--model-repository", str(ROOT / "models"), "--execution-providers", "cpu",
            "--http-address", "127.0.0.1:0",
        ],
        env={"EDGE_AGENT_FRONT_END": front_end},
    ).wait_started()  # fmt: skip


@pytest.fixture(scope="module")
def agents() -> Iterator[dict[str, Daemon]]:
    started = {"aio": start("aio"), "sync": start("sync")}
    yield started
    for daemon in started.values():
        daemon.stop()


def over_grpc(daemon: Daemon, request: tpb.ModelInferRequest) -> tuple[str, str]:
    with grpc.insecure_channel(daemon.url) as channel, pytest.raises(grpc.RpcError) as info:
        tpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    error: Any = info.value
    return error.code().name, error.details()


def over_http(daemon: Daemon, bad: Bad) -> tuple[int, str]:
    path, body, headers = bad.http()
    port = daemon.named("agent.started")[0]["http_port"]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", path, body=body, headers=headers)
    answer = conn.getresponse()
    document = json.loads(answer.read())
    conn.close()
    return answer.status, document["error"]


@pytest.mark.parametrize("case", CASES)
def test_every_front_end_refuses_alike(agents: dict[str, Daemon], case: str) -> None:
    bad = CASES[case]
    code, message = over_grpc(agents["aio"], bad.grpc())
    assert code in HTTP_STATUS, (code, message)
    assert message  # a reason, not an empty status
    assert over_grpc(agents["sync"], bad.grpc()) == (code, message)
    assert over_http(agents["aio"], bad) == (HTTP_STATUS[code], message)
    assert over_http(agents["sync"], bad) == (HTTP_STATUS[code], message)


def test_each_front_end_still_answers_a_good_request(agents: dict[str, Daemon]) -> None:
    """After every refusal: the same good request is answered alike on all three."""
    sample = np.load(ROOT / "models" / "digits" / "sample.npy").astype(np.float32)[:1]
    good = Bad([digits([1, 64], sample.tobytes())], outputs=["label"])
    labels = []
    for daemon in agents.values():
        with grpc.insecure_channel(daemon.url) as channel:
            answer = tpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(good.grpc(), timeout=30)
        labels.append(np.frombuffer(answer.raw_output_contents[0], np.int64).tolist())
        path, body, headers = good.http()
        port = daemon.named("agent.started")[0]["http_port"]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", path, body=body, headers=headers)
        document = json.loads(conn.getresponse().read())
        conn.close()
        labels.append(document["outputs"][0]["data"])
    assert len(labels) == 4 and all(label == labels[0] for label in labels), labels
