"""Every malformed request gets a clear INVALID_ARGUMENT / NOT_FOUND and hurts nothing else."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.service_pb2 as tpb
import tritonclient.grpc.service_pb2_grpc as tpb_grpc
from tritonclient.utils import InferenceServerException


def digits_request(shape: list[int], data: bytes, datatype: str = "FP32") -> tpb.ModelInferRequest:
    request = tpb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="input", datatype=datatype, shape=shape)
    request.raw_input_contents.append(data)
    return request


@pytest.fixture
def stub(server: Any) -> Any:
    """A raw stub (tritonclient's own protobuf classes) for requests tritonclient won't build."""
    with grpc.insecure_channel(server.url) as channel:
        yield tpb_grpc.GRPCInferenceServiceStub(channel)


def call(stub: Any, request: tpb.ModelInferRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=30)
    return info.value


ONE = np.zeros((1, 64), np.float32).tobytes()


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        (tpb.ModelInferRequest(model_name="nope"), "NOT_FOUND", "unknown model 'nope'"),
        (
            tpb.ModelInferRequest(model_name="digits", model_version="9"),
            "NOT_FOUND",
            "no version '9'",
        ),
        (
            tpb.ModelInferRequest(model_name="digits", model_version="latest"),
            "NOT_FOUND",
            "no version 'latest'",
        ),
        (digits_request([1, 64], ONE, "FP64"), "INVALID_ARGUMENT", "datatype 'FP64'"),
        (digits_request([1, 64], ONE, "WHAT"), "INVALID_ARGUMENT", "datatype 'WHAT'"),
        (digits_request([2, 64], ONE), "INVALID_ARGUMENT", "needs 512 bytes, got 256"),
        (digits_request([1, 64], ONE[:-1]), "INVALID_ARGUMENT", "needs 256 bytes, got 255"),
        (digits_request([1, -64], ONE), "INVALID_ARGUMENT", "negative dimension"),
        (digits_request([-1, 64], ONE), "INVALID_ARGUMENT", "negative dimension"),
        # An absurd claimed shape is checked against the bytes, never allocated.
        (digits_request([64, 2**40], ONE), "INVALID_ARGUMENT", "input 'input'"),
        (digits_request([1, 2**62, 2**62], ONE), "INVALID_ARGUMENT", "dimensions"),
        (digits_request([65, 64], ONE * 65), "INVALID_ARGUMENT", "outside 1..64"),
        (digits_request([0, 64], b""), "INVALID_ARGUMENT", "outside 1..64"),
        (digits_request([64], ONE), "INVALID_ARGUMENT", "model expects 2"),
        (
            tpb.ModelInferRequest(model_name="digits"),
            "INVALID_ARGUMENT",
            "missing inputs ['input']",
        ),
    ],
)
def test_rejected_with_clear_status(stub: Any, request_: Any, code: str, message: str) -> None:
    error = call(stub, request_)
    assert error.code().name == code
    assert message in error.details()


def test_extra_and_duplicate_inputs(stub: Any) -> None:
    request = digits_request([1, 64], ONE)
    request.inputs.add(name="extra", datatype="FP32", shape=[1])
    request.raw_input_contents.append(b"\0\0\0\0")
    error = call(stub, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown input 'extra'" in error.details()

    request = digits_request([1, 64], ONE)
    request.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(ONE)
    assert "given twice" in call(stub, request).details()


def test_raw_count_must_match_inputs(stub: Any) -> None:
    request = digits_request([1, 64], ONE)
    request.raw_input_contents.append(ONE)
    error = call(stub, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "1 inputs but 2 raw_input_contents" in error.details()


def test_raw_and_typed_contents_mixed(stub: Any) -> None:
    request = digits_request([1, 64], ONE)
    request.inputs[0].contents.fp32_contents.extend([0.0] * 64)
    error = call(stub, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "mixes raw_input_contents and typed contents" in error.details()


def test_typed_contents_are_accepted(stub: Any) -> None:
    sample = np.load("models/digits/sample.npy")
    request = tpb.ModelInferRequest(model_name="digits")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    tensor.contents.fp32_contents.extend(sample.reshape(-1).tolist())
    response = stub.ModelInfer(request, timeout=30)
    names = [o.name for o in response.outputs]
    label = np.frombuffer(response.raw_output_contents[names.index("label")], "<i8")
    assert label.tolist() == [7]


@pytest.mark.parametrize(
    ("fill", "message"),
    [
        (lambda c: c.fp32_contents.extend([0.0] * 63), "needs 64 values, fp32_contents has 63"),
        (lambda c: c.int_contents.extend([0] * 64), "belongs in fp32_contents, not int_contents"),
    ],
)
def test_typed_contents_checked(stub: Any, fill: Any, message: str) -> None:
    request = tpb.ModelInferRequest(model_name="digits")
    fill(request.inputs.add(name="input", datatype="FP32", shape=[1, 64]).contents)
    error = call(stub, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details()


def test_typed_integer_out_of_range(stub: Any) -> None:
    request = tpb.ModelInferRequest(model_name="int8")
    request.inputs.add(name="x", datatype="INT8", shape=[1, 2]).contents.int_contents.extend(
        [1, 300]
    )
    error = call(stub, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'x': a value is out of range for INT8" in error.details()


def test_fp16_cannot_travel_typed(stub: Any) -> None:
    request = tpb.ModelInferRequest(model_name="alltypes")
    request.inputs.add(name="in_FP16", datatype="FP16", shape=[1, 1]).contents.fp32_contents.append(
        1
    )
    error = call(stub, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "FP16 data must be sent raw" in error.details()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x05\0\0\0abc", "claims 5 bytes"),
        (b"\x01\0", "need at least 4 bytes"),
        (b"\x01\0\0\0ab", "left over"),
        (b"\x02\0\0\0\xff\xfe", "not UTF-8"),
    ],
)
def test_malformed_bytes_tensor(stub: Any, data: bytes, message: str) -> None:
    request = tpb.ModelInferRequest(model_name="text")
    request.inputs.add(name="x", datatype="BYTES", shape=[1, 1])
    request.raw_input_contents.append(data)
    error = call(stub, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details()


def test_bytes_tensor_round_trip(client: Any) -> None:
    data = np.array([["a", "\u00e9t\u00e9"], ["", "z" * 1000]], dtype=object)
    tensor = grpcclient.InferInput("x", [2, 2], "BYTES")
    tensor.set_data_from_numpy(data)
    got = client.infer("text", [tensor]).as_numpy("y")
    assert got.tolist() == [[s.encode() for s in row] for row in data.tolist()]


def test_unknown_output_and_fixed_shape(client: Any) -> None:
    tensor = grpcclient.InferInput("input", [1, 64], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 64), np.float32))
    with pytest.raises(InferenceServerException, match="unknown output 'nope'"):
        client.infer("digits", [tensor], outputs=[grpcclient.InferRequestedOutput("nope")])
    fixed = grpcclient.InferInput("x", [3, 2], "FP32")
    fixed.set_data_from_numpy(np.zeros((3, 2), np.float32))
    with pytest.raises(InferenceServerException, match=r"does not match the model's \[2, 3\]"):
        client.infer("fixed", [fixed])


def test_daemon_still_serves_after_bad_requests(stub: Any, client: Any) -> None:
    for shape in ([1, 64], [2, 64], [-5, 3], [2**31, 2**31]):
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(digits_request(shape, b"\0" * 8), timeout=30)
    tensor = grpcclient.InferInput("input", [1, 64], "FP32")
    tensor.set_data_from_numpy(np.load("models/digits/sample.npy"))
    assert client.infer("digits", [tensor]).as_numpy("label").tolist() == [7]


def test_malformed_protobuf_is_invalid_argument(server: Any) -> None:
    with grpc.insecure_channel(server.url) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as info:
            infer(b"\xff\xff\xff\xff not a protobuf", timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed ModelInferRequest" in info.value.details()
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        good = tpb.ModelInferRequest(model_name="digits", id="good")
        good.inputs.add(name="input", datatype="FP32", shape=[1, 64])
        good.raw_input_contents.append(ONE)
        answers = [
            tpb.ModelStreamInferResponse.FromString(raw)
            for raw in stream(iter([b"\xff\xff\xff", good.SerializeToString()]), timeout=30)
        ]
    assert "malformed ModelInferRequest" in answers[0].error_message
    assert answers[1].error_message == "" and answers[1].infer_response.id == "good"


def test_malformed_health_and_reflection_requests_are_invalid_argument(server: Any) -> None:
    # grpcio's own health and reflection servicers, registered with our lenient deserializers:
    # bytes that do not parse were UNKNOWN with a logged traceback.
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    garbage = b"\xff\xff\xff\xff not a protobuf"
    with grpc.insecure_channel(server.url) as channel:
        for path, streams in (
            ("/grpc.health.v1.Health/Check", False),
            ("/grpc.health.v1.Health/Watch", True),
        ):
            with pytest.raises(grpc.RpcError) as info:
                if streams:
                    list(channel.unary_stream(path)(garbage, timeout=30))
                else:
                    channel.unary_unary(path)(garbage, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, path
            assert "malformed HealthCheckRequest" in info.value.details()
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        ok = health_pb2.HealthCheckResponse.FromString(check(b"", timeout=30))
        assert ok.status == health_pb2.HealthCheckResponse.SERVING
        reflect = channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
        )
        listing = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
        answers = []
        with pytest.raises(grpc.RpcError) as info:
            for raw in reflect(iter([listing, garbage, listing]), timeout=30):
                answers.append(reflection_pb2.ServerReflectionResponse.FromString(raw))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed ServerReflectionRequest" in info.value.details()
        names = {s.name for s in answers[0].list_services_response.service}  # answered up to it
        assert "grpc.health.v1.Health" in names and len(answers) == 1
