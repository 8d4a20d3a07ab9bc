"""KServe v2 over HTTP/REST (Triton's paths, JSON tensors and its binary tensor extension), for
clients without a gRPC stack: `http_address` (off by default) for inference, and
`http_control_address` for the repository endpoints, as the gRPC listeners split them.

An adapter over the data plane (api/dataplane.py), as the gRPC listeners are: a request becomes
the protocol's message (pb.ModelInferRequest, ...) and goes to the same scheduler, limits,
statistics and metrics; the answer goes back as JSON (and binary tensors). Errors answer
{"error": MESSAGE} with the message the gRPC status carries, and an HTTP status mapped from its
code (`error_response`, the one place for HTTP).

The server is aiohttp's, on the agent's event loop: no second loop, no thread hop between the
front end and the scheduler (an ASGI server would add its own loop handling and a framework
layer for the same job; see docs/performance-history.md "HTTP").
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from google.protobuf import descriptor as _descriptor

from edge_agent._proto import grpc_service_pb2 as pb
from edge_agent.api.dataplane import DataPlane
from edge_agent.api.infer import ElementBudget
from edge_agent.api.security import control_denied
from edge_agent.common.tensors import NUMPY_DTYPES, decode_raw, element_count
from edge_agent.errors import InvalidArgument, Unauthenticated, Unavailable
from edge_agent.fleet import auth
from edge_agent.observability.logging import get_logger
from edge_agent.rpc.status import to_status

log = get_logger(__name__)

HEADER_LENGTH = "Inference-Header-Content-Length"
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
INT64_RANGE = range(-(2**63), 2**63)
_INT64 = {
    _descriptor.FieldDescriptor.TYPE_INT64,
    _descriptor.FieldDescriptor.TYPE_UINT64,
    _descriptor.FieldDescriptor.TYPE_SINT64,
    _descriptor.FieldDescriptor.TYPE_FIXED64,
    _descriptor.FieldDescriptor.TYPE_SFIXED64,
}


def to_json(message: Any) -> dict[str, Any]:
    """A protobuf message as Triton writes it in JSON: proto field names, 64-bit integers as
    numbers (json_format writes them as strings, which perf_analyzer does not read), enums by
    name, every field present."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {k: _value(value_field, v) for k, v in value.items()}
        elif field.label == _descriptor.FieldDescriptor.LABEL_REPEATED:
            out[field.name] = [_value(field, v) for v in value]
        elif field.message_type is not None and not message.HasField(field.name):
            if field.containing_oneof is None:
                out[field.name] = to_json(value)
        elif field.containing_oneof is not None and not message.HasField(field.name):
            continue  # an unset member of a oneof
        else:
            out[field.name] = _value(field, value)
    return out


def _value(field: Any, value: Any) -> Any:
    if field.message_type is not None:
        return to_json(value)
    if field.enum_type is not None:
        return field.enum_type.values_by_number[value].name
    if field.type == _descriptor.FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode()
    if field.type in _INT64:
        return int(value)
    return value


def error_response(exc: BaseException, **context: object) -> web.Response:
    code, message = to_status(exc, **context)
    return web.json_response({"error": message}, status=HTTP_STATUS.get(code, 500))


def _flatten(data: Any) -> list[Any]:
    """Triton takes a tensor's JSON data flat (row-major) or nested to the tensor's shape."""
    if not isinstance(data, list):
        return [data]
    if not any(isinstance(item, list) for item in data):
        return data
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _json_tensor(name: str, datatype: str, shape: list[int], data: Any) -> bytes:
    """JSON data -> the tensor's raw bytes (as raw_input_contents carries them)."""
    values = _flatten(data)
    count = element_count(name, shape)
    if len(values) != count:
        raise InvalidArgument(
            f"input '{name}': {len(values)} values in 'data', its shape {shape} holds {count}"
        )
    if datatype == "BYTES":
        parts = []
        for value in values:
            if isinstance(value, str):
                value = value.encode()
            elif not isinstance(value, bytes):
                raise InvalidArgument(f"input '{name}': BYTES data must be strings")
            parts.append(len(value).to_bytes(4, "little") + value)
        return b"".join(parts)
    dtype = NUMPY_DTYPES[datatype]
    kinds = (bool,) if datatype == "BOOL" else (int,) if dtype.kind in "iu" else (int, float)
    for value in values:
        if not isinstance(value, kinds) or (datatype != "BOOL" and isinstance(value, bool)):
            raise InvalidArgument(f"input '{name}': {value!r} in 'data' is not a {datatype} value")
    try:
        array = np.array(values, dtype=dtype)
    except OverflowError as exc:
        raise InvalidArgument(f"input '{name}': a value does not fit {datatype}") from exc
    return array.tobytes()


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    return value


def _parameter(target: Any, key: str, value: Any) -> None:
    if isinstance(value, bool):
        target[key].bool_param = value
    elif isinstance(value, int):
        if value in INT64_RANGE:
            target[key].int64_param = value
        elif 0 <= value < 1 << 64:  # e.g. a uint64 sequence_id
            target[key].uint64_param = value
        else:
            raise InvalidArgument(f"parameter '{key}': {value} does not fit int64 or uint64")
    elif isinstance(value, str):
        target[key].string_param = value
    elif isinstance(value, float):
        target[key].double_param = value
    else:
        raise InvalidArgument(f"parameter '{key}': must be a boolean, number or string")


def parse_infer(
    body: bytes, header_length: str | None, model: str, version: str, budget: ElementBudget
) -> tuple[pb.ModelInferRequest, dict[str, bool], bool]:
    """An HTTP infer request -> (the gRPC request, output name -> binary?, all outputs binary?).
    Sizes are checked before data is read or converted. Binary tensors are checked (shapes,
    datatypes, element limits) by the data plane, as raw gRPC tensors are, so both answer
    alike; JSON data is held to the element limits before it is converted."""
    document, binary = _split_body(body, header_length)
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    request.id = str(document.get("id", ""))
    parameters = _object(document.get("parameters", {}), "'parameters'")
    all_binary = bool(parameters.pop("binary_data_output", False))
    for key, value in parameters.items():
        _parameter(request.parameters, key, value)
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidArgument("'inputs' must be a non-empty list")
    offset = 0
    for entry in inputs:
        offset = _add_input(request, _object(entry, "an input"), binary, offset, budget)
    if offset != len(binary):
        raise InvalidArgument(
            f"{len(binary) - offset} bytes after the JSON header belong to no input "
            f"({HEADER_LENGTH} or binary_data_size is wrong)"
        )
    binary_outputs: dict[str, bool] = {}
    outputs = document.get("outputs") or []
    if not isinstance(outputs, list):
        raise InvalidArgument("'outputs' must be a list")
    for entry in outputs:
        entry = _object(entry, "an output")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidArgument("an output has no 'name'")
        out_parameters = _object(entry.get("parameters", {}), f"output '{name}' parameters")
        binary_outputs[name] = bool(out_parameters.get("binary_data", all_binary))
        request.outputs.add(name=name)
    return request, binary_outputs, all_binary


def _split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], memoryview]:
    """(the JSON header, the binary tensor data after it)."""
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError as exc:
            raise InvalidArgument(f"{HEADER_LENGTH}: not a number: {header_length!r}") from exc
        if not 0 <= length <= len(body):
            raise InvalidArgument(
                f"{HEADER_LENGTH} is {length}, but the body has only {len(body)} bytes"
            )
    else:
        length = len(body)
    try:
        document = json.loads(body[:length])
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise InvalidArgument(f"the request is not valid JSON: {str(exc)[:200]}") from exc
    return _object(document, "the request"), memoryview(body)[length:]


def _add_input(
    request: pb.ModelInferRequest,
    entry: dict[str, Any],
    binary: memoryview,
    offset: int,
    budget: ElementBudget,
) -> int:
    """One input of the JSON header onto `request`, its bytes taken from `binary` at `offset`
    (binary_data_size) or converted from its 'data'; returns the offset after it."""
    name, datatype, shape = entry.get("name"), entry.get("datatype"), entry.get("shape")
    if not isinstance(name, str) or not name:
        raise InvalidArgument("an input has no 'name'")
    if not isinstance(datatype, str) or datatype not in NUMPY_DTYPES:
        raise InvalidArgument(f"input '{name}': unknown datatype {datatype!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**63 for d in shape
    ):
        raise InvalidArgument(f"input '{name}': 'shape' must be a list of sizes 0..2^63-1")
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    input_parameters = _object(entry.get("parameters", {}), f"input '{name}' parameters")
    size = input_parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidArgument(f"input '{name}': binary_data_size must be a size")
        if offset + size > len(binary):
            raise InvalidArgument(
                f"input '{name}': binary_data_size {size}, but only {len(binary) - offset} "
                "bytes of binary data remain"
            )
        data = bytes(binary[offset : offset + size])
        offset += size
    elif "data" in entry:
        budget.spend(name, datatype, shape)  # before the values are converted
        data = _json_tensor(name, datatype, shape, entry["data"])
    else:
        raise InvalidArgument(f"input '{name}' has neither 'data' nor binary_data_size")
    unknown = set(input_parameters) - {"binary_data_size"}
    if unknown:
        raise InvalidArgument(
            f"input '{name}': unsupported parameters {sorted(unknown)} (shared memory is "
            "served over gRPC)"
        )
    request.raw_input_contents.append(data)
    return offset


def infer_response(
    response: pb.ModelInferResponse, binary_outputs: dict[str, bool], all_binary: bool
) -> web.Response:
    document: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "outputs": [],
    }
    if response.id:
        document["id"] = response.id
    blobs: list[bytes] = []
    for output, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        entry: dict[str, Any] = {
            "name": output.name,
            "datatype": output.datatype,
            "shape": list(output.shape),
        }
        if binary_outputs.get(output.name, all_binary):
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            array = decode_raw(output.name, output.datatype, list(output.shape), raw)
            values = array.reshape(-1).tolist()
            if output.datatype == "BYTES":
                values = [v.decode(errors="replace") if isinstance(v, bytes) else v for v in values]
            entry["data"] = values
        document["outputs"].append(entry)
    header = json.dumps(document, separators=(",", ":")).encode()
    if not blobs:
        return web.Response(body=header, content_type="application/json")
    return web.Response(
        body=header + b"".join(blobs),
        headers={HEADER_LENGTH: str(len(header))},
        content_type="application/octet-stream",
    )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpFrontEnd:
    """The routes of one HTTP listener. `control`: this is the control listener (repository
    endpoints served, with `token` as Bearer credentials when set); otherwise they answer 403
    unless `control_too` (control_on_inference_listener)."""

    def __init__(
        self,
        plane: DataPlane,
        max_body_bytes: int,
        max_concurrent: int,
        control: bool = False,
        control_too: bool = False,
        token: str | None = None,
    ) -> None:
        self._plane = plane
        self._max_body = max_body_bytes
        self._control = control or control_too
        self._is_control_listener = control
        self._token = token
        self._slots = asyncio.Semaphore(max_concurrent)
        self._max_concurrent = max_concurrent

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self._max_body, middlewares=[self._errors])
        get, post = web.get, web.post
        model = "/v2/models/{model}"
        version = "/v2/models/{model}/versions/{version}"
        app.add_routes(
            [
                get("/v2/health/live", self._live),
                get("/v2/health/ready", self._ready),
                get("/v2", self._server_metadata),
                get("/v2/models/stats", self._stats),
                *[
                    route
                    for base in (version, model)
                    for route in (
                        get(base, self._metadata),
                        get(base + "/ready", self._model_ready),
                        get(base + "/config", self._config),
                        get(base + "/stats", self._stats),
                        post(base + "/infer", self._infer),
                    )
                ],
                post("/v2/repository/index", self._repository_index),
                post("/v2/repository/models/{model}/load", self._load),
                post("/v2/repository/models/{model}/unload", self._unload),
            ]
        )
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every failure as {"error": ...}; a bound on requests in flight (503 beyond it, as a
        full queue answers)."""
        if self._slots.locked():
            return error_response(
                Unavailable(f"too many HTTP requests in flight ({self._max_concurrent})")
            )
        async with self._slots:
            try:
                if request.headers.get("Content-Encoding", "identity") != "identity":
                    raise InvalidArgument("compressed request bodies are not accepted")
                return await handler(request)
            except web.HTTPException as exc:  # routing: 404, 405, 413 from aiohttp
                reason = exc.reason
                if exc.status == 413:
                    reason = f"the request body exceeds {self._max_body} bytes (max_message_bytes)"
                return web.json_response({"error": reason}, status=exc.status, headers=_allow(exc))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                return error_response(exc, rpc=f"HTTP {request.method} {request.path}")

    async def _live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self._plane.ready else 400)

    async def _server_metadata(self, request: web.Request) -> web.Response:
        document = to_json(self._plane.server_metadata())
        # Shared memory is served over gRPC only.
        document["extensions"] = [e for e in document["extensions"] if "shared_memory" not in e]
        return web.json_response(document)

    @staticmethod
    def _names(request: web.Request) -> tuple[str, str]:
        return request.match_info["model"], request.match_info.get("version", "")

    async def _metadata(self, request: web.Request) -> web.Response:
        name, version = self._names(request)
        document = to_json(self._plane.model_metadata(name, version))
        document.pop("parameters", None)
        return web.json_response(document)

    async def _model_ready(self, request: web.Request) -> web.Response:
        name, version = self._names(request)
        return web.Response(status=200 if self._plane.model_ready(name, version) else 400)

    async def _config(self, request: web.Request) -> web.Response:
        name, version = self._names(request)
        return web.json_response(to_json(self._plane.model_config(name, version).config))

    async def _stats(self, request: web.Request) -> web.Response:
        name = request.match_info.get("model", "")
        version = request.match_info.get("version", "")
        return web.json_response(to_json(self._plane.statistics(name, version)))

    async def _infer(self, request: web.Request) -> web.Response:
        name, version = self._names(request)
        body = await read_body(request)
        budget = ElementBudget(
            self._plane.max_elements_per_tensor, self._plane.max_elements_per_request
        )
        message, binary_outputs, all_binary = parse_infer(
            body, request.headers.get(HEADER_LENGTH), name, version, budget
        )
        answer = await self._plane.infer(message)
        return infer_response(answer, binary_outputs, all_binary)

    # -- the control endpoints --------------------------------------------------------------

    def _allowed(self, request: web.Request) -> None:
        if not self._control:
            raise control_denied("http_control_address")
        if self._is_control_listener and self._token is not None:
            given = auth.bearer_token(request.headers.get("Authorization", ""))
            if not auth.same(given, self._token):
                raise Unauthenticated("the control listener needs Authorization: Bearer TOKEN")

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        body = await read_body(request)
        if not body:
            return {}
        try:
            return _object(json.loads(body), "the request")
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            raise InvalidArgument(f"the request is not valid JSON: {str(exc)[:200]}") from exc

    async def _repository_index(self, request: web.Request) -> web.Response:
        self._allowed(request)
        document = await self._json_body(request)
        answer = await self._plane.repository_index(bool(document.get("ready", False)))
        return web.json_response([to_json(m) for m in answer.models])

    async def _load(self, request: web.Request) -> web.Response:
        self._allowed(request)
        document = await self._json_body(request)
        message = pb.RepositoryModelLoadRequest(model_name=request.match_info["model"])
        parameters = _object(document.get("parameters", {}), "'parameters'")
        for key, value in parameters.items():
            if key.startswith("file:"):  # Triton's HTTP form: base64 in a string
                if not isinstance(value, str):
                    raise InvalidArgument(f"parameter '{key}': base64 content expected")
                try:
                    message.parameters[key].bytes_param = base64.b64decode(value, validate=True)
                except ValueError as exc:
                    raise InvalidArgument(f"parameter '{key}': not base64") from exc
            elif isinstance(value, bool):
                message.parameters[key].bool_param = value
            elif isinstance(value, str):
                message.parameters[key].string_param = value
            else:
                raise InvalidArgument(f"parameter '{key}': must be a string or a boolean")
        await self._plane.load(message.model_name, message.parameters)
        return web.Response(status=200)

    async def _unload(self, request: web.Request) -> web.Response:
        self._allowed(request)
        document = await self._json_body(request)
        message = pb.RepositoryModelUnloadRequest(model_name=request.match_info["model"])
        parameters = _object(document.get("parameters", {}), "'parameters'")
        for key, value in parameters.items():
            if not isinstance(value, bool):
                raise InvalidArgument(f"unknown or mistyped unload parameter {key!r}")
            message.parameters[key].bool_param = value
        await self._plane.unload(message.model_name, message.parameters)
        return web.Response(status=200)


async def read_body(request: web.Request) -> bytes:
    """The whole body; one that ends early (the client closed the connection, a chunk that
    does not add up) is the client's error, not ours."""
    try:
        return await request.read()
    except (ConnectionResetError, HttpProcessingError) as exc:
        raise InvalidArgument(f"the request body ended before it was complete ({exc})") from exc


def _allow(exc: web.HTTPException) -> dict[str, str]:
    allowed = getattr(exc, "allowed_methods", None)
    return {"Allow": ", ".join(sorted(allowed))} if allowed else {}
