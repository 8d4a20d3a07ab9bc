"""What the fuzzers of every listener share (tests/fuzz_rpcs.py, fuzz_fleet.py, fuzz_http.py,
driven by benchmarks/fuzz.py): where the listeners are, the clients that make one call and record
its answer, the answers allowed, and the mutations of valid requests that the fast loop makes.

Imports our generated stubs' dependencies only (grpc, protobuf), never tritonclient: the fuzzers
run in a process of their own (tests/conftest.py says why).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import http.client
import json
import math
import random
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, Phase, seed, settings

# Documented gRPC answers (README, the modules' docstrings): never INTERNAL or UNKNOWN, nor
# UNIMPLEMENTED for a method the service declares.
GRPC_ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.UNAVAILABLE,  # a full queue, a model not ready
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # rate and concurrency limits
    grpc.StatusCode.DEADLINE_EXCEEDED,  # a queue timeout the request asked for
}
# HTTP: no 5xx but 503 (a full queue, too many requests in flight: api/http.py); 303 is the
# dashboard's login and logout.
HTTP_ALLOWED = {200, 303, 400, 401, 403, 404, 405, 409, 413, 429, 431, 503}
NO_ANSWER = "no answer"  # the connection closed without one: allowed only for cut requests
TIMEOUT_S = 10.0

# Wrong answers whose cause lies in modules this harness's author may not change: tallied
# apart (`known`), each with a probe that checks it still reproduces (benchmarks/fuzz.py), so
# that a fix shows up and the entry is removed. Any other wrong answer fails the run.
KNOWN_BUGS: dict[str, str] = {}


# How each known bug shows in the log (benchmarks/fuzz.py reads the error lines).
KNOWN_LOG: dict[str, tuple[str, ...]] = {}
# Error lines that are answers, not failures: a fuzzed load of a deliberately broken model.
EXPECTED_LOG = {"model.load_failed"}


def known_log(event: dict[str, Any]) -> str | None:
    """The entry of KNOWN_BUGS an error line of the log comes from, if any."""
    text = f"{event.get('event')} {event.get('exception', '')}"
    for name, needles in KNOWN_LOG.items():
        if all(n in text for n in needles):
            return name
    return None


def too_deep(text: str) -> bool:
    """What triggers deep-config-json: JSON that json.loads cannot recurse into."""
    try:
        json.loads(text)
    except RecursionError:
        return True
    except ValueError:
        pass
    return False


def unicode_digits(text: str) -> bool:
    """What triggers the unicode-digit bugs: str.isdigit() true, int() refuses it."""
    return bool(text) and text.isdigit() and not text.isdecimal()


@dataclasses.dataclass
class Targets:
    """The listeners under test and what the fuzzers may use on them."""

    daemon_grpc: str = ""  # HOST:PORT, the inference listener
    daemon_control: str = ""  # the control listener (load / unload, examples)
    daemon_http: str = ""
    daemon_http_control: str = ""
    control_plane: str = ""
    dashboard: str = ""
    publisher_token: str = ""
    device_id: str = ""
    device_token: str = ""
    # System shared memory: regions this run created (key -> bytes); every key the fuzzers
    # send either is one of these, or lies under `shm_prefix` and does not exist, or is not a
    # POSIX name at all. Nothing else on the host is ever named.
    shm_prefix: str = ""
    shm_regions: dict[str, int] = dataclasses.field(default_factory=dict)
    # Learning: a running task the device takes part in, and its trainable tensors' shapes.
    task_id: int = 0
    trainable: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    validation_blob: str = ""
    learn_model: str = "digits"


class Tally:
    """Answers by listener and status; the bad ones kept (a few per listener) with what caused
    them."""

    def __init__(self) -> None:
        self.answers: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        self.by_source: collections.Counter[str] = collections.Counter()
        self.known: collections.Counter[str] = collections.Counter()
        self.bad: list[str] = []
        self.source = "hypothesis"

    @property
    def calls(self) -> int:
        return sum(sum(c.values()) for c in self.answers.values())

    def record(
        self, listener: str, status: str, ok: bool, what: str, known: str | None = None
    ) -> None:
        """`known`: the request triggers that entry of KNOWN_BUGS (a wrong answer is then
        counted there instead of failing the run)."""
        self.answers[listener][status] += 1
        self.by_source[self.source] += 1
        if ok:
            return
        if known is not None:
            self.known[f"{known}: {listener} {status}"] += 1
        elif sum(1 for b in self.bad if b.startswith(listener + " ")) < 10:
            self.bad.append(f"{listener} {status}: {what[:300]}")

    def summary(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "by_source": dict(self.by_source),
            "answers": {k: dict(sorted(v.items())) for k, v in sorted(self.answers.items())},
            "known": dict(sorted(self.known.items())),
            "bad": self.bad,
        }


class Grpc:
    """Raw-bytes calls on one channel (no serializer: the fuzzers send any bytes)."""

    def __init__(self, address: str, tally: Tally) -> None:
        self.address = address
        self.tally = tally
        self.channel = grpc.insecure_channel(
            address,
            options=[
                ("grpc.max_send_message_length", 1 << 26),
                ("grpc.max_receive_message_length", 1 << 26),
            ],
        )

    def call(
        self,
        listener: str,
        path: str,
        payload: bytes | Sequence[bytes],
        kind: str = "unary",
        metadata: Sequence[tuple[str, str]] | None = None,
        timeout: float = TIMEOUT_S,
        known: str | None = None,
        in_stream: Callable[[list[bytes]], grpc.StatusCode | None] | None = None,
    ) -> tuple[grpc.StatusCode, Any]:
        """kind: unary, stream (client streaming, `payload` the messages), server (server
        streaming), bidi. Returns the status and the answer (bytes, or a list for streams).
        `in_stream`: the status a stream's messages carry (ModelStreamInfer answers a failed
        request with an error message and goes on), if any."""
        answer: Any = None
        try:
            if kind == "unary":
                assert isinstance(payload, bytes)
                answer = self.channel.unary_unary(path)(payload, metadata=metadata, timeout=timeout)
            elif kind == "stream":
                messages = [payload] if isinstance(payload, bytes) else list(payload)
                answer = self.channel.stream_unary(path)(
                    iter(messages), metadata=metadata, timeout=timeout
                )
            elif kind == "server":
                assert isinstance(payload, bytes)
                answer = list(
                    self.channel.unary_stream(path)(payload, metadata=metadata, timeout=timeout)
                )
            else:
                messages = [payload] if isinstance(payload, bytes) else list(payload)
                answer = list(
                    self.channel.stream_stream(path)(
                        iter(messages), metadata=metadata, timeout=timeout
                    )
                )
            code = grpc.StatusCode.OK
            if in_stream is not None and isinstance(answer, list):
                code = in_stream(answer) or code
        except grpc.RpcError as exc:
            code = exc.code()
            details = exc.details() or ""
            answer = details
        what = f"{path} {payload[:120]!r}" if isinstance(payload, bytes) else path
        if code not in GRPC_ALLOWED:
            what += f" -> {answer!r}"
        self.tally.record(listener, code.name, code in GRPC_ALLOWED, what, known)
        return code, answer

    def close(self) -> None:
        self.channel.close()


class Http:
    """HTTP/1.1 on one kept-alive connection (a new one after the server closes it), and raw
    bytes on a connection of their own for what http.client will not send."""

    def __init__(self, address: str, tally: Tally) -> None:
        host, _, port = address.rpartition(":")
        self.host, self.port = host, int(port)
        self.tally = tally
        self._conn: http.client.HTTPConnection | None = None

    def request(
        self,
        listener: str,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        known: str | None = None,
    ) -> tuple[int | str, bytes]:
        try:
            _check_sendable(method, path, headers or {})
        except ValueError:  # http.client will not send it: the same bytes, raw
            data = raw_request(method, path, body, headers or {})
            return self.raw(listener, data, False, known), b""
        for attempt in (0, 1):
            conn = self._conn or http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT_S)
            self._conn = conn
            try:
                conn.putrequest(method, path, skip_host=False, skip_accept_encoding=True)
                for key, value in (headers or {}).items():
                    conn.putheader(key, value)
                if body is not None and not any(
                    k.lower() == "content-length" for k in headers or {}
                ):
                    conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body)
                answer = conn.getresponse()
                data = answer.read()
                if answer.will_close:
                    self.close()
                status: int | str = answer.status
                break
            except (http.client.HTTPException, OSError) as exc:
                self.close()
                if attempt == 0 and isinstance(
                    exc, http.client.RemoteDisconnected | BrokenPipeError | ConnectionResetError
                ):
                    continue  # the server closed the kept-alive connection meanwhile
                status, data = NO_ANSWER, repr(exc).encode()
                break
        what = f"{method} {path[:200]!r} {headers!r} {(body or b'')[:120]!r} -> {data[:200]!r}"
        self.tally.record(listener, str(status), status in HTTP_ALLOWED, what, known)
        return status, data

    def raw(self, listener: str, data: bytes, cut: bool, known: str | None = None) -> int | str:
        """Send `data` as it is. `cut`: the request is incomplete on purpose: the connection is
        half-closed after it, and no answer at all is allowed too."""
        status: int | str = NO_ANSWER
        try:
            with socket.create_connection((self.host, self.port), timeout=TIMEOUT_S) as s:
                s.sendall(data)
                if cut:
                    s.shutdown(socket.SHUT_WR)
                received = b""
                while b"\r\n" not in received:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    received += chunk
                parts = received.split(b" ", 2)
                if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
                    status = int(parts[1])
        except OSError:
            status = NO_ANSWER
        ok = status in HTTP_ALLOWED or (cut and status == NO_ANSWER)
        self.tally.record(listener, str(status), ok, f"raw {data[:300]!r}", known)
        return status

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _check_sendable(method: str, path: str, headers: dict[str, str]) -> None:
    """Raises ValueError for what http.client refuses to put on the wire (control characters,
    spaces in the path, non-latin-1 header values)."""
    if not method or not method.isascii() or not method.isalpha() or not path.isascii():
        raise ValueError(method)
    if any(ord(c) < 33 or ord(c) == 127 for c in path):
        raise ValueError(path)
    for key, value in headers.items():
        if not key or not key.isascii() or any(c in key for c in ":\r\n\0 \t"):
            raise ValueError(key)
        value.encode("latin-1")
        if any(c in value for c in "\r\n\0"):
            raise ValueError(value)


def raw_request(method: str, path: str, body: bytes | None, headers: dict[str, str]) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\n"
    for key, value in headers.items():
        head += f"{key}: {value}\r\n"
    if body is not None and not any(k.lower() == "content-length" for k in headers):
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode("utf-8", "surrogateescape") + b"\r\n" + (body or b"")


def hypothesis_settings(examples: int, fixed_seed: int) -> Callable[[Any], Any]:
    """A search of `examples` examples from `fixed_seed`, without a database or deadlines
    (the server's answer time is not the property)."""
    run = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        derandomize=False,
        print_blob=False,
        # No shrinking: nothing here fails a test case (each answer is tallied), and a replay
        # would not draw the same: the servers' state has moved on.
        phases=(Phase.explicit, Phase.generate),
    )

    def apply(test: Any) -> Any:
        return run(seed(fixed_seed)(test))

    return apply


# -- mutations of valid requests (the fast loop) -------------------------------------------------

INTERESTING_BYTES = [0x00, 0x01, 0x7F, 0x80, 0xFF]
EDGE_INTS = [
    0,
    1,
    -1,
    2,
    7,
    64,
    255,
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**32,
    2**53,
    2**63 - 1,
    -(2**63),
]
EDGE_FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-45, 5e-324, 3.4e38, 1e308, math.inf, -math.inf]
EDGE_FLOATS += [math.nan]
EDGE_STRINGS = [
    "",
    " ",
    "a" * 300,
    "a" * 5000,
    "\x00",
    "../../../etc/passwd",
    "/",
    "..",
    "%00",
    "²",
    "٣",
    "\N{FULLWIDTH DIGIT ONE}",
    "-1",
    "1e309",
    "NaN",
    "inf",
    "😀",
    "é",
    "true",
    "null",
    "{}",
    "[]",
    "last:²",
    "last:99999999",
    "file:²/model.onnx",
    "digits",
    "echo",
    "input",
    "FP32",
    "BYTES",
]


def mutate_bytes(rng: random.Random, data: bytes, pool: Sequence[bytes] = ()) -> bytes:
    """One to four byte-level changes: bit flips, interesting bytes, inserts, deletes,
    truncation, duplication, a splice with another valid request."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        n = len(out)
        if op == 0 and n:
            i = rng.randrange(n)
            out[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            out[rng.randrange(n)] = rng.choice(INTERESTING_BYTES)
        elif op == 2:
            i = rng.randint(0, n)
            out[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op == 3 and n:
            i = rng.randrange(n)
            del out[i : i + rng.randint(1, 32)]
        elif op == 4 and n:
            del out[rng.randrange(n) :]
        elif op == 5 and n:
            i = rng.randrange(n)
            j = min(n, i + rng.randint(1, 64))
            out[i:i] = out[i:j] * rng.randint(1, 8)
        elif op == 6 and pool:
            other = rng.choice(pool)
            i, j = rng.randint(0, n), rng.randint(0, len(other))
            out = out[:i] + bytearray(other[j:])
        elif op == 7 and n >= 4:  # a plausible varint length or count made huge
            i = rng.randrange(n - 3)
            out[i : i + 4] = bytes([0xFF, 0xFF, 0xFF, 0x0F])
    return bytes(out)


T = FieldDescriptor
_INT_RANGES = {
    T.TYPE_INT32: (-(2**31), 2**31 - 1),
    T.TYPE_SINT32: (-(2**31), 2**31 - 1),
    T.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    T.TYPE_UINT32: (0, 2**32 - 1),
    T.TYPE_FIXED32: (0, 2**32 - 1),
    T.TYPE_INT64: (-(2**63), 2**63 - 1),
    T.TYPE_SINT64: (-(2**63), 2**63 - 1),
    T.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    T.TYPE_UINT64: (0, 2**64 - 1),
    T.TYPE_FIXED64: (0, 2**64 - 1),
}


def edge_value(rng: random.Random, field: FieldDescriptor, current: Any = None) -> Any:
    """A value of the field's type from its edges (or near the current one)."""
    if field.type == T.TYPE_STRING:
        if isinstance(current, str) and current and rng.random() < 0.3:
            i = rng.randrange(len(current))
            return current[:i] + rng.choice(["", "x", "/", "\x00", "²", "é"]) + current[i + 1 :]
        return rng.choice(EDGE_STRINGS)
    if field.type == T.TYPE_BYTES:
        if isinstance(current, bytes) and current and rng.random() < 0.5:
            return mutate_bytes(rng, current)
        return rng.choice([b"", b"\x00" * rng.randint(1, 64), rng.randbytes(rng.randint(1, 256))])
    if field.type == T.TYPE_BOOL:
        return rng.random() < 0.5
    if field.type in (T.TYPE_DOUBLE, T.TYPE_FLOAT):
        value = rng.choice(EDGE_FLOATS)
        if field.type == T.TYPE_FLOAT and abs(value) > 3.4e38 and math.isfinite(value):
            value = math.copysign(math.inf, value)
        return value
    if field.type == T.TYPE_ENUM:
        return rng.choice([v.number for v in field.enum_type.values] + [-1, 99])
    low, high = _INT_RANGES.get(field.type, (-(2**31), 2**31 - 1))
    choices = [v for v in EDGE_INTS if low <= v <= high] + [high, low]
    if isinstance(current, int) and rng.random() < 0.3:
        choices.append(min(high, max(low, current + rng.choice([-1, 1, 2**16]))))
    return rng.choice(choices)


def _targets(message: Message, depth: int = 0) -> list[tuple[Message, FieldDescriptor]]:
    """Every field of `message` and of its present sub-messages, as (holder, field)."""
    out: list[tuple[Message, FieldDescriptor]] = []
    for field in message.DESCRIPTOR.fields:
        out.append((message, field))
        if field.message_type is None or depth > 3:
            continue
        if field.message_type.GetOptions().map_entry:
            continue
        if field.label == T.LABEL_REPEATED:
            for item in getattr(message, field.name):
                out.extend(_targets(item, depth + 1))
        elif message.HasField(field.name):
            out.extend(_targets(getattr(message, field.name), depth + 1))
    return out


def mutate_message(rng: random.Random, message: Message, changes: int = 0) -> Message:
    """A copy of `message` with one to three fields (anywhere in it) set to edge values, grown,
    shrunk or cleared: it still parses, so the checks after parsing are what is tested."""
    out = type(message)()
    out.CopyFrom(message)
    for _ in range(changes or rng.randint(1, 3)):
        holder, field = rng.choice(_targets(out))
        _mutate_field(rng, holder, field)
    return out


def _mutate_field(rng: random.Random, holder: Message, field: FieldDescriptor) -> None:
    value = getattr(holder, field.name)
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key_field = field.message_type.fields_by_name["key"]
        value_field = field.message_type.fields_by_name["value"]
        if rng.random() < 0.3 and len(value):
            del value[rng.choice(list(value))]
            return
        key = edge_value(rng, key_field)
        if value_field.message_type is not None:
            entry = value[key]
            _mutate_field(rng, entry, rng.choice(value_field.message_type.fields))
        else:
            value[key] = edge_value(rng, value_field)
        return
    if field.label == T.LABEL_REPEATED:
        op = rng.randrange(4)
        if op == 0 and len(value):
            del value[rng.randrange(len(value))]
        elif op == 1:
            del value[:]
        elif op == 2 and len(value):
            item = value[rng.randrange(len(value))]
            for _ in range(rng.choice([1, 2, 8])):
                if field.message_type is not None:
                    value.add().CopyFrom(item)
                else:
                    value.append(item)
        elif field.message_type is not None:
            value.add()
        else:
            value.append(edge_value(rng, field))
        return
    if field.message_type is not None:
        if holder.HasField(field.name) and rng.random() < 0.4:
            holder.ClearField(field.name)
        else:
            sub = getattr(holder, field.name)
            sub.SetInParent()
            if sub.DESCRIPTOR.fields:
                _mutate_field(rng, sub, rng.choice(sub.DESCRIPTOR.fields))
        return
    try:
        setattr(holder, field.name, edge_value(rng, field, value))
    except (ValueError, TypeError):  # e.g. a lone surrogate the runtime refuses to hold
        setattr(holder, field.name, edge_value(rng, field))


EDGE_JSON: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2**31,
    2**63,
    2**64,
    -(2**63) - 1,
    10**400,
    0.5,
    1e308,
    -1e308,
    "",
    "x" * 1000,
    "FP32",
    "BYTES",
    [],
    {},
    [[]],
    [None],
    {"": None},
    [1, [2, [3]]],
    "²",
]


def _json_paths(document: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(document, dict):
        for key, value in document.items():
            out.extend(_json_paths(value, (*path, key)))
    elif isinstance(document, list):
        for i, value in enumerate(document[:16]):
            out.extend(_json_paths(value, (*path, i)))
    return out


def _edge_json(rng: random.Random) -> Any:
    return copy.deepcopy(rng.choice(EDGE_JSON))  # fresh: later changes must not alias it


def mutate_json(rng: random.Random, document: Any) -> Any:
    """A copy of a JSON document with one to three nodes replaced, removed or added to."""
    out = copy.deepcopy(document)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(_json_paths(out))
        if not path:
            out = rng.choice([out, _edge_json(rng), [out], {"inputs": out}])
            continue
        parent = out
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        op = rng.randrange(4)
        if op == 0 and isinstance(parent, dict):
            del parent[key]
        elif op == 1 and isinstance(parent, list):
            parent.insert(key, _edge_json(rng))
        elif op == 2 and isinstance(parent, dict):
            parent[rng.choice(["extra", "parameters", "data", "shape", key + "x"])] = _edge_json(
                rng
            )
        else:
            parent[key] = _edge_json(rng)
    return out


def deep_json(rng: random.Random) -> str:
    """JSON nested deeper than a recursive parser goes (json.loads raises RecursionError)."""
    depth = rng.choice([1000, 100_000])
    return rng.choice(["[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth, "[" * depth])


Case = Callable[[random.Random], None]  # one mutated call (or a few) on one listener


def weighted(rng: random.Random, cases: Iterable[tuple[float, Case]]) -> Iterator[Case]:
    """An endless stream of cases drawn by weight."""
    items = list(cases)
    weights = [w for w, _ in items]
    while True:
        yield from rng.choices([c for _, c in items], weights, k=256)
