"""Registering a protobuf service with a grpc.aio server from its descriptor, with request
deserializers that never raise and refuse oversized messages before parsing them.

gRPC's generated add_..._to_server parses each request with FromString: a malformed message then
becomes UNKNOWN with a logged traceback, and a large one is parsed whole (on the event loop)
before any of our code can refuse it. Here a request that does not parse, or is larger than its
method allows, reaches the handler as `Malformed`, which answers INVALID_ARGUMENT. Services we
did not write (grpcio's health and reflection) get the same deserializers and a wrapper,
`refusing`, that answers `Malformed` before their code sees it.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from types import ModuleType, SimpleNamespace
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError


class Malformed:
    """Stands in for a request whose bytes did not parse or were too many."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def lenient(message_class: Any, max_bytes: int | None = None) -> Callable[[bytes], Any]:
    """A deserializer that never raises (see the module doc)."""
    name = message_class.DESCRIPTOR.name

    def parse(data: bytes) -> Any:
        if max_bytes is not None and len(data) > max_bytes:
            return Malformed(f"{name} of {len(data)} bytes is over its limit of {max_bytes}")
        try:
            return message_class.FromString(data)
        except DecodeError as exc:
            return Malformed(f"malformed {name}: {exc}")

    return parse


_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def method_handlers(
    service: ServiceDescriptor,
    messages: ModuleType,
    servicer: object,
    max_bytes: Mapping[str, int] | None = None,
) -> dict[str, grpc.RpcMethodHandler]:
    """One handler per method of `service`: the servicer's method of that name, lenient
    deserializers (with the method's byte limit from `max_bytes`, if any)."""
    handlers = {}
    for method in service.methods:
        request = getattr(messages, method.input_type.name)
        response = getattr(messages, method.output_type.name)
        kind = _KINDS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = kind(
            getattr(servicer, method.name),
            request_deserializer=lenient(request, (max_bytes or {}).get(method.name)),
            response_serializer=response.SerializeToString,
        )
    return handlers


def add_service(
    server: Any, service: ServiceDescriptor, handlers: Mapping[str, grpc.RpcMethodHandler]
) -> None:
    """What generated add_..._to_server functions do, with our handlers."""
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, dict(handlers)),)
    )
    server.add_registered_method_handlers(service.full_name, dict(handlers))


def refusing(method: Callable[..., Any], client_streaming: bool) -> Callable[..., Any]:
    """`method` (a servicer's, sync or asyncio) behind a check that answers a `Malformed`
    request INVALID_ARGUMENT; in a request stream, at the message that did not parse."""
    bad = grpc.StatusCode.INVALID_ARGUMENT
    if inspect.isasyncgenfunction(method) and client_streaming:

        async def stream_aio(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
            async def parsed() -> AsyncIterator[Any]:
                async for request in requests:
                    if isinstance(request, Malformed):
                        await context.abort(bad, request.reason)
                    yield request

            async for answer in method(parsed(), context):
                yield answer

        return stream_aio
    if inspect.isasyncgenfunction(method):

        async def streaming_aio(request: Any, context: Any) -> AsyncIterator[Any]:
            if isinstance(request, Malformed):
                await context.abort(bad, request.reason)
            async for answer in method(request, context):
                yield answer

        return streaming_aio
    if inspect.iscoroutinefunction(method):

        async def unary_aio(request: Any, context: Any) -> Any:
            if isinstance(request, Malformed):
                await context.abort(bad, request.reason)
            return await method(request, context)

        return unary_aio
    if client_streaming:

        def stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            def parsed() -> Iterator[Any]:
                for request in requests:
                    if isinstance(request, Malformed):
                        context.abort(bad, request.reason)
                    yield request

            return method(parsed(), context)

        return stream

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, Malformed):
            context.abort(bad, request.reason)
        return method(request, context)

    return unary


def add_foreign_service(
    server: Any, service: ServiceDescriptor, messages: ModuleType, servicer: object
) -> None:
    """Register a servicer we did not write (health, reflection) the way we register ours: a
    request that does not parse is INVALID_ARGUMENT, not UNKNOWN with a logged traceback."""
    methods = {
        m.name: refusing(getattr(servicer, m.name), m.client_streaming) for m in service.methods
    }
    add_service(server, service, method_handlers(service, messages, SimpleNamespace(**methods)))
