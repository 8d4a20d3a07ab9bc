"""Property-based fuzzing of a running control plane (run by tests/test_fuzz.py in its own
process, like tests/fuzz_rpcs.py).

    python tests/fuzz_fleet.py HOST:PORT EXAMPLES SEED PUBLISHER_TOKEN DEVICE_ID DEVICE_TOKEN

Every FleetService RPC gets random messages (every field drawn from its protobuf type, numbers
at the edges: 0, 2^31, 2^63, 2^64-1; strings of any characters and lengths; nested messages),
sent with each kind of credentials (publisher, the device, a wrong device id, garbage, none),
and random bytes. Every answer must carry one of the documented codes, never INTERNAL or
UNKNOWN. Prints one JSON line: codes seen, calls, bad answers.
"""

from __future__ import annotations

import collections
import json
import sys
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from edge_agent._proto import fleet_pb2 as pb
from edge_agent.fleet import auth

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
SERVICE = pb.DESCRIPTOR.services_by_name["FleetService"]
EDGES = [0, 1, 2**31, 2**32 - 1, 2**63 - 1, 2**63, 2**64 - 1]
T = FieldDescriptor


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.type == T.TYPE_STRING:
        return st.sampled_from(["mlp", "digits", "", "../x", "a" * 300]) | st.text(max_size=40)
    if field.type == T.TYPE_BYTES:
        return st.binary(max_size=200) | st.just(b'{"format": 1}')
    if field.type == T.TYPE_BOOL:
        return st.booleans()
    if field.type in (T.TYPE_DOUBLE, T.TYPE_FLOAT):
        return st.floats(allow_nan=True)
    if field.type == T.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values] + [99])
    if field.type in (T.TYPE_UINT64, T.TYPE_FIXED64):
        return st.sampled_from(EDGES) | st.integers(0, 2**64 - 1)
    if field.type in (T.TYPE_UINT32, T.TYPE_FIXED32):
        return st.sampled_from([0, 1, 2**31, 2**32 - 1]) | st.integers(0, 2**32 - 1)
    if field.type in (T.TYPE_INT64, T.TYPE_SINT64, T.TYPE_SFIXED64):
        return st.integers(-(2**63), 2**63 - 1)
    return st.integers(-(2**31), 2**31 - 1)


@st.composite
def message(draw: st.DrawFn, descriptor: Descriptor, depth: int = 0) -> Any:
    cls = getattr(pb, descriptor.name, None) or _nested(descriptor)
    out = cls()
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key = field.message_type.fields_by_name["key"]
            value = field.message_type.fields_by_name["value"]
            for _ in range(draw(st.integers(0, 2))):
                getattr(out, field.name)[draw(_scalar(key))] = draw(_scalar(value))
            continue
        count = draw(st.integers(0, 3)) if field.label == T.LABEL_REPEATED else 1
        for _ in range(count):
            if field.message_type is not None:
                if depth > 2:
                    break
                value = draw(message(field.message_type, depth + 1))
                if field.label == T.LABEL_REPEATED:
                    getattr(out, field.name).add().CopyFrom(value)
                else:
                    getattr(out, field.name).CopyFrom(value)
            elif field.label == T.LABEL_REPEATED:
                getattr(out, field.name).append(draw(_scalar(field)))
            else:
                setattr(out, field.name, draw(_scalar(field)))
    return out


def _nested(descriptor: Descriptor) -> Any:
    outer = getattr(pb, descriptor.containing_type.name)
    return getattr(outer, descriptor.name)


def main() -> None:
    address, examples, fuzz_seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    publisher, device_id, device_token = sys.argv[4], sys.argv[5], sys.argv[6]
    credentials = [
        auth.metadata(publisher),
        auth.metadata(device_token, device_id),
        auth.metadata(device_token, "someone-else"),
        auth.metadata("not-a-token", "edge 1 ?"),
        (),
    ]
    channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 8 << 20)])
    codes: collections.Counter[str] = collections.Counter()
    bad: list[str] = []

    def call(method: Any, request: bytes, meta: Any) -> None:
        path = f"/{SERVICE.full_name}/{method.name}"
        try:
            if method.client_streaming:
                fn = channel.stream_unary(path) if not method.server_streaming else None
                assert fn is not None
                fn(iter([request, request]), metadata=meta, timeout=10)
            elif method.server_streaming:
                for _ in channel.unary_stream(path)(request, metadata=meta, timeout=10):
                    pass
            else:
                channel.unary_unary(path)(request, metadata=meta, timeout=10)
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
        codes[code.name] += 1
        if code not in ALLOWED:
            bad.append(f"{method.name}: {code.name}")

    def fuzzer(method: Any) -> Any:
        @seed(fuzz_seed)
        @settings(
            max_examples=examples,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        @given(
            request=message(method.input_type),
            who=st.integers(0, len(credentials) - 1),
            noise=st.none() | st.binary(max_size=300),
        )
        def fuzz(request: Any, who: int, noise: bytes | None) -> None:
            if method.name == "WatchDesiredState":  # a long-poll may wait: keep the run short
                request.wait_ms %= 200
            payload = noise if noise is not None else request.SerializeToString()
            call(method, payload, credentials[who])

        return fuzz

    for method in SERVICE.methods:
        fuzzer(method)()
    print(json.dumps({"codes": dict(codes), "calls": sum(codes.values()), "bad": bad[:20]}))


if __name__ == "__main__":
    main()
