"""Property-based fuzzing of a running daemon (run by tests/test_fuzz.py in its own process: it
imports our generated stubs, which cannot share a process with tritonclient's).

    python tests/fuzz_rpcs.py HOST:PORT EXAMPLES [SEED]

Random and mutated ModelInferRequests (datatypes, shapes, byte lengths, parameters, huge and
negative dims, unknown names) and random bytes at every RPC. Every answer must carry one of the
documented status codes, never INTERNAL or UNKNOWN. Prints one JSON line: codes seen, examples.
"""

from __future__ import annotations

import collections
import json
import sys

import grpc
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from edge_agent._proto import grpc_service_pb2 as pb

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
DATATYPES = [
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
    "BF16",
]
MODELS = ["digits", "alltypes", "text", "echo", "no-such-model", ""]
NAMES = ["input", "in_FP32", "in_BYTES", "in_INT8", "x", "INPUT0", ""]

dims = st.one_of(
    st.integers(0, 8),
    st.integers(-3, -1),
    st.sampled_from([2**31, 2**40, 2**62, 2**63 - 1]),
)
parameter = st.one_of(
    st.builds(pb.InferParameter, bool_param=st.booleans()),
    st.builds(pb.InferParameter, int64_param=st.integers(-(2**63), 2**63 - 1)),
    st.builds(pb.InferParameter, uint64_param=st.integers(0, 2**64 - 1)),
    st.builds(pb.InferParameter, string_param=st.text(max_size=20)),
    st.builds(pb.InferParameter, double_param=st.floats(allow_nan=True)),
)
parameters = st.dictionaries(
    st.sampled_from(["priority", "timeout", "sequence_id", "binary_data_output"])
    | st.text(max_size=8),
    parameter,
    max_size=3,
)


@st.composite
def tensors(draw: st.DrawFn) -> pb.ModelInferRequest.InferInputTensor:
    tensor = pb.ModelInferRequest.InferInputTensor(
        name=draw(st.sampled_from(NAMES) | st.text(max_size=10)),
        datatype=draw(st.sampled_from(DATATYPES) | st.text(max_size=6)),
        shape=draw(st.lists(dims, max_size=4)),
    )
    for key, value in draw(parameters).items():
        tensor.parameters[key].CopyFrom(value)
    typed = draw(st.integers(0, 4))
    if typed == 1:
        tensor.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=80)))
    elif typed == 2:
        tensor.contents.int_contents.extend(
            draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=80))
        )
    elif typed == 3:
        tensor.contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=8), max_size=10)))
    return tensor


@st.composite
def infer_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(
        model_name=draw(st.sampled_from(MODELS)),
        model_version=draw(st.sampled_from(["", "1", "2", "99", "-1", "x"])),
        id=draw(st.text(max_size=8)),
    )
    request.inputs.extend(draw(st.lists(tensors(), max_size=3)))
    for key, value in draw(parameters).items():
        request.parameters[key].CopyFrom(value)
    if draw(st.booleans()):
        request.raw_input_contents.extend(
            draw(st.lists(st.binary(max_size=1024), max_size=len(request.inputs) + 1))
        )
    for name in draw(
        st.lists(st.sampled_from(["probabilities", "label", "out_FP32", "zzz"]), max_size=2)
    ):
        request.outputs.add(name=name)
    return request


def mutate(data: bytes, flips: list[int]) -> bytes:
    out = bytearray(data)
    for f in flips:
        if out:
            out[f % len(out)] ^= 1 << (f % 8)
    return bytes(out)


def main() -> None:
    address, examples = sys.argv[1], int(sys.argv[2])
    fixed_seed = int(sys.argv[3]) if len(sys.argv) > 3 else 1234
    channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 1 << 26)])
    seen: collections.Counter[str] = collections.Counter()
    bad: list[str] = []
    methods = [m.name for m in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods]

    def call(method: str, payload: bytes) -> None:
        path = f"/inference.GRPCInferenceService/{method}"
        try:
            if method == "ModelStreamInfer":
                stream = channel.stream_stream(path)(iter([payload]), timeout=10)
                for _ in stream:
                    pass
            else:
                channel.unary_unary(path)(payload, timeout=10)
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
        seen[code.name] += 1
        if code not in ALLOWED:
            bad.append(f"{method}: {code.name} for {payload[:80]!r}")

    run = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        derandomize=False,
    )

    @run
    @seed(fixed_seed)
    @given(infer_requests(), st.lists(st.integers(0, 10**6), max_size=4))
    def infer(request: pb.ModelInferRequest, flips: list[int]) -> None:
        data = request.SerializeToString()
        call("ModelInfer", data)
        if flips:
            call("ModelInfer", mutate(data, flips))

    @run
    @seed(fixed_seed)
    @given(st.sampled_from(methods), st.binary(max_size=512))
    def any_rpc(method: str, payload: bytes) -> None:
        call(method, payload)

    infer()
    any_rpc()
    print(json.dumps({"codes": dict(seen), "bad": bad[:20], "calls": sum(seen.values())}))


if __name__ == "__main__":
    main()
