"""The inference listener on gRPC's synchronous server (`front_end = "sync"`), feeding the same
scheduler as the asyncio front end.

Why: with grpc.aio every request crosses from gRPC's poller to the event loop and back, and a
threaded model adds two more hand-offs (loop -> execution thread -> loop). gRPC's sync server
hands a request to a pool thread once; from there this front end does what a naive server does
when the model is idle (the handler thread runs the model itself), and under load queues it with
the same scheduler (bounded queues, priorities, deadlines, the instance limit) as a follower:
the thread that frees an instance hands the next waiting handler thread a batch of what queued
(dynamic batching), which it runs and answers itself (`Scheduler.submit`: leader/follower,
one wake-up per request, never through the event loop).

Everything else keeps its one implementation: the other RPCs of the service, health and the
examples service run their asyncio handlers on the loop (`_via_loop`); a model in a drain_first
swap is served through the loop too (the gate is an asyncio.Event). A version retired between a
handler finding it and queueing on it answers Retiring, and the handler asks again (the new
version): swaps fail nothing on this path either.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from edge_agent._proto import examples_pb2
from edge_agent._proto import grpc_service_pb2 as pb
from edge_agent.api.examples import SERVICE as EXAMPLES
from edge_agent.api.examples import ExampleServicer
from edge_agent.api.infer import (
    batch_rows,
    decode_request,
    encode_response,
    output_regions,
    request_parameters,
)
from edge_agent.api.security import CONTROL_METHODS
from edge_agent.api.server import HEALTH, NAMES, REFLECTION
from edge_agent.api.servicer import InferenceServicer, failure_kind
from edge_agent.errors import InvalidArgument, Retiring
from edge_agent.repository.registry import ModelRegistry
from edge_agent.rpc.connections import (
    ConnectionGuard,
    ConnectionLimits,
    NotingServer,
    server_options,
)
from edge_agent.rpc.status import to_status
from edge_agent.rpc.wire import Malformed, add_foreign_service, add_service, method_handlers
from edge_agent.scheduling.batching import shape_key
from edge_agent.scheduling.scheduler import Pending, ThreadFuture
from edge_agent.scheduling.stats import CANCELED

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
RETRIES = 3  # a version retired under a request: ask again (a swap per attempt at most)


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class _AioContext:
    """What the asyncio handlers ask of their context, answered from a sync one."""

    def __init__(self, context: grpc.ServicerContext) -> None:
        self._context = context

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise _Abort(code, details)

    def __getattr__(self, name: str) -> Any:  # peer, time_remaining, invocation_metadata, ...
        return getattr(self._context, name)


class SyncServer:
    """grpc.Server with the asyncio server's start / stop, for the agent."""

    def __init__(self, server: grpc.Server) -> None:
        self._server = server

    def __getattr__(self, name: str) -> Any:  # add_insecure_port, add_secure_port, ...
        return getattr(self._server, name)

    async def start(self) -> None:
        self._server.start()

    async def stop(self, grace: float | None) -> None:
        await asyncio.to_thread(self._server.stop(grace).wait)


class SyncInference:
    def __init__(
        self, servicer: InferenceServicer, registry: ModelRegistry, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._servicer = servicer
        self._registry = registry
        self._loop = loop

    # -- the hot path -------------------------------------------------------------------------

    def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.ServicerContext
    ) -> pb.ModelInferResponse:
        try:
            if isinstance(request, Malformed):
                raise InvalidArgument(request.reason)
            return self.infer(request, context)
        except Exception as exc:
            code, message = to_status(
                exc,
                rpc="ModelInfer",
                model=getattr(request, "model_name", None),
                request_id=getattr(request, "id", None) or None,
            )
            context.abort(code, message)
            raise AssertionError("unreachable: abort raises") from exc

    def ModelStreamInfer(
        self, requests: Iterator[pb.ModelInferRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ModelStreamInferResponse]:
        # As the asyncio front end: a failed request answers with error_message, the stream
        # goes on; one request at a time, in order.
        for request in requests:
            try:
                if isinstance(request, Malformed):
                    raise InvalidArgument(request.reason)
                response = self.infer(request, None)
            except Exception as exc:
                _, message = to_status(
                    exc,
                    rpc="ModelStreamInfer",
                    model=getattr(request, "model_name", None),
                    request_id=getattr(request, "id", None) or None,
                )
                yield pb.ModelStreamInferResponse(
                    error_message=message,
                    infer_response=pb.ModelInferResponse(id=getattr(request, "id", "")),
                )
                continue
            yield pb.ModelStreamInferResponse(infer_response=response)

    def infer(
        self, request: pb.ModelInferRequest, context: grpc.ServicerContext | None
    ) -> pb.ModelInferResponse:
        if not request.model_name:
            raise InvalidArgument("model_name is empty")
        remaining = context.time_remaining() if context is not None else None
        for _ in range(RETRIES):
            entry = self._registry.find(request.model_name)
            if entry is not None and entry.gate is not None:  # drain_first: the loop's way
                coroutine = self._servicer.infer(request, remaining)
                return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()
            try:
                return self._once(request, remaining, context)
            except Retiring:
                continue  # swapped out under us: the new version takes it
        raise Retiring(f"model '{request.model_name}' is swapping versions; retry")

    def _once(
        self,
        request: pb.ModelInferRequest,
        remaining: float | None,
        context: grpc.ServicerContext | None,
    ) -> pb.ModelInferResponse:
        started = time.monotonic_ns()
        priority, timeout = request_parameters(request)
        now = time.monotonic()  # asyncio's loop.time() is this clock: deadlines carry over
        deadline = min((now + t for t in (remaining, timeout) if t is not None), default=None)
        model = self._registry.get(request.model_name, request.model_version)
        scheduler = model.scheduler
        level = scheduler.policy.level_of(priority)  # refuses a priority outside the levels
        if not scheduler.started:
            asyncio.run_coroutine_threadsafe(_start(scheduler), self._loop).result()
        servicer = self._servicer
        held: list[Any] = []
        try:
            feeds, outputs = decode_request(
                request,
                model,
                servicer.max_elements_per_tensor,
                servicer.max_elements_per_request,
                servicer.shm,
                held,
            )
            targets = output_regions(request, servicer.shm, held) if request.outputs else None
            pending = Pending(
                feeds,
                outputs,
                batch_rows(feeds, model),
                shape_key(feeds),
                functools.partial(encode_response, request, model, outputs, targets=targets),
                ThreadFuture(),
                level,
                time.monotonic_ns(),
                now,
                deadline,
            )
            response = scheduler.submit(
                pending, priority, context.add_callback if context is not None else None
            )
        except Retiring:
            raise
        except Exception as exc:
            reason, cause = failure_kind(exc)
            model.stats.record_failure(time.monotonic_ns() - started, reason, cause)
            raise
        except BaseException:
            model.stats.record_failure(time.monotonic_ns() - started, CANCELED, "cancelled")
            raise
        finally:
            if held:
                servicer.shm.release(held)
        model.stats.record_success(time.monotonic_ns() - started)
        return response  # type: ignore[no-any-return]


async def _start(scheduler: Any) -> None:
    scheduler.start_on(asyncio.get_running_loop())


def _via_loop(
    method: Callable[..., Any], loop: asyncio.AbstractEventLoop, stream: bool = False
) -> Callable[..., Any]:
    """An asyncio handler run on the loop, for the sync server: its abort becomes ours."""
    if stream:

        def streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            agen: AsyncIterator[Any] = method(request, _AioContext(context))

            async def following() -> Any:
                return await anext(agen)

            while True:
                try:
                    item: Any = asyncio.run_coroutine_threadsafe(following(), loop).result()
                except StopAsyncIteration:
                    return
                except _Abort as abort:
                    context.abort(abort.code, abort.details)
                yield item

        return streaming

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return asyncio.run_coroutine_threadsafe(
                method(request, _AioContext(context)), loop
            ).result()
        except _Abort as abort:
            context.abort(abort.code, abort.details)

    return unary


def _deny(message: str) -> Callable[..., Any]:
    def deny(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.PERMISSION_DENIED, message)

    return deny


class _Namespace:
    """Attributes by name: what method_handlers reads a servicer's methods from."""

    def __init__(self, **methods: Callable[..., Any]) -> None:
        self.__dict__.update(methods)


def build_sync_server(
    servicer: InferenceServicer,
    registry: ModelRegistry,
    health_servicer: health.aio.HealthServicer,
    max_message_bytes: int,
    limits: ConnectionLimits,
    guard: ConnectionGuard,
    loop: asyncio.AbstractEventLoop,
    threads: int,
    deny_control: bool = True,
    examples: ExampleServicer | None = None,
) -> SyncServer:
    server = grpc.server(
        ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rpc"),
        maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
        options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            *server_options(limits),
        ],
    )
    noting = NotingServer(server, guard)
    fast = SyncInference(servicer, registry, loop)
    methods: dict[str, Callable[..., Any]] = {}
    for method in SERVICE.methods:
        if method.name in ("ModelInfer", "ModelStreamInfer"):
            methods[method.name] = getattr(fast, method.name)
        elif deny_control and f"/{SERVICE.full_name}/{method.name}" in CONTROL_METHODS:
            methods[method.name] = _deny(
                "model load / unload is served on the control listener (control_address), "
                "not on the inference listener"
            )
        else:
            methods[method.name] = _via_loop(getattr(servicer, method.name), loop)
    add_service(noting, SERVICE, method_handlers(SERVICE, pb, _Namespace(**methods)))
    if examples is not None:
        wrapped = {m.name: _via_loop(getattr(examples, m.name), loop) for m in EXAMPLES.methods}
        add_service(
            noting, EXAMPLES, method_handlers(EXAMPLES, examples_pb2, _Namespace(**wrapped))
        )
    health_on_loop = _Namespace(
        Check=_via_loop(health_servicer.Check, loop),
        Watch=_via_loop(health_servicer.Watch, loop, stream=True),
    )
    add_foreign_service(noting, HEALTH, health_pb2, health_on_loop)
    add_foreign_service(noting, REFLECTION, reflection_pb2, reflection.ReflectionServicer(NAMES))
    return SyncServer(server)
