"""Builds the gRPC server: the inference service, grpc.health.v1 and server reflection."""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from edge_agent._proto import grpc_service_pb2 as pb
from edge_agent.api.security import CONTROL_METHODS, control_elsewhere
from edge_agent.api.servicer import InferenceServicer, Malformed
from edge_agent.errors import ConfigError
from edge_agent.settings import parse_address

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]


def _lenient(message_class: Any) -> Callable[[bytes], Any]:
    """A deserializer that never raises: gRPC would answer a parse error with UNKNOWN and log a
    traceback; the handler turns `Malformed` into INVALID_ARGUMENT instead."""

    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except DecodeError as exc:
            return Malformed(f"malformed {message_class.DESCRIPTOR.name}: {exc}")

    return parse


def add_inference_service(
    server: grpc.aio.Server, servicer: InferenceServicer, deny_control: bool = False
) -> None:
    """What the generated add_..._to_server does, with lenient deserializers. `deny_control`:
    the control RPCs answer PERMISSION_DENIED here (decided once, at registration: nothing is
    added to the path of an inference call)."""
    handlers = {}
    for method in SERVICE.methods:
        if deny_control and f"/{SERVICE.full_name}/{method.name}" in CONTROL_METHODS:
            handlers[method.name] = control_elsewhere()
            continue
        request, response = (
            getattr(pb, method.input_type.name),
            getattr(pb, method.output_type.name),
        )
        kind = (
            grpc.stream_stream_rpc_method_handler
            if method.client_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = kind(
            getattr(servicer, method.name),
            request_deserializer=_lenient(request),
            response_serializer=response.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),)
    )
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


def build_server(
    servicer: InferenceServicer,
    health_servicer: health.aio.HealthServicer,
    max_message_bytes: int,
    max_concurrent_rpcs: int,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    deny_control: bool = False,
) -> grpc.aio.Server:
    server = grpc.aio.server(
        interceptors=list(interceptors),
        maximum_concurrent_rpcs=max_concurrent_rpcs,
        options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # gRPC sets SO_REUSEPORT by default: a second agent would silently share the port.
            ("grpc.so_reuseport", 0),
        ],
    )
    add_inference_service(server, servicer, deny_control)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE.full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    return server


def bind(
    server: grpc.aio.Server,
    address: str,
    credentials: grpc.ServerCredentials | None = None,
    key: str = "grpc_address",
) -> int:
    """Bind the listener (TLS with `credentials`); returns the port (the real one when asked
    for port 0; 0 for a unix socket)."""
    try:
        if credentials is not None:
            port = int(server.add_secure_port(address, credentials))
        else:
            port = int(server.add_insecure_port(address))
    except RuntimeError as exc:
        check_listen(address, key)  # gRPC's message drops the reason; find it
        raise ConfigError(f"{key}: cannot listen on {address}: {exc}") from exc
    if port == 0 and not address.startswith("unix:"):
        check_listen(address, key)
        raise ConfigError(f"{key}: cannot listen on {address}")
    return port


def check_listen(address: str, key: str) -> None:
    """Raise ConfigError with the reason (address in use, permission denied, no such address)
    when a TCP listener on `address` cannot be bound. Run at start before models load, so that
    a taken port fails the start at once instead of after every model has been warmed; gRPC's
    own bind error says only "Failed to bind". Port 0 and unix sockets are not checked."""
    if address.startswith("unix:"):
        return
    host, port = parse_address(address, key)
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ConfigError(f"{key}: cannot listen on {address}: {exc.strerror}") from exc
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            # As gRPC does: a port left in TIME_WAIT by a previous run is free to bind.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                raise ConfigError(
                    f"{key}: cannot listen on {address}: {exc.strerror or exc}"
                ) from exc
