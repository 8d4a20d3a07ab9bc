"""GRPCInferenceService: thin handlers over the registry. Every handler maps errors through
rpc/status.py; a malformed request gets INVALID_ARGUMENT and touches nothing else."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import grpc

import edge_agent
from edge_agent._proto import grpc_service_pb2 as pb
from edge_agent._proto import grpc_service_pb2_grpc as pb_grpc
from edge_agent.api.cuda_shm import CudaRegion
from edge_agent.api.infer import (
    batch_rows,
    decode_request,
    encode_response,
    output_regions,
    request_parameters,
)
from edge_agent.api.shm import SharedMemory
from edge_agent.api.statistics import fill_statistics
from edge_agent.errors import (
    DeadlineExceeded,
    EdgeAgentError,
    ExecutionError,
    InvalidArgument,
    ModelLoadError,
    QueueFull,
    Unavailable,
)
from edge_agent.repository.lifecycle import ROLLBACK_PARAMETER, LoadRequest, ModelManager
from edge_agent.repository.registry import READY, UNAVAILABLE, ModelRegistry
from edge_agent.repository.scan import model_dirs
from edge_agent.repository.staging import FILE_PREFIX, parse_files
from edge_agent.rpc.status import to_status
from edge_agent.rpc.wire import Malformed
from edge_agent.runtime.session import cuda_known_unavailable
from edge_agent.scheduling.stats import BACKEND, CANCELED, OTHER, REJECTED

# What ServerMetadata advertises: only what is implemented (perf_analyzer acts on this list).
EXTENSIONS = ("model_configuration", "model_repository", "statistics", "schedule_policy")
ACTIVE_PROVIDER_PARAMETER = "edge_agent.active_provider"
VARIANT_PARAMETER = "edge_agent.variant"


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
    wrapped.__wrapped__ = fn  # type: ignore[attr-defined]  # the HTTP front end calls it bare
    return wrapped


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]  # generated
    def __init__(self, registry: ModelRegistry, manager: ModelManager) -> None:
        self._registry = registry
        self.max_elements_per_tensor = 1 << 24  # set from the settings by the agent
        self.max_elements_per_request = 1 << 25
        self._manager = manager
        self.ready = False  # set by the agent once startup is complete, cleared on shutdown
        self.shm = SharedMemory(enabled=False)  # the agent's allow_shared_memory

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
        extensions: tuple[str, ...] = EXTENSIONS
        if self.shm.enabled:
            extensions += ("system_shared_memory",)
            if cuda_known_unavailable() is None:
                extensions += ("cuda_shared_memory",)
        return pb.ServerMetadataResponse(
            name="edge-agent", version=edge_agent.__version__, extensions=extensions
        )

    @_handler
    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: Any
    ) -> pb.SystemSharedMemoryStatusResponse:
        response = pb.SystemSharedMemoryStatusResponse()
        for region in self.shm.status(request.name):
            response.regions[region.name].CopyFrom(
                pb.SystemSharedMemoryStatusResponse.RegionStatus(
                    name=region.name, key=region.key, offset=region.offset,
                    byte_size=region.byte_size,
                )
            )  # fmt: skip
        return response

    @_handler
    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: Any
    ) -> pb.SystemSharedMemoryRegisterResponse:
        self.shm.register(
            context.peer(), request.name, request.key, request.offset, request.byte_size
        )
        return pb.SystemSharedMemoryRegisterResponse()

    @_handler
    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Any
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        self.shm.unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    @_handler
    async def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: Any
    ) -> pb.CudaSharedMemoryStatusResponse:
        response = pb.CudaSharedMemoryStatusResponse()
        for region in self.shm.status(request.name, CudaRegion):
            response.regions[region.name].CopyFrom(
                pb.CudaSharedMemoryStatusResponse.RegionStatus(
                    name=region.name, device_id=region.device_id, byte_size=region.byte_size
                )
            )
        return response

    @_handler
    async def CudaSharedMemoryRegister(
        self, request: pb.CudaSharedMemoryRegisterRequest, context: Any
    ) -> pb.CudaSharedMemoryRegisterResponse:
        # Opening an IPC handle can take a while (a context on the device): off the loop.
        await asyncio.to_thread(
            self.shm.register_cuda,
            context.peer(),
            request.name,
            request.raw_handle,
            request.device_id,
            request.byte_size,
        )
        return pb.CudaSharedMemoryRegisterResponse()

    @_handler
    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: Any
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        self.shm.unregister(request.name, CudaRegion)
        return pb.CudaSharedMemoryUnregisterResponse()

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
        # Our extension field (protos: ModelMetadataResponse.parameters).
        response.parameters[ACTIVE_PROVIDER_PARAMETER].string_param = model.provider
        if model.variant:
            response.parameters[VARIANT_PARAMETER].string_param = model.variant
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
        if model.variant:
            response.config.parameters[VARIANT_PARAMETER].string_value = model.variant
        return response

    @_handler
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Any
    ) -> pb.ModelInferResponse:
        return await self.infer(request, context.time_remaining())

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
                response = await self.infer(request)
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

    async def infer(
        self, request: pb.ModelInferRequest, time_remaining: float | None = None
    ) -> pb.ModelInferResponse:
        """One inference, whatever the front end (gRPC, HTTP): limits, scheduler, statistics."""
        started = time.monotonic_ns()
        if not request.model_name:
            raise InvalidArgument("model_name is empty")
        priority, timeout = request_parameters(request)
        loop = asyncio.get_running_loop()
        deadline = min(
            (loop.time() + t for t in (time_remaining, timeout) if t is not None), default=None
        )
        # Waits only while a drain_first swap is under way; from here to the scheduler's queue
        # there is no await, so a version retired meanwhile still answers this request.
        model = await self._registry.acquire(request.model_name, request.model_version, deadline)
        held: list[Any] = []  # shared memory regions this request reads or writes
        try:
            feeds, outputs = decode_request(
                request,
                model,
                self.max_elements_per_tensor,
                self.max_elements_per_request,
                self.shm,
                held,
            )
            targets = output_regions(request, self.shm, held) if request.outputs else None
            response: pb.ModelInferResponse = await model.scheduler.infer(
                feeds,
                outputs,
                batch_rows(feeds, model),
                functools.partial(encode_response, request, model, outputs, targets=targets),
                priority=priority,
                deadline=deadline,
            )
        except asyncio.CancelledError:
            model.stats.record_failure(time.monotonic_ns() - started, CANCELED, "cancelled")
            raise
        except Exception as exc:
            reason, cause = failure_kind(exc)
            model.stats.record_failure(time.monotonic_ns() - started, reason, cause)
            raise
        finally:
            if held:
                self.shm.release(held)
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
        entries = {entry.name: entry for entry in self._registry.entries()}
        on_disk = await asyncio.to_thread(model_dirs, self._manager.repository)
        for name in sorted(set(entries) | set(on_disk)):
            entry = entries.get(name)
            if entry is None or (entry.error and not entry.versions):
                if not request.ready:
                    reason = entry.error if entry is not None else "not loaded"
                    response.models.add(name=name, state=UNAVAILABLE, reason=reason)
                continue
            if entry.error and not request.ready:
                response.models.add(name=name, state=UNAVAILABLE, reason=entry.error)
            for state in entry.states():
                if request.ready and state.state != READY:
                    continue
                response.models.add(
                    name=name, version=str(state.version), state=state.state, reason=state.reason
                )
        return response

    @_handler
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        try:
            await self._manager.load(request.model_name, load_request(request.parameters))
        except ModelLoadError as exc:  # Triton answers a failed load with INVALID_ARGUMENT
            raise InvalidArgument(str(exc)) from exc
        return pb.RepositoryModelLoadResponse()

    @_handler
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        for key, value in request.parameters.items():
            # Triton's only unload parameter; nothing here depends on another model.
            if key != "unload_dependents" or value.WhichOneof("parameter_choice") != "bool_param":
                raise InvalidArgument(f"unknown or mistyped unload parameter {key!r}")
        await self._manager.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()


def load_request(parameters: Mapping[str, pb.ModelRepositoryParameter]) -> LoadRequest:
    """RepositoryModelLoad's parameters: `config` (JSON ModelConfig, string), `file:<version>/
    <name>` (bytes), and ours, `rollback` (bool)."""
    config_json, files, rollback = None, {}, False
    for key, value in parameters.items():
        kind = value.WhichOneof("parameter_choice")
        if key == "config" and kind == "string_param":
            config_json = value.string_param
        elif key.startswith(FILE_PREFIX) and kind == "bytes_param":
            files[key] = value.bytes_param
        elif key == ROLLBACK_PARAMETER and kind == "bool_param":
            rollback = value.bool_param
        else:
            raise InvalidArgument(
                f"unknown or mistyped load parameter {key!r}: expected config (string), "
                f"file:<version>/<name> (bytes) or {ROLLBACK_PARAMETER} (bool)"
            )
    return LoadRequest(config_json, parse_files(files), rollback)


def failure_kind(exc: BaseException) -> tuple[str, str | None]:
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
