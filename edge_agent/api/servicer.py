"""GRPCInferenceService: thin handlers over the registry. Every handler maps errors through
api/status.py; a malformed request gets INVALID_ARGUMENT and touches nothing else."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

import edge_agent
from edge_agent._proto import grpc_service_pb2 as pb
from edge_agent._proto import grpc_service_pb2_grpc as pb_grpc
from edge_agent.api.infer import batch_rows, decode_request, encode_response, request_parameters
from edge_agent.api.statistics import fill_statistics
from edge_agent.api.status import to_status
from edge_agent.errors import (
    DeadlineExceeded,
    EdgeAgentError,
    ExecutionError,
    InvalidArgument,
    QueueFull,
    Unavailable,
)
from edge_agent.repository.registry import READY, UNAVAILABLE, ModelRegistry
from edge_agent.scheduling.stats import BACKEND, CANCELED, OTHER, REJECTED

# What ServerMetadata advertises: only what is implemented (perf_analyzer acts on this list).
EXTENSIONS = ("model_configuration", "statistics", "schedule_policy")
ACTIVE_PROVIDER_PARAMETER = "edge_agent.active_provider"


class Malformed:
    """Stands in for a request whose bytes did not parse (see api/server.py)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


Req = TypeVar("Req")
Resp = TypeVar("Resp")


def _handler(
    fn: Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]:
    async def wrapped(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        try:
            if isinstance(request, Malformed):
                raise InvalidArgument(request.reason)
            return await fn(self, request, context)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            code, message = to_status(
                exc,
                rpc=fn.__name__,
                model=getattr(request, "name", None) or getattr(request, "model_name", None),
                request_id=getattr(request, "id", None) or None,
            )
            await context.abort(code, message)
            raise AssertionError("unreachable: abort raises") from exc

    wrapped.__name__ = fn.__name__
    return wrapped


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]  # generated
    def __init__(self, registry: ModelRegistry) -> None:
        self._registry = registry
        self.ready = False  # set by the agent once startup is complete, cleared on shutdown

    @_handler
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Any
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @_handler
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Any
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.ready)

    @_handler
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Any
    ) -> pb.ModelReadyResponse:
        ready = self.ready and self._registry.is_ready(request.name, request.version)
        return pb.ModelReadyResponse(ready=ready)

    @_handler
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="edge-agent", version=edge_agent.__version__, extensions=EXTENSIONS
        )

    @_handler
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Any
    ) -> pb.ModelMetadataResponse:
        model = self._registry.get(request.name, request.version)
        entry = self._registry.entry(request.name)
        batch = [-1] if model.max_batch_size > 0 else []
        response = pb.ModelMetadataResponse(
            name=model.name,
            versions=[str(m.version) for m in entry.ready_versions()],
            platform=model.config.platform,
        )
        for spec in model.inputs.values():
            response.inputs.add(name=spec.name, datatype=spec.datatype, shape=[*batch, *spec.dims])
        for spec in model.outputs.values():
            response.outputs.add(name=spec.name, datatype=spec.datatype, shape=[*batch, *spec.dims])
        return response

    @_handler
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: Any
    ) -> pb.ModelConfigResponse:
        model = self._registry.get(request.name, request.version)
        response = pb.ModelConfigResponse()
        response.config.CopyFrom(model.config)
        # The provider actually obtained, which may differ from what was asked (CPU fallback).
        response.config.parameters[ACTIVE_PROVIDER_PARAMETER].string_value = model.provider
        return response

    @_handler
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Any
    ) -> pb.ModelInferResponse:
        return await self._infer(request, context.time_remaining())

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        # A failed request answers with error_message and the stream goes on (Triton's semantics).
        async for request in request_iterator:
            if isinstance(request, Malformed):
                _, message = to_status(InvalidArgument(request.reason), rpc="ModelStreamInfer")
                yield pb.ModelStreamInferResponse(error_message=message)
                continue
            try:
                response = await self._infer(request)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _, message = to_status(
                    exc,
                    rpc="ModelStreamInfer",
                    model=request.model_name,
                    request_id=request.id or None,
                )
                yield pb.ModelStreamInferResponse(
                    error_message=message, infer_response=pb.ModelInferResponse(id=request.id)
                )
                continue
            yield pb.ModelStreamInferResponse(infer_response=response)

    async def _infer(
        self, request: pb.ModelInferRequest, time_remaining: float | None = None
    ) -> pb.ModelInferResponse:
        started = time.monotonic_ns()
        if not request.model_name:
            raise InvalidArgument("model_name is empty")
        model = self._registry.get(request.model_name, request.model_version)
        try:
            feeds, outputs = decode_request(request, model)
            priority, timeout = request_parameters(request)
            loop = asyncio.get_running_loop()
            deadlines = [loop.time() + t for t in (time_remaining, timeout) if t is not None]
            response: pb.ModelInferResponse = await model.scheduler.infer(
                feeds,
                outputs,
                batch_rows(feeds, model),
                functools.partial(encode_response, request, model, outputs),
                priority=priority,
                deadline=min(deadlines, default=None),
            )
        except asyncio.CancelledError:
            model.stats.record_failure(time.monotonic_ns() - started, CANCELED, "cancelled")
            raise
        except Exception as exc:
            reason, cause = _failure_kind(exc)
            model.stats.record_failure(time.monotonic_ns() - started, reason, cause)
            raise
        model.stats.record_success(time.monotonic_ns() - started)
        return response

    @_handler
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Any
    ) -> pb.ModelStatisticsResponse:
        if request.name:
            entry = self._registry.entry(request.name)
            if request.version:
                models = [self._registry.get(request.name, request.version)]
            else:
                models = entry.ready_versions()
        else:
            models = self._registry.versions()
        response = pb.ModelStatisticsResponse()
        for model in models:
            fill_statistics(response.model_stats.add(), model.name, model.version, model.stats)
        return response

    @_handler
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Any
    ) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        for entry in self._registry.entries():
            if entry.error:
                if not request.ready:
                    response.models.add(name=entry.name, state=UNAVAILABLE, reason=entry.error)
                continue
            for version, state in sorted(entry.versions.items()):
                if request.ready and state.state != READY:
                    continue
                response.models.add(
                    name=entry.name, version=str(version), state=state.state, reason=state.reason
                )
        return response


def _failure_kind(exc: BaseException) -> tuple[str, str | None]:
    """(Triton's failure reason, our rejection cause or None) for the metrics."""
    if isinstance(exc, QueueFull):
        return REJECTED, "queue_full"
    if isinstance(exc, DeadlineExceeded):
        return REJECTED, "deadline"
    if isinstance(exc, Unavailable):
        return REJECTED, "unavailable"
    if isinstance(exc, ExecutionError) or not isinstance(exc, EdgeAgentError):
        return BACKEND, None
    return OTHER, None
