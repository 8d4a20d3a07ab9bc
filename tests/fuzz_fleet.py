"""Fuzzing the control plane's gRPC listener (driven by benchmarks/fuzz.py, in a process
without tritonclient, like tests/fuzz_rpcs.py).

- Every FleetService RPC gets random messages (every field drawn from its protobuf type, numbers
  at the edges: 0, 2^31, 2^63, 2^64-1; strings of any characters and lengths; nested messages),
  sent with each kind of credentials (publisher, the device, a wrong device id, garbage, none),
  and random bytes.
- Learning (the parameter server, controlplane/learning/): StartLearning with valid specs
  changed a field or three at a time (every field at its edges: NaN, Inf, 2^64-1, unknown
  enums and names), StopLearning / LearningStatus of tasks that exist and do not, and
  UploadUpdate for a running task the device takes part in: valid updates, and updates with
  the wrong tensors, shapes, dtypes, NaN, absurd norms, a mangled tensor-set header or bytes,
  the sha256 recomputed (so the payload is parsed) or not, odd chunking, stale and repeated.

The device's own credentials, the main learning task and the models other fuzzers use are
never revoked, rotated or stopped (those calls are redirected to other names).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import struct
from typing import Any

import numpy as np
from fuzzing import (
    Grpc,
    Tally,
    Targets,
    deep_json,
    hypothesis_settings,
    mutate_bytes,
    mutate_json,
    mutate_message,
)
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from edge_agent._proto import fleet_pb2 as pb
from edge_agent.fleet import auth
from edge_agent.learn import delta

SERVICE = pb.DESCRIPTOR.services_by_name["FleetService"]
LEARNING = {"StartLearning", "StopLearning", "LearningStatus", "UploadUpdate"}
EDGES = [0, 1, 2**31, 2**32 - 1, 2**63 - 1, 2**63, 2**64 - 1]
T = FieldDescriptor


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.type == T.TYPE_STRING:
        return st.sampled_from(["mlp", "digits", "", "../x", "a" * 300, "last:²", "²"]) | st.text(
            max_size=40
        )
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


def _kind(method: Any) -> str:
    if method.client_streaming:
        return "bidi" if method.server_streaming else "stream"
    return "server" if method.server_streaming else "unary"


class ControlPlane:
    """Calls on the control plane, with the guards that keep the run's fixtures in place."""

    def __init__(self, targets: Targets, tally: Tally) -> None:
        self.t = targets
        self.grpc = Grpc(targets.control_plane, tally)
        self.publisher = auth.metadata(targets.publisher_token)
        self.device = auth.metadata(targets.device_token, targets.device_id)
        self.credentials = [
            self.publisher,
            self.device,
            auth.metadata(targets.device_token, "someone-else"),
            auth.metadata("not-a-token", "edge 1 ?"),
            (),
        ]
        self.ids = (f"u{i}" for i in itertools.count())

    def guard(self, method: str, payload: bytes) -> bytes:
        """Never rotate or revoke the device's token, never stop the main task."""
        if method not in ("EnrollDevices", "RevokeDevice", "StopLearning"):
            return payload
        try:
            request = getattr(pb, method + "Request").FromString(payload)
        except DecodeError:
            return payload
        if method == "EnrollDevices":
            for d in request.devices:
                if d.device_id == self.t.device_id:
                    d.device_id += "-other"
        elif method == "RevokeDevice" and request.device_id == self.t.device_id:
            request.device_id += "-other"
        elif method == "StopLearning" and request.task_id == self.t.task_id:
            request.task_id += 1_000_000
        return bytes(request.SerializeToString())

    def call(self, method: Any, payload: bytes | list[bytes], meta: Any) -> tuple[Any, Any]:
        if isinstance(payload, bytes):
            payload = self.guard(method.name, payload)
        listener = "grpc.learning" if method.name in LEARNING else "grpc.fleet"
        return self.grpc.call(
            listener, f"/{SERVICE.full_name}/{method.name}", payload, _kind(method), meta
        )

    def close(self) -> None:
        self.grpc.close()


def fuzzers(targets: Targets, tally: Tally, examples: int, seed: int) -> list[Any]:
    """One search per FleetService method (examples // 4 each), and the learning searches."""
    cp = ControlPlane(targets, tally)
    per_method = hypothesis_settings(max(8, examples // 4), seed)
    run = hypothesis_settings(examples, seed)

    def fuzzer(method: Any) -> Any:
        @per_method
        @given(
            request=message(method.input_type),
            who=st.integers(0, len(cp.credentials) - 1),
            noise=st.none() | st.binary(max_size=300),
        )
        def fuzz(request: Any, who: int, noise: bytes | None) -> None:
            if method.name == "WatchDesiredState":  # a long-poll may wait: keep the run short
                request.wait_ms %= 200
            payload = noise if noise is not None else request.SerializeToString()
            if method.client_streaming:
                cp.call(method, [payload, payload], cp.credentials[who])
            else:
                cp.call(method, payload, cp.credentials[who])

        fuzz.__name__ = f"fleet_{method.name}"
        return fuzz

    updates = Updates(targets, cp)

    @run
    @given(st.randoms(use_true_random=False), st.integers(1, 4))
    def start_learning(rng: random.Random, changes: int) -> None:
        spec = mutate_message(rng, valid_spec(targets), changes)
        method = SERVICE.methods_by_name["StartLearning"]
        answer = cp.call(
            method, pb.StartLearningRequest(spec=spec).SerializeToString(), cp.publisher
        )
        started(cp, answer)

    @run
    @given(
        st.sampled_from(["StopLearning", "LearningStatus"]),
        st.sampled_from([0, 1, 2, targets.task_id, -1, 2**63 - 1, -(2**63)])
        | st.integers(-(2**63), 2**63 - 1),
        st.integers(0, len(cp.credentials) - 1),
    )
    def task_calls(name: str, task_id: int, who: int) -> None:
        method = SERVICE.methods_by_name[name]
        request = getattr(pb, name + "Request")(task_id=task_id)
        cp.call(method, request.SerializeToString(), cp.credentials[who])

    @run
    @given(st.integers(0, 2**64 - 1))
    def upload_update(case: int) -> None:
        # A seed, not st.randoms(): what is drawn depends on the updates sent before.
        updates.one(random.Random(case))

    return [fuzzer(m) for m in SERVICE.methods] + [start_learning, task_calls, upload_update]


def valid_spec(targets: Targets) -> pb.LearningSpec:
    """A spec the control plane accepts (a task of the whole fleet, aggregating rarely)."""
    return pb.LearningSpec(
        model=targets.learn_model,
        validation_blob=targets.validation_blob,
        trainable="last:1",
        epochs=1,
        buffer=64,
        min_updates=64,
        max_wait=1e9,
        min_examples=10,
    )


def started(cp: ControlPlane, answer: tuple[Any, Any]) -> None:
    """A fuzzed spec that started a task: stopped again at once (stopped tasks cost nothing)."""
    code, data = answer
    if code.name != "OK" or not isinstance(data, bytes):
        return
    task = pb.LearningTask.FromString(data)
    method = SERVICE.methods_by_name["StopLearning"]
    cp.call(method, pb.StopLearningRequest(task_id=task.id).SerializeToString(), cp.publisher)


def encode_raw(entries: Any, blobs: list[bytes]) -> bytes:
    header = json.dumps(entries).encode()
    return struct.pack("<I", len(header)) + header + b"".join(blobs)


class Updates:
    """UploadUpdate for the main task: valid, or wrong in one way."""

    def __init__(self, targets: Targets, cp: ControlPlane) -> None:
        self.t = targets
        self.cp = cp
        self.method = SERVICE.methods_by_name["UploadUpdate"]
        self.sent: list[str] = []

    def tensors(self, rng: random.Random) -> dict[str, np.ndarray]:
        return {
            name: (np.asarray(rng.random(), np.float32) * 1e-3 * np.ones(shape, np.float32))
            for name, shape in self.t.trainable.items()
        }

    def payload(self, rng: random.Random) -> bytes:
        values = self.tensors(rng)
        op = rng.randrange(10)
        if op == 0 and values:
            del values[rng.choice(list(values))]
        elif op == 1:
            values["not-a-tensor"] = np.zeros(3, np.float32)
        elif op == 2 and values:
            name = rng.choice(list(values))
            values[name] = np.zeros((*values[name].shape, 1), np.float32)
        elif op == 3 and values:
            name = rng.choice(list(values))
            values[name] = values[name].copy()
            values[name].reshape(-1)[0] = rng.choice([np.nan, np.inf, -np.inf, 3e38])
        elif op == 4:
            values = {n: v + np.float32(1e6) for n, v in values.items()}  # an absurd norm
        elif op == 5:
            return delta.encode(values, int8_threshold=0)
        elif op == 6:  # the tensor-set header changed, the data kept
            data = delta.encode(values)
            (length,) = struct.unpack_from("<I", data)
            entries = mutate_json(rng, json.loads(data[4 : 4 + length]))
            if (
                rng.random() < 0.3
                and isinstance(entries, list)
                and entries
                and isinstance(entries[0], dict)
            ):
                entries[0]["shape"] = [1] * rng.choice([33, 65, 100])  # more dims than numpy takes
            return encode_raw(entries, [data[4 + length :]])
        elif op == 7:
            return mutate_bytes(rng, delta.encode(values))
        return delta.encode(values)

    def messages(self, rng: random.Random) -> list[bytes]:
        payload = self.payload(rng)
        update_id = rng.choice(self.sent) if self.sent and rng.random() < 0.1 else next(self.cp.ids)
        header = pb.UpdateChunk(
            task_id=self.t.task_id,
            update_id=update_id,
            base_global_version=0,
            examples=rng.choice([1, 16, 100]),
            size=len(payload),
            sha256=hashlib.sha256(payload).hexdigest(),
            train_seconds=rng.random(),
        )
        op = rng.randrange(8)
        if op == 0:
            header = mutate_message(rng, header)
        elif op == 1:  # the bytes changed after the digest was taken
            payload = mutate_bytes(rng, payload)
        elif op == 2:
            return [header.SerializeToString()]  # no data
        chunk = rng.choice([len(payload) or 1, 7, 1000, 1 << 20])
        parts = [payload[i : i + chunk] for i in range(0, len(payload), chunk)] or [b""]
        out = []
        for i, part in enumerate(parts):
            message = pb.UpdateChunk()
            if i == 0:
                message.CopyFrom(header)
            elif op == 3:  # later messages carry header fields too
                message.task_id, message.size = 12345, 1
            message.data = part
            out.append(message.SerializeToString())
        if op == 4:
            out.append(b"\xff\xff\xff")  # a message that does not parse
        self.sent = [*self.sent, update_id][-50:]
        return out

    def valid(self, update_id: str) -> list[bytes]:
        payload = delta.encode(self.tensors(random.Random(update_id)))
        header = pb.UpdateChunk(
            task_id=self.t.task_id,
            update_id=update_id,
            examples=10,
            size=len(payload),
            sha256=hashlib.sha256(payload).hexdigest(),
            data=payload,
        )
        return [header.SerializeToString()]

    def one(self, rng: random.Random) -> None:
        who = self.cp.device if rng.random() < 0.9 else rng.choice(self.cp.credentials)
        self.cp.call(self.method, self.messages(rng), who)


def mutations(targets: Targets, tally: Tally) -> list[tuple[float, Any]]:
    cp = ControlPlane(targets, tally)
    updates = Updates(targets, cp)
    methods = [m for m in SERVICE.methods if m.name not in LEARNING]
    by_name = SERVICE.methods_by_name

    def fleet(rng: random.Random) -> None:
        method = rng.choice(methods)
        request = getattr(pb, method.input_type.name)()
        for field in request.DESCRIPTOR.fields:
            if field.name == "model":
                request.model = rng.choice(["digits", "mlp", "none"])
        if method.name == "WatchDesiredState":
            request.wait_ms = 0
            request.reports.add(model="digits", serving_version=1, state="serving")
        elif method.name == "RegisterRelease" and rng.random() < 0.3:
            request.release_json = deep_json(rng).encode()
        data = (
            mutate_message(rng, request).SerializeToString()
            if rng.random() < 0.8
            else mutate_bytes(rng, request.SerializeToString())
        )
        if method.name == "WatchDesiredState":
            parsed = pb.WatchRequest()
            try:
                parsed.ParseFromString(data)
                parsed.wait_ms %= 50
                data = parsed.SerializeToString()
            except DecodeError:
                pass
        who = rng.choice([cp.publisher, cp.device, cp.device, rng.choice(cp.credentials)])
        cp.call(method, [data, data] if method.client_streaming else data, who)

    def start(rng: random.Random) -> None:
        spec = mutate_message(rng, valid_spec(targets))
        answer = cp.call(
            by_name["StartLearning"],
            pb.StartLearningRequest(spec=spec).SerializeToString(),
            cp.publisher,
        )
        started(cp, answer)

    def task_calls(rng: random.Random) -> None:
        name = rng.choice(["StopLearning", "LearningStatus", "LearningStatus"])
        request = getattr(pb, name + "Request")(
            task_id=rng.choice([0, targets.task_id, 2, 10**6, -1])
        )
        data = (
            mutate_message(rng, request).SerializeToString()
            if rng.random() < 0.5
            else request.SerializeToString()
        )
        cp.call(by_name[name], data, rng.choice([cp.publisher] * 4 + cp.credentials))

    return [(6.0, fleet), (0.25, start), (1.0, task_calls), (3.0, updates.one)]


def regressions(targets: Targets, tally: Tally) -> dict[str, bool]:
    """Each request that once got INTERNAL, and the answer it gets since the fix."""
    cp = ControlPlane(targets, tally)
    updates = Updates(targets, cp)
    values = updates.tensors(random.Random(0))
    data = delta.encode(values)
    (length,) = struct.unpack_from("<I", data)
    entries = json.loads(data[4 : 4 + length])
    entries[0]["shape"] = [1] * 65
    payload = encode_raw(entries, [data[4 + length :]])
    header = pb.UpdateChunk(
        task_id=targets.task_id,
        update_id="regression-dims",
        examples=1,
        size=len(payload),
        sha256=hashlib.sha256(payload).hexdigest(),
        data=payload,
    )
    code, _ = cp.call(updates.method, [header.SerializeToString()], cp.device)
    return {"learning: an update tensor of 65 dimensions": code.name == "INVALID_ARGUMENT"}
