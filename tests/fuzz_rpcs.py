"""Fuzzing the daemon's gRPC listeners (driven by benchmarks/fuzz.py; it imports our generated
stubs, which cannot share a process with tritonclient's).

- Inference (both listeners): random and mutated ModelInferRequests (datatypes, shapes, byte
  lengths, parameters, huge and negative dims, unknown names) and random bytes at every RPC of
  the inference, health and reflection services.
- System shared memory: Register / Status / Unregister with random names, keys, offsets and
  sizes, and inference requests naming regions with random offsets and sizes. Keys are only
  ever regions this run created, names under its own prefix that do not exist, or strings that
  are not POSIX names (refused before any file is opened): nothing else on the host is named.
- SubmitExamples (both listeners): random requests and mutated valid ones (the digits model's
  rows and labels).
- The control listener: RepositoryIndex / ModelLoad / ModelUnload with random names and
  parameters, never of the models the other fuzzers use (those stay loaded).
"""

from __future__ import annotations

import random
import struct
from typing import Any

import grpc
from fuzzing import (
    Grpc,
    Tally,
    Targets,
    deep_json,
    hypothesis_settings,
    mutate_bytes,
    mutate_message,
)
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from edge_agent._proto import examples_pb2 as epb
from edge_agent._proto import grpc_service_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
METHODS = [m for m in SERVICE.methods]
INFER = f"/{SERVICE.full_name}/ModelInfer"
SUBMIT = "/edge_agent.learn.v1.ExampleService/SubmitExamples"
HEALTH = "/grpc.health.v1.Health/Check"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
SHM_METHODS = (
    "SystemSharedMemoryRegister",
    "SystemSharedMemoryStatus",
    "SystemSharedMemoryUnregister",
)
CONTROL_RPCS = ("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload")
PROTECTED = {"digits", "alltypes", "text"}  # what the other fuzzers infer on: never unloaded
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
REGION_NAMES = ["r0", "r1", "r2", "r3", ""]

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


def digits_request(rows: int = 1) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="input", datatype="FP32", shape=[rows, 64])
    request.raw_input_contents.append(struct.pack(f"<{rows * 64}f", *([0.5] * rows * 64)))
    return request


def valid_infers() -> list[pb.ModelInferRequest]:
    """Requests the test repository's models answer, to mutate."""
    digits = digits_request(2)
    digits.outputs.add(name="label")
    echo = pb.ModelInferRequest(model_name="echo", model_version="2")
    echo.inputs.add(name="x", datatype="FP32", shape=[1, 3])
    echo.inputs[0].contents.fp32_contents.extend([1.0, 2.0, 3.0])
    text = pb.ModelInferRequest(model_name="text")
    text.inputs.add(name="x", datatype="BYTES", shape=[1, 2])
    text.raw_input_contents.append(b"\x01\x00\x00\x00a\x02\x00\x00\x00bc")
    alltypes = pb.ModelInferRequest(model_name="alltypes")
    alltypes.inputs.add(name="in_INT8", datatype="INT8", shape=[1, 2])
    alltypes.raw_input_contents.append(b"\x01\x02")
    alltypes.parameters["priority"].uint64_param = 1
    return [digits_request(), digits, echo, text, alltypes]


VERSIONED = {
    "ModelInfer": ("ModelInferRequest", "model_version"),
    "ModelStreamInfer": ("ModelInferRequest", "model_version"),
    "ModelMetadata": ("ModelMetadataRequest", "version"),
    "ModelReady": ("ModelReadyRequest", "version"),
    "ModelConfig": ("ModelConfigRequest", "version"),
    "ModelStatistics": ("ModelStatisticsRequest", "version"),
}


def known_bug(method: str, payload: bytes) -> str | None:
    """The entry of fuzzing.KNOWN_BUGS this request triggers, if any: none of this listener's
    are open now (a Unicode-digit version and a too-deep config were fixed; the fuzzing replays
    them as regressions)."""
    return None


def stream_status(answers: list[bytes]) -> grpc.StatusCode | None:
    """INTERNAL if a ModelStreamInfer answer carries the message of one (rpc/status.py)."""
    for data in answers:
        if pb.ModelStreamInferResponse.FromString(data).error_message.startswith("internal error"):
            return grpc.StatusCode.INTERNAL
    return None


def unprotected(name: str) -> str:
    return name + "-not" if name in PROTECTED else name


def is_posix_name(key: str) -> bool:
    """What api/shm.py would try to open (see SharedMemory.register)."""
    return (
        key.startswith("/")
        and "/" not in key[1:]
        and key not in ("/", "/.", "/..")
        and "\0" not in key
    )


class Daemon:
    """Calls on the daemon's gRPC listeners, with the guards that keep them safe."""

    def __init__(self, targets: Targets, tally: Tally) -> None:
        self.t = targets
        self.inference = Grpc(targets.daemon_grpc, tally)
        self.control = Grpc(targets.daemon_control, tally)

    def safe_key(self, key: str) -> str:
        """Ours, or not a POSIX name, or a name under our prefix that does not exist."""
        if key in self.t.shm_regions or not is_posix_name(key):
            return key
        return f"{self.t.shm_prefix}-missing-{key[1:]}"[:200]

    def safe_register(self, payload: bytes) -> bytes:
        try:
            request = pb.SystemSharedMemoryRegisterRequest.FromString(payload)
        except DecodeError:
            return payload  # refused before it is read
        safe = self.safe_key(request.key)
        if safe == request.key:
            return payload
        request.key = safe
        return bytes(request.SerializeToString())

    def safe_control(self, method: str, payload: bytes) -> bytes:
        if method not in ("RepositoryModelLoad", "RepositoryModelUnload"):
            return payload
        try:
            message = getattr(pb, method + "Request").FromString(payload)
        except DecodeError:
            return payload
        if message.model_name not in PROTECTED:
            return payload
        message.model_name = unprotected(message.model_name)
        return bytes(message.SerializeToString())

    def rpc(self, method: str, payload: bytes, control: bool = False) -> None:
        """Any inference-service method with any bytes, on either listener."""
        if method == "SystemSharedMemoryRegister":
            payload = self.safe_register(payload)
        payload = self.safe_control(method, payload)
        listener = "grpc.control" if control else "grpc.inference"
        if method in SHM_METHODS:
            listener = "grpc.shared_memory"
        channel = self.control if control else self.inference
        kind = "bidi" if method == "ModelStreamInfer" else "unary"
        path = f"/{SERVICE.full_name}/{method}"
        check = stream_status if kind == "bidi" else None
        channel.call(
            listener, path, payload, kind, known=known_bug(method, payload), in_stream=check
        )

    def infer(self, payload: bytes, control: bool = False, listener: str = "") -> None:
        channel = self.control if control else self.inference
        listener = listener or ("grpc.control" if control else "grpc.inference")
        channel.call(listener, INFER, payload, known=known_bug("ModelInfer", payload))

    def submit(self, payload: bytes, control: bool) -> None:
        (self.control if control else self.inference).call("grpc.examples", SUBMIT, payload)

    def close(self) -> None:
        self.inference.close()
        self.control.close()


def shm_infer(
    request: pb.ModelInferRequest, region: str, offset: Any, size: Any, output: bool
) -> pb.ModelInferRequest:
    """The request with its first input (or an output) read from (written to) a region."""
    out = pb.ModelInferRequest()
    out.CopyFrom(request)
    if output:
        target = out.outputs.add(name="label").parameters
    elif out.inputs:
        target = out.inputs[0].parameters
        del out.raw_input_contents[:]
    else:
        return out
    target["shared_memory_region"].string_param = region
    for key, value in (("shared_memory_offset", offset), ("shared_memory_byte_size", size)):
        if isinstance(value, int) and value >= 0:
            target[key].uint64_param = value
        elif isinstance(value, int):
            target[key].int64_param = value
        elif value is not None:
            target[key].string_param = str(value)
    return out


def fuzzers(targets: Targets, tally: Tally, examples: int, seed: int) -> list[Any]:
    d = Daemon(targets, tally)
    run = hypothesis_settings(examples, seed)
    regions = list(targets.shm_regions)
    prefix = targets.shm_prefix
    keys = st.one_of(
        st.sampled_from(regions),
        st.text("abcdef0123456789-_.", max_size=12).map(lambda t: f"{prefix}-missing-{t}"),
        st.sampled_from(["", "/", "/.", "/..", "//", "/a/b", "no-slash", "../x", "/x\x00y"]),
        st.text(max_size=20),  # made safe by Daemon.safe_key
    )
    sizes = st.sampled_from([0, 1, 255, 256, 4096, 1 << 20, 2**63 - 1, 2**64 - 1]) | st.integers(
        0, 2**64 - 1
    )
    region_names = st.sampled_from(REGION_NAMES) | st.text(max_size=8)
    methods = [m.name for m in METHODS]

    @run
    @given(infer_requests(), st.lists(st.integers(0, 10**6), max_size=4), st.booleans())
    def infer(request: pb.ModelInferRequest, flips: list[int], control: bool) -> None:
        data = request.SerializeToString()
        d.infer(data, control)
        if flips:
            out = bytearray(data)
            for f in flips:
                if out:
                    out[f % len(out)] ^= 1 << (f % 8)
            d.infer(bytes(out), control)

    @run
    @given(st.sampled_from(methods), st.binary(max_size=512), st.booleans())
    def any_rpc(method: str, payload: bytes, control: bool) -> None:
        d.rpc(method, payload, control)

    @run
    @given(st.sampled_from([HEALTH, REFLECTION]), st.binary(max_size=128), st.booleans())
    def other_services(path: str, payload: bytes, control: bool) -> None:
        channel = d.control if control else d.inference
        kind = "bidi" if path == REFLECTION else "unary"
        channel.call("grpc.control" if control else "grpc.inference", path, payload, kind)

    operation = st.one_of(
        st.tuples(st.just("register"), region_names, keys, sizes, sizes),
        st.tuples(st.just("status"), region_names),
        st.tuples(st.just("unregister"), region_names),
        st.tuples(
            st.just("infer"),
            region_names,
            sizes | st.integers(-5, -1) | st.none(),
            sizes | st.integers(-5, -1) | st.none(),
            st.booleans(),
        ),
    )

    @run
    @given(st.lists(operation, min_size=1, max_size=6))
    def shared_memory(operations: list[tuple[Any, ...]]) -> None:
        for op in operations:
            if op[0] == "register":
                _, name, key, offset, size = op
                request = pb.SystemSharedMemoryRegisterRequest(
                    name=name, key=d.safe_key(key), offset=offset, byte_size=size
                )
                d.rpc("SystemSharedMemoryRegister", request.SerializeToString())
            elif op[0] == "status":
                d.rpc(
                    "SystemSharedMemoryStatus",
                    pb.SystemSharedMemoryStatusRequest(name=op[1]).SerializeToString(),
                )
            elif op[0] == "unregister":
                d.rpc(
                    "SystemSharedMemoryUnregister",
                    pb.SystemSharedMemoryUnregisterRequest(name=op[1]).SerializeToString(),
                )
            else:
                _, name, offset, size, output = op
                request = shm_infer(digits_request(), name, offset, size, output)
                d.infer(request.SerializeToString(), listener="grpc.shared_memory")

    @run
    @given(
        st.sampled_from(["digits", "echo", "fixed", "text", "no-such", ""]) | st.text(max_size=8),
        st.lists(
            st.builds(
                epb.ExampleTensor,
                name=st.sampled_from(NAMES) | st.text(max_size=6),
                datatype=st.sampled_from(DATATYPES) | st.text(max_size=5),
                shape=st.lists(dims, max_size=3),
            ),
            max_size=3,
        ),
        st.lists(st.binary(max_size=600), max_size=3),
        st.lists(st.integers(-(2**63), 2**63 - 1) | st.integers(-2, 12), max_size=8),
        st.booleans(),
    )
    def examples_random(
        model: str, inputs: list[Any], raw: list[bytes], labels: list[int], control: bool
    ) -> None:
        request = epb.SubmitExamplesRequest(model_name=model, labels=labels)
        request.inputs.extend(inputs)
        request.raw_input_contents.extend(raw)
        d.submit(request.SerializeToString(), control)

    @run
    @given(st.integers(0, 4), st.randoms(use_true_random=False), st.booleans())
    def examples_mutated(rows: int, rng: random.Random, control: bool) -> None:
        request = mutate_message(rng, valid_examples(rows))
        d.submit(request.SerializeToString(), control)

    @run
    @given(
        st.sampled_from(CONTROL_RPCS),
        st.sampled_from(["echo", "fixed", "int8", "broken", "evil", "mismatch", "no-such", ""])
        | st.text(max_size=10),
        st.dictionaries(
            st.sampled_from(
                [
                    "config",
                    "file:1/model.onnx",
                    "file:²/model.onnx",
                    "file:1/../x",
                    "rollback",
                    "unload_dependents",
                ]
            )
            | st.text(max_size=8),
            st.builds(pb.ModelRepositoryParameter, bool_param=st.booleans())
            | st.builds(
                pb.ModelRepositoryParameter,
                string_param=st.sampled_from(["{}", '{"max_batch_size": -1}', "x"])
                | st.text(max_size=20),
            )
            | st.builds(pb.ModelRepositoryParameter, bytes_param=st.binary(max_size=64))
            | st.builds(pb.ModelRepositoryParameter, int64_param=st.integers(-(2**63), 2**63 - 1)),
            max_size=3,
        ),
        st.booleans(),
    )
    def repository(method: str, model: str, params: dict[str, Any], ready: bool) -> None:
        if method == "RepositoryIndex":
            message: Any = pb.RepositoryIndexRequest(ready=ready)
        else:
            message = getattr(pb, method + "Request")(model_name=unprotected(model))
            for key, value in params.items():
                message.parameters[key].CopyFrom(value)
        d.rpc(method, message.SerializeToString(), control=True)

    return [
        infer,
        any_rpc,
        other_services,
        shared_memory,
        examples_random,
        examples_mutated,
        repository,
    ]


def valid_examples(rows: int) -> epb.SubmitExamplesRequest:
    request = epb.SubmitExamplesRequest(model_name="digits", labels=[i % 10 for i in range(rows)])
    request.inputs.add(name="input", datatype="FP32", shape=[rows, 64])
    request.raw_input_contents.append(struct.pack(f"<{rows * 64}f", *([1.0] * rows * 64)))
    return request


def mutations(targets: Targets, tally: Tally) -> list[tuple[float, Any]]:
    """The fast loop's cases: mutations of valid requests (fields set to edge values anywhere
    in the message, or byte-level changes to its encoding)."""
    d = Daemon(targets, tally)
    infers = valid_infers()
    pool = [r.SerializeToString() for r in infers]
    regions = list(targets.shm_regions)
    methods = [m.name for m in METHODS if m.name != "ModelStreamInfer"]

    def infer(rng: random.Random) -> None:
        request = rng.choice(infers)
        if rng.random() < 0.6:
            data = mutate_message(rng, request).SerializeToString()
        else:
            data = mutate_bytes(rng, request.SerializeToString(), pool)
        d.infer(data, control=rng.random() < 0.2)

    def stream(rng: random.Random) -> None:
        messages = [
            mutate_message(rng, rng.choice(infers)).SerializeToString()
            for _ in range(rng.randint(1, 3))
        ]
        known = next(filter(None, (known_bug("ModelInfer", m) for m in messages)), None)
        d.inference.call(
            "grpc.inference",
            f"/{SERVICE.full_name}/ModelStreamInfer",
            messages,
            "bidi",
            known=known,
            in_stream=stream_status,
        )

    def other_rpc(rng: random.Random) -> None:
        method = rng.choice(methods)
        request = getattr(pb, method + "Request")()
        for field in request.DESCRIPTOR.fields:
            if field.name in ("name", "model_name"):
                setattr(request, field.name, rng.choice(MODELS))
        data = (
            mutate_message(rng, request).SerializeToString()
            if request.DESCRIPTOR.fields and rng.random() < 0.7
            else mutate_bytes(rng, request.SerializeToString())
        )
        d.rpc(method, data, control=rng.random() < 0.3)

    def shared_memory(rng: random.Random) -> None:
        op = rng.randrange(4)
        name = rng.choice(REGION_NAMES)
        if op == 0:
            key = (
                rng.choice(regions)
                if rng.random() < 0.7
                else rng.choice(["", "/", "x", f"{targets.shm_prefix}-nope"])
            )
            size = targets.shm_regions.get(key, 256)
            request = pb.SystemSharedMemoryRegisterRequest(
                name=name, key=key, offset=0, byte_size=max(size, 1)
            )
            data = (
                mutate_message(rng, request).SerializeToString()
                if rng.random() < 0.7
                else request.SerializeToString()
            )
            d.rpc("SystemSharedMemoryRegister", data)
        elif op == 1:
            d.rpc(
                "SystemSharedMemoryStatus",
                mutate_message(
                    rng, pb.SystemSharedMemoryStatusRequest(name=name)
                ).SerializeToString(),
            )
        elif op == 2 and rng.random() < 0.3:
            d.rpc(
                "SystemSharedMemoryUnregister",
                pb.SystemSharedMemoryUnregisterRequest(name=name).SerializeToString(),
            )
        else:
            at = rng.choice([None, 0, 0, 1, 256, 4096, -1, 2**63 - 1, 2**64 - 1, "x"])
            length = rng.choice([None, 256, 256, 0, 1, 4096, -1, 2**64 - 1])
            request = shm_infer(rng.choice(infers[:2]), name, at, length, rng.random() < 0.3)
            if rng.random() < 0.3:
                request = mutate_message(rng, request)
            d.infer(request.SerializeToString(), listener="grpc.shared_memory")

    def examples(rng: random.Random) -> None:
        request = valid_examples(rng.choice([0, 1, 2, 4]))
        if rng.random() < 0.8:
            data = mutate_message(rng, request).SerializeToString()
        else:
            data = mutate_bytes(rng, request.SerializeToString())
        d.submit(data, control=rng.random() < 0.6)

    def repository(rng: random.Random) -> None:
        method = rng.choice(["RepositoryIndex", "RepositoryModelUnload", "RepositoryModelLoad"])
        if method == "RepositoryIndex":
            message: Any = pb.RepositoryIndexRequest(ready=True)
        else:
            message = getattr(pb, method + "Request")(
                model_name=rng.choice(["echo", "fixed", "int8", "broken", "no-such"])
            )
            if method == "RepositoryModelLoad" and rng.random() < 0.5:
                message.parameters["config"].string_param = '{"max_batch_size": 8}'
                if rng.random() < 0.2:
                    message.parameters["config"].string_param = deep_json(rng)
        d.rpc(method, mutate_message(rng, message).SerializeToString(), control=rng.random() < 0.9)

    return [
        (10.0, infer),
        (0.5, stream),
        (2.0, other_rpc),
        (6.0, shared_memory),
        (6.0, examples),
        (0.2, repository),
    ]
