"""SubmitExamples (protos/edge_agent/_proto/examples.proto): labelled examples from the
applications beside the agent, checked against the serving model like a ModelInfer request and
kept in the example store (learn/examples.py) for learning on the fleet.

A malformed example is refused with INVALID_ARGUMENT naming the problem and nothing of its call
is stored: unknown or missing inputs, wrong datatypes or shapes, byte counts that do not match,
NaN or Inf, a label count that is not the row count, a label outside the model's classes.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, cast

import grpc
import numpy as np

from edge_agent._proto import examples_pb2 as pb
from edge_agent._proto import grpc_service_pb2 as inference
from edge_agent.api.infer import decode_request
from edge_agent.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from edge_agent.learn.examples import ExampleStore
from edge_agent.repository.registry import ModelRegistry
from edge_agent.repository.version import ModelVersion
from edge_agent.rpc.status import to_status
from edge_agent.rpc.wire import Malformed

SERVICE = pb.DESCRIPTOR.services_by_name["ExampleService"]
ACCEPT_EXAMPLES = "accept_examples"  # model config parameter: also on the inference listener
MAX_ROWS_PER_CALL = 1 << 16


def accepts_examples(model: ModelVersion) -> bool:
    parameter = model.config.parameters.get(ACCEPT_EXAMPLES)
    return parameter is not None and parameter.string_value.strip().lower() in ("true", "1")


def classes(model: ModelVersion) -> int | None:
    """How many classes a label may name: the first FP32 output's size per row, if fixed."""
    for name in model.outputs:
        spec = model.outputs[name]
        if spec.datatype == "FP32" and len(spec.dims) == 1 and spec.dims[0] > 0:
            return int(spec.dims[0])
    return None


@dataclasses.dataclass
class _Rows:
    """The model as decode_request sees it, with no batch limit: a submission's rows are not
    a batch the model runs."""

    name: str
    inputs: Any
    outputs: Any
    max_batch_size: int = MAX_ROWS_PER_CALL


def check_examples(
    request: pb.SubmitExamplesRequest, model: ModelVersion, max_elements: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The checked input arrays and labels of one submission (see the module doc)."""
    if model.max_batch_size <= 0:
        raise FailedPrecondition(
            f"model '{model.name}' does not batch (max_batch_size 0): its examples have no rows"
        )
    infer = inference.ModelInferRequest(model_name=model.name)
    for tensor in request.inputs:
        infer.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=list(tensor.shape))
    infer.raw_input_contents.extend(request.raw_input_contents)
    view = cast(ModelVersion, _Rows(model.name, model.inputs, model.outputs))
    feeds, _ = decode_request(infer, view, max_elements, max_elements)
    rows = {int(v.shape[0]) for v in feeds.values()}
    if len(rows) != 1:
        raise InvalidArgument(f"inputs disagree on the number of rows: {sorted(rows)}")
    (count,) = rows
    labels = np.asarray(request.labels, dtype=np.int64)
    if len(labels) != count:
        raise InvalidArgument(f"{len(labels)} labels for {count} rows: give one label per row")
    for name, value in feeds.items():
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            raise InvalidArgument(f"input '{name}' holds NaN or Inf")
    limit = classes(model)
    if count and (labels.min() < 0 or (limit is not None and labels.max() >= limit)):
        raise InvalidArgument(
            f"labels must lie in 0..{(limit or 0) - 1 if limit else 'the class count - 1'}; "
            f"got {int(labels.min())}..{int(labels.max())}"
        )
    return feeds, labels


class ExampleServicer:
    """One per listener: on the inference listener only models with accept_examples."""

    def __init__(
        self,
        registry: ModelRegistry,
        store: ExampleStore | None,
        inference_listener: bool,
        max_elements: int = 1 << 25,
    ) -> None:
        self._registry = registry
        self._store = store
        self._inference_listener = inference_listener
        self.max_elements = max_elements

    async def SubmitExamples(
        self, request: pb.SubmitExamplesRequest, context: grpc.aio.ServicerContext
    ) -> pb.SubmitExamplesResponse:
        try:
            if isinstance(request, Malformed):
                raise InvalidArgument(request.reason)
            model = self._registry.get(request.model_name)
            if self._inference_listener and not accepts_examples(model):
                raise PermissionDenied(
                    f"model '{model.name}' takes examples on the control listener only (set its "
                    f"config parameter {ACCEPT_EXAMPLES} to take them here)"
                )
            if self._store is None:
                raise FailedPrecondition("the agent keeps examples only with a state_dir")
            try:
                feeds, labels = check_examples(request, model, self.max_elements)
            except InvalidArgument:
                self._store.refused(model.name)
                raise
            accepted, stored, dropped = await asyncio.to_thread(
                self._store.add, model.name, feeds, labels
            )
            return pb.SubmitExamplesResponse(accepted=accepted, stored=stored, dropped=dropped)
        except Exception as exc:
            code, message = to_status(exc, rpc="SubmitExamples", model=request_model(request))
            await context.abort(code, message)
            raise AssertionError("unreachable: abort raises") from exc


def request_model(request: Any) -> str | None:
    return getattr(request, "model_name", None)
