"""Builds the gRPC server: the inference service, grpc.health.v1 and server reflection."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from edge_agent._proto import examples_pb2
from edge_agent._proto import grpc_service_pb2 as pb
from edge_agent.api.examples import SERVICE as EXAMPLES
from edge_agent.api.examples import ExampleServicer
from edge_agent.api.security import CONTROL_METHODS, control_elsewhere
from edge_agent.api.servicer import InferenceServicer
from edge_agent.errors import ConfigError
from edge_agent.rpc.connections import (
    ConnectionGuard,
    ConnectionLimits,
    NotingServer,
    server_options,
)
from edge_agent.rpc.listen import check_listen
from edge_agent.rpc.wire import add_foreign_service, add_service, method_handlers
from edge_agent.settings import Settings

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
REFLECTION = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
# What reflection lists: every service a listener serves.
NAMES = (SERVICE.full_name, EXAMPLES.full_name, HEALTH.full_name, REFLECTION.full_name)


def connection_limits(settings: Settings) -> ConnectionLimits:
    return ConnectionLimits(
        max_connections=settings.max_connections,
        max_connections_per_peer=settings.max_connections_per_peer,
        idle_seconds=settings.connection_idle_seconds,
        first_request_seconds=settings.first_request_seconds,
        max_concurrent_rpcs=settings.max_concurrent_rpcs,
    )


def add_inference_service(
    server: grpc.aio.Server | NotingServer,
    servicer: InferenceServicer,
    deny_control: bool = False,
) -> None:
    """What the generated add_..._to_server does, with lenient deserializers. `deny_control`:
    the control RPCs answer PERMISSION_DENIED here (decided once, at registration: nothing is
    added to the path of an inference call)."""
    handlers = method_handlers(SERVICE, pb, servicer)
    if deny_control:
        for name in handlers:
            if f"/{SERVICE.full_name}/{name}" in CONTROL_METHODS:
                handlers[name] = control_elsewhere()
    add_service(server, SERVICE, handlers)


def build_server(
    servicer: InferenceServicer,
    health_servicer: health.aio.HealthServicer,
    max_message_bytes: int,
    limits: ConnectionLimits,
    guard: ConnectionGuard,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    deny_control: bool = False,
    examples: ExampleServicer | None = None,
) -> grpc.aio.Server:
    server = grpc.aio.server(
        interceptors=list(interceptors),
        maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
        options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            *server_options(limits),
        ],
    )
    noting = NotingServer(server, guard)  # every handler tells the guard a call came
    add_inference_service(noting, servicer, deny_control)
    if examples is not None:
        add_service(noting, EXAMPLES, method_handlers(EXAMPLES, examples_pb2, examples))
    add_foreign_service(noting, HEALTH, health_pb2, health_servicer)
    reflecting = reflection.aio.ReflectionServicer(NAMES)
    add_foreign_service(noting, REFLECTION, reflection_pb2, reflecting)
    return server


def bind(
    server: grpc.aio.Server,
    address: str,
    credentials: grpc.ServerCredentials | None = None,
    key: str = "grpc_address",
) -> int:
    """Bind the listener (TLS with `credentials`); returns the port (the real one when asked
    for port 0; 0 for a unix socket). A socket file left by an earlier run is replaced; any
    other file at that path is refused."""
    if address.startswith("unix:"):
        path = Path(address[5:])
        if path.is_socket():
            path.unlink()
        elif path.exists() or path.is_symlink():
            raise ConfigError(f"{key}: {path} exists and is not a socket")
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
