"""The inference listener on gRPC's synchronous server (`front_end = "sync"`), feeding the same
scheduler as the asyncio front end.

Why: with grpc.aio every request crosses from gRPC's poller to the event loop and back, and a
threaded model adds two more hand-offs (loop -> execution thread -> loop). gRPC's sync server
hands a request to a pool thread once; from there this front end does what a naive server does
when the model is idle (the handler thread runs the model itself), and under load queues it with
the same scheduler (bounded queues, priorities, deadlines, the instance limit) as a follower:
the thread that frees an instance hands the next waiting handler thread a batch of what queued
(dynamic batching), which it runs and answers itself (`Scheduler.submit`: leader/follower,
one wake-up per request, never through the event loop). The request path itself is the data
plane's (`DataPlane.infer_on_thread`), as on every front end.

Everything else keeps its one implementation: the other RPCs of the service, health and the
examples service run their asyncio handlers on the loop (`_via_loop`); a model in a drain_first
swap is served through the loop too (the gate is an asyncio.Event). A version retired between a
handler finding it and queueing on it is asked again of the new version: swaps fail nothing on
this path either.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from edge_agent._proto import examples_pb2
from edge_agent._proto import grpc_service_pb2 as pb
from edge_agent.api.dataplane import DataPlane
from edge_agent.api.examples import SERVICE as EXAMPLES
from edge_agent.api.examples import ExampleServicer
from edge_agent.api.security import CONTROL_METHODS, control_denied
from edge_agent.api.server import HEALTH, NAMES, REFLECTION, SERVICE
from edge_agent.api.servicer import InferenceServicer
from edge_agent.rpc.connections import (
    ConnectionGuard,
    ConnectionLimits,
    NotingServer,
    server_options,
)
from edge_agent.rpc.status import answers_sync
from edge_agent.rpc.wire import add_foreign_service, add_service, method_handlers


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
    """ModelInfer and ModelStreamInfer on the caller's thread, over the data plane."""

    def __init__(self, plane: DataPlane, loop: asyncio.AbstractEventLoop) -> None:
        self._plane = plane
        self._loop = loop

    @answers_sync
    def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.ServicerContext
    ) -> pb.ModelInferResponse:
        return self._plane.infer_on_thread(
            request, context.time_remaining(), context.add_callback, self._loop
        )

    def ModelStreamInfer(
        self, requests: Iterator[pb.ModelInferRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ModelStreamInferResponse]:
        for request in requests:
            yield self._plane.stream_infer_on_thread(request, self._loop)


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


def _deny(request: Any, context: grpc.ServicerContext) -> Any:
    denied = control_denied("control_address")
    context.abort(denied.code, str(denied))


class _Namespace:
    """Attributes by name: what method_handlers reads a servicer's methods from."""

    def __init__(self, **methods: Callable[..., Any]) -> None:
        self.__dict__.update(methods)


def build_sync_server(
    servicer: InferenceServicer,
    plane: DataPlane,
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
    fast = SyncInference(plane, loop)
    methods: dict[str, Callable[..., Any]] = {}
    for method in SERVICE.methods:
        if method.name in ("ModelInfer", "ModelStreamInfer"):
            methods[method.name] = getattr(fast, method.name)
        elif deny_control and f"/{SERVICE.full_name}/{method.name}" in CONTROL_METHODS:
            methods[method.name] = _deny
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
