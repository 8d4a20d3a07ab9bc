"""ModelInferRequest -> feeds, and outputs -> ModelInferResponse, for one model version."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edge_agent._proto import grpc_service_pb2 as pb
from edge_agent.api.shm import Held, SharedMemory, uses_shared_memory
from edge_agent.common.tensors import bytes_to_text, check_shape, decode_raw, decode_typed, encode
from edge_agent.errors import InvalidArgument
from edge_agent.repository.version import ModelVersion
from edge_agent.scheduling.sequences import SequenceFlags

# Elements a request may carry (settings max_elements_per_tensor / _per_request); BYTES elements
# become Python objects (~40 bytes each), so they have a bound of their own.
MAX_BYTES_ELEMENTS_PER_REQUEST = 1 << 20
MAX_SEQUENCE_ID_CHARS = 256  # a string sequence_id


class ElementBudget:
    """Counts what a request's tensors claim, refusing oversized shapes before their data is
    decoded or allocated."""

    def __init__(self, max_per_tensor: int, max_per_request: int) -> None:
        self._per_tensor, self._per_request = max_per_tensor, max_per_request
        self._total = self._strings = 0

    def spend(self, name: str, datatype: str, shape: list[int]) -> None:
        count = 1
        for dim in shape:
            count *= dim
        if count > self._per_tensor:
            raise InvalidArgument(
                f"input '{name}': {count} elements exceed the limit of {self._per_tensor} "
                "per tensor (max_elements_per_tensor)"
            )
        self._total += count
        if self._total > self._per_request:
            raise InvalidArgument(
                f"the request's {self._total} elements exceed the limit of {self._per_request} "
                "(max_elements_per_request)"
            )
        if datatype == "BYTES":
            self._strings += count
            if self._strings > MAX_BYTES_ELEMENTS_PER_REQUEST:
                raise InvalidArgument(
                    f"the request's {self._strings} BYTES elements exceed the limit of "
                    f"{MAX_BYTES_ELEMENTS_PER_REQUEST}"
                )


def decode_request(
    request: pb.ModelInferRequest,
    model: ModelVersion,
    max_per_tensor: int = 1 << 24,
    max_per_request: int = 1 << 25,
    shm: SharedMemory | None = None,
    held: list[Held] | None = None,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Checked input arrays by name, and the output names to compute. Inputs that name a
    shared memory region (api/shm.py) are read from it; the regions acquired go to `held`, to
    be released when the response is built."""
    budget = ElementBudget(max_per_tensor, max_per_request)
    raw = request.raw_input_contents
    inputs = request.inputs
    in_shm = [bool(t.parameters) and uses_shared_memory(t.parameters) for t in inputs]
    from_shm = sum(in_shm)
    if from_shm and (shm is None or held is None):
        raise InvalidArgument("this listener takes no shared memory")
    if raw and len(raw) != len(inputs) - from_shm:
        outside = " outside shared memory" if from_shm else ""
        raise InvalidArgument(
            f"request has {len(inputs) - from_shm} inputs{outside} "
            f"but {len(raw)} raw_input_contents"
        )
    next_raw = 0
    feeds: dict[str, np.ndarray] = {}
    batching = model.max_batch_size > 0
    batch_size: int | None = None
    for index, tensor in enumerate(inputs):
        name, datatype = tensor.name, tensor.datatype
        shape = _checked_shape(tensor, model, feeds)
        budget.spend(name, datatype, shape)
        typed = tensor.HasField("contents")
        if raw and typed:
            raise InvalidArgument("request mixes raw_input_contents and typed contents; use one")
        if in_shm[index]:
            assert shm is not None and held is not None
            region, view = shm.acquire(tensor.parameters, f"input '{name}'")
            held.append((region, view))
            array = decode_raw(name, datatype, shape, view)
        elif raw:
            array = decode_raw(name, datatype, shape, raw[next_raw])
            next_raw += 1
        elif typed:
            array = decode_typed(name, datatype, shape, tensor.contents)
        else:
            raise InvalidArgument(f"input '{name}' has no data")
        if datatype == "BYTES":
            array = bytes_to_text(name, array)
        feeds[name] = array
        if batching:
            if batch_size is not None and shape[0] != batch_size:
                raise InvalidArgument(
                    f"inputs disagree on the batch size: {sorted({batch_size, shape[0]})}"
                )
            batch_size = shape[0]
    if len(feeds) != len(model.inputs):
        missing = sorted(n for n, s in model.inputs.items() if n not in feeds and not s.optional)
        if missing:
            raise InvalidArgument(f"missing inputs {missing} for model '{model.name}'")
    return feeds, _requested_outputs(request, model)


def _checked_shape(
    tensor: pb.ModelInferRequest.InferInputTensor,
    model: ModelVersion,
    feeds: dict[str, np.ndarray],
) -> list[int]:
    """The shape of one request input, once its name, datatype and shape fit the model."""
    name = tensor.name
    spec = model.inputs.get(name)
    if spec is None:
        raise InvalidArgument(
            f"unknown input '{name}' for model '{model.name}' (inputs: {sorted(model.inputs)})"
        )
    if name in feeds:
        raise InvalidArgument(f"input '{name}' is given twice")
    if tensor.datatype != spec.datatype:
        raise InvalidArgument(
            f"input '{name}': datatype {tensor.datatype!r}, the model expects {spec.datatype}"
        )
    shape = list(tensor.shape)
    check_shape(name, shape, spec.dims, model.max_batch_size)
    return shape


def _requested_outputs(request: pb.ModelInferRequest, model: ModelVersion) -> list[str]:
    if not request.outputs:
        return list(model.outputs)
    outputs = [o.name for o in request.outputs]
    for name in outputs:
        if name not in model.outputs:
            raise InvalidArgument(
                f"unknown output '{name}' for model '{model.name}' "
                f"(outputs: {sorted(model.outputs)})"
            )
    if len(set(outputs)) != len(outputs):
        raise InvalidArgument("an output is requested twice")
    return outputs


def request_parameters(request: pb.ModelInferRequest) -> tuple[int, float | None]:
    """(priority, timeout in seconds or None) from Triton's request parameters. tritonclient
    sends priority as uint64_param and timeout (microseconds) as int64_param."""
    priority, timeout = 0, None
    if "priority" in request.parameters:
        value = _integer(request.parameters["priority"], "priority")
        if value < 0:
            raise InvalidArgument(f"priority must not be negative, got {value}")
        priority = value
    if "timeout" in request.parameters:
        micros = _integer(request.parameters["timeout"], "timeout")
        if micros < 0:
            raise InvalidArgument(f"timeout must not be negative, got {micros}")
        timeout = micros / 1e6 if micros else None
    return priority, timeout


def sequence_flags(request: pb.ModelInferRequest) -> SequenceFlags | None:
    """Triton's sequence parameters (sequence_id: an integer, or a string; sequence_start and
    sequence_end: booleans), or None when the request names no sequence (id 0 or "")."""
    parameters = request.parameters
    if "sequence_id" not in parameters:
        return None
    parameter = parameters["sequence_id"]
    sequence_id: int | str
    if parameter.WhichOneof("parameter_choice") == "string_param":
        text = parameter.string_param
        if len(text) > MAX_SEQUENCE_ID_CHARS or not text.isprintable():
            raise InvalidArgument(
                f"sequence_id: at most {MAX_SEQUENCE_ID_CHARS} printable characters"
            )
        sequence_id = text
    else:
        sequence_id = _integer(parameter, "sequence_id")
        if sequence_id < 0:
            raise InvalidArgument(f"sequence_id must not be negative, got {sequence_id}")
    if not sequence_id:
        return None
    return SequenceFlags(
        sequence_id, _flag(parameters, "sequence_start"), _flag(parameters, "sequence_end")
    )


def _flag(parameters: Mapping[str, pb.InferParameter], name: str) -> bool:
    if name not in parameters:
        return False
    parameter = parameters[name]
    if parameter.WhichOneof("parameter_choice") != "bool_param":
        raise InvalidArgument(f"parameter '{name}' must be a boolean")
    return bool(parameter.bool_param)


def _integer(parameter: pb.InferParameter, name: str) -> int:
    kind = parameter.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise InvalidArgument(f"parameter '{name}' must be an integer, got {kind or 'nothing'}")
    return int(getattr(parameter, kind))


def batch_rows(feeds: dict[str, np.ndarray], model: ModelVersion) -> int:
    """Rows a request adds to a batch: its batch dimension, or 1 for a model that cannot batch."""
    if model.max_batch_size == 0 or not feeds:
        return 1
    return int(next(iter(feeds.values())).shape[0])


def output_regions(
    request: pb.ModelInferRequest,
    shm: SharedMemory | None,
    held: list[Held],
) -> dict[str, memoryview]:
    """The shared memory each requested output is to be written to (checked before the run)."""
    targets: dict[str, memoryview] = {}
    for output in request.outputs:
        if output.parameters and uses_shared_memory(output.parameters):
            if shm is None:
                raise InvalidArgument("this listener takes no shared memory")
            region, view = shm.acquire(output.parameters, f"output '{output.name}'", output=True)
            held.append((region, view))
            targets[output.name] = view
    return targets


def encode_response(
    request: pb.ModelInferRequest,
    model: ModelVersion,
    names: list[str],
    arrays: list[np.ndarray],
    targets: dict[str, memoryview] | None = None,
) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(
        model_name=model.name, model_version=str(model.version), id=request.id
    )
    for name, array in zip(names, arrays, strict=True):
        datatype, shape, data = encode(array)
        response.outputs.add(name=name, datatype=datatype, shape=shape)
        target = targets.get(name) if targets else None
        if target is not None:
            if len(data) > len(target):
                raise InvalidArgument(
                    f"output '{name}' needs {len(data)} bytes; its shared memory region has "
                    f"{len(target)}"
                )
            target[: len(data)] = data
            data = b""  # as Triton: an empty entry keeps the indices aligned
        response.raw_output_contents.append(data)
    return response
