"""The data plane: what the agent does for a call, whatever the transport carried it.

The asyncio gRPC servicer (api/servicer.py), gRPC's synchronous server (api/sync_front.py) and
the HTTP front end (api/http.py) are adapters: each translates its wire format to and from these
methods, and maps the project's exceptions (errors.py) to its status in one place (rpc/status.py
for gRPC, `error_response` in api/http.py for HTTP). Requests and answers are the KServe v2
protocol's own messages (pb.ModelInferRequest, ...): HTTP's JSON is parsed into them, so a
request has one representation, and the hot path copies no tensor into a third one.

An inference, on any front end: request parameters (priority, timeout) -> the version to run
(waiting out a drain_first swap) -> decoding and checking the inputs against its signature
(shared memory regions acquired) -> a Job submitted to the version's scheduler -> the response
encoded on the execution thread -> statistics recorded and regions released, success or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Iterator, Mapping
from typing import Any

import edge_agent
from edge_agent._proto import grpc_service_pb2 as pb
from edge_agent.api.infer import (
    batch_rows,
    decode_request,
    encode_response,
    output_regions,
    request_parameters,
    sequence_flags,
)
from edge_agent.api.shm import Held, SharedMemory
from edge_agent.api.statistics import fill_statistics
from edge_agent.errors import (
    InvalidArgument,
    ModelLoadError,
    Retiring,
)
from edge_agent.repository.lifecycle import ROLLBACK_PARAMETER, LoadRequest, ModelManager
from edge_agent.repository.registry import READY, UNAVAILABLE, ModelRegistry
from edge_agent.repository.scan import model_dirs
from edge_agent.repository.staging import FILE_PREFIX, parse_files
from edge_agent.repository.version import ModelVersion
from edge_agent.rpc.status import call_fields, to_status
from edge_agent.rpc.wire import Malformed
from edge_agent.runtime.session import cuda_known_unavailable
from edge_agent.scheduling.scheduler import Job, VersionScheduler
from edge_agent.scheduling.stats import CANCELED, failure_kind

# What ServerMetadata advertises: only what is implemented (perf_analyzer acts on this list).
EXTENSIONS = ("model_configuration", "model_repository", "statistics", "schedule_policy")
ACTIVE_PROVIDER_PARAMETER = "edge_agent.active_provider"
VARIANT_PARAMETER = "edge_agent.variant"
# A version retired between a caller thread finding it and queueing on it: ask again (the new
# version takes it; one swap per attempt at most).
RETRIES = 3


class DataPlane:
    def __init__(self, registry: ModelRegistry, manager: ModelManager) -> None:
        self.registry = registry
        self.manager = manager
        self.ready = False  # set by the agent once startup is complete, cleared on shutdown
        self.shm = SharedMemory(enabled=False)  # the agent's allow_shared_memory
        self.max_elements_per_tensor = 1 << 24  # set from the settings by the agent
        self.max_elements_per_request = 1 << 25

    # -- the server and its models -------------------------------------------------------------

    def server_metadata(self) -> pb.ServerMetadataResponse:
        extensions: tuple[str, ...] = EXTENSIONS
        if self.shm.enabled:
            extensions += ("system_shared_memory",)
            if cuda_known_unavailable() is None:
                extensions += ("cuda_shared_memory",)
        return pb.ServerMetadataResponse(
            name="edge-agent", version=edge_agent.__version__, extensions=extensions
        )

    def model_ready(self, name: str, version: str) -> bool:
        return self.ready and self.registry.is_ready(name, version)

    def model_metadata(self, name: str, version: str) -> pb.ModelMetadataResponse:
        model = self.registry.get(name, version)
        batch = [-1] if model.max_batch_size > 0 else []
        response = pb.ModelMetadataResponse(
            name=model.name,
            versions=[str(m.version) for m in self.registry.entry(name).ready_versions()],
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

    def model_config(self, name: str, version: str) -> pb.ModelConfigResponse:
        model = self.registry.get(name, version)
        response = pb.ModelConfigResponse()
        response.config.CopyFrom(model.config)
        # The provider actually obtained, which may differ from what was asked (CPU fallback).
        response.config.parameters[ACTIVE_PROVIDER_PARAMETER].string_value = model.provider
        if model.variant:
            response.config.parameters[VARIANT_PARAMETER].string_value = model.variant
        return response

    def statistics(self, name: str, version: str) -> pb.ModelStatisticsResponse:
        if not name:
            models = self.registry.versions()
        elif version:
            self.registry.entry(name)  # an unknown model is NOT_FOUND before its version
            models = [self.registry.get(name, version)]
        else:
            models = self.registry.entry(name).ready_versions()
        response = pb.ModelStatisticsResponse()
        for model in models:
            fill_statistics(response.model_stats.add(), model.name, model.version, model.stats)
        return response

    async def repository_index(self, ready_only: bool) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        entries = {entry.name: entry for entry in self.registry.entries()}
        on_disk = await asyncio.to_thread(model_dirs, self.manager.repository)
        for name in sorted(set(entries) | set(on_disk)):
            entry = entries.get(name)
            if entry is None or (entry.error and not entry.versions):
                if not ready_only:
                    reason = entry.error if entry is not None else "not loaded"
                    response.models.add(name=name, state=UNAVAILABLE, reason=reason)
                continue
            if entry.error and not ready_only:
                response.models.add(name=name, state=UNAVAILABLE, reason=entry.error)
            for state in entry.states():
                if ready_only and state.state != READY:
                    continue
                response.models.add(
                    name=name, version=str(state.version), state=state.state, reason=state.reason
                )
        return response

    async def load(self, name: str, parameters: Mapping[str, pb.ModelRepositoryParameter]) -> None:
        try:
            await self.manager.load(name, load_request(parameters))
        except ModelLoadError as exc:  # Triton answers a failed load with INVALID_ARGUMENT
            raise InvalidArgument(str(exc)) from exc

    async def unload(
        self, name: str, parameters: Mapping[str, pb.ModelRepositoryParameter]
    ) -> None:
        dependents = False
        for key, value in parameters.items():
            # Triton's only unload parameter: also unload the ensembles that run this model.
            if key != "unload_dependents" or value.WhichOneof("parameter_choice") != "bool_param":
                raise InvalidArgument(f"unknown or mistyped unload parameter {key!r}")
            dependents = value.bool_param
        await self.manager.unload(name, dependents)

    # -- inference -----------------------------------------------------------------------------

    async def infer(
        self, request: pb.ModelInferRequest, time_remaining: float | None = None
    ) -> pb.ModelInferResponse:
        """One inference from the event loop (asyncio gRPC, HTTP); `time_remaining` is the
        transport's deadline in seconds."""
        started = time.monotonic_ns()
        priority, deadline = _parameters(request, time_remaining, asyncio.get_running_loop().time())
        # Waits only while a drain_first swap is under way; from here to the scheduler's queue
        # there is no await, so a version retired meanwhile still answers this request.
        model = await self.registry.acquire(request.model_name, request.model_version, deadline)
        with self._job(request, model, priority, deadline, started) as job:
            response: pb.ModelInferResponse = await model.scheduler.infer(job)
        return response

    def infer_on_thread(
        self,
        request: pb.ModelInferRequest,
        time_remaining: float | None,
        on_cancel: Any,
        loop: asyncio.AbstractEventLoop,
    ) -> pb.ModelInferResponse:
        """One inference from a caller's own thread (gRPC's sync server), which runs the model
        itself when it may (Scheduler.submit). `on_cancel(callback)` registers what to do if the
        caller goes away (gRPC's context.add_callback), or is None. A model in a drain_first swap
        is served through `loop` (its gate is an asyncio.Event)."""
        for _ in range(RETRIES):
            entry = self.registry.find(request.model_name)
            if entry is not None and entry.gate is not None:
                coroutine = self.infer(request, time_remaining)
                return asyncio.run_coroutine_threadsafe(coroutine, loop).result()
            try:
                return self._infer_here(request, time_remaining, on_cancel, loop)
            except Retiring:
                continue  # swapped out under us: the new version takes it
        raise Retiring(f"model '{request.model_name}' is swapping versions; retry")

    def _infer_here(
        self,
        request: pb.ModelInferRequest,
        time_remaining: float | None,
        on_cancel: Any,
        loop: asyncio.AbstractEventLoop,
    ) -> pb.ModelInferResponse:
        started = time.monotonic_ns()
        # asyncio's loop.time() is time.monotonic(): deadlines carry over between the paths.
        priority, deadline = _parameters(request, time_remaining, time.monotonic())
        model = self.registry.get(request.model_name, request.model_version)
        if not model.scheduler.started:
            asyncio.run_coroutine_threadsafe(_start(model.scheduler), loop).result()
        with self._job(request, model, priority, deadline, started) as job:
            response: pb.ModelInferResponse = model.scheduler.submit(job, on_cancel)
        return response

    async def stream_infer(self, request: Any) -> pb.ModelStreamInferResponse:
        """One request of a ModelStreamInfer stream: a failure answers with error_message and
        the stream goes on (Triton's semantics)."""
        try:
            if isinstance(request, Malformed):
                raise InvalidArgument(request.reason)
            return pb.ModelStreamInferResponse(infer_response=await self.infer(request))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return stream_failure(exc, request)

    def stream_infer_on_thread(
        self, request: Any, loop: asyncio.AbstractEventLoop
    ) -> pb.ModelStreamInferResponse:
        """`stream_infer` from a caller's thread; one request at a time, in order."""
        try:
            if isinstance(request, Malformed):
                raise InvalidArgument(request.reason)
            response = self.infer_on_thread(request, None, None, loop)
            return pb.ModelStreamInferResponse(infer_response=response)
        except Exception as exc:
            return stream_failure(exc, request)

    @contextlib.contextmanager
    def _job(
        self,
        request: pb.ModelInferRequest,
        model: ModelVersion,
        priority: int,
        deadline: float | None,
        started: int,
    ) -> Iterator[Job]:
        """The request decoded and checked against `model`, as its scheduler takes it; on the
        way out, its statistics recorded and the shared memory it read or wrote released,
        whatever the outcome."""
        held: list[Held] = []
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
            finish = functools.partial(encode_response, request, model, outputs, targets=targets)
            rows = batch_rows(feeds, model)
            yield Job(feeds, outputs, rows, finish, priority, deadline, sequence_flags(request))
        except Retiring:
            raise  # asked again of the new version (infer_on_thread): not a failure
        except Exception as exc:
            reason, cause = failure_kind(exc)
            model.stats.record_failure(time.monotonic_ns() - started, reason, cause)
            raise
        except BaseException:  # cancelled: the caller went away
            model.stats.record_failure(time.monotonic_ns() - started, CANCELED, "cancelled")
            raise
        finally:
            if held:
                self.shm.release(held)
        model.stats.record_success(time.monotonic_ns() - started)


def _parameters(
    request: pb.ModelInferRequest, time_remaining: float | None, now: float
) -> tuple[int, float | None]:
    """(priority, deadline in monotonic seconds or None): the earlier of the transport's
    deadline and the request's `timeout` parameter."""
    if not request.model_name:
        raise InvalidArgument("model_name is empty")
    priority, timeout = request_parameters(request)
    deadline = min((now + t for t in (time_remaining, timeout) if t is not None), default=None)
    return priority, deadline


async def _start(scheduler: VersionScheduler) -> None:
    scheduler.start_on(asyncio.get_running_loop())


def stream_failure(exc: BaseException, request: Any) -> pb.ModelStreamInferResponse:
    _, message = to_status(exc, **call_fields("ModelStreamInfer", request))
    if isinstance(request, Malformed):
        return pb.ModelStreamInferResponse(error_message=message)
    return pb.ModelStreamInferResponse(
        error_message=message, infer_response=pb.ModelInferResponse(id=request.id)
    )


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
