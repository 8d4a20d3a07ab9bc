"""Builds the gRPC server: the inference service, grpc.health.v1 and server reflection."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from edge_agent._proto import grpc_service_pb2 as pb
from edge_agent._proto import grpc_service_pb2_grpc as pb_grpc
from edge_agent.api.servicer import InferenceServicer
from edge_agent.errors import ConfigError


def build_server(
    servicer: InferenceServicer, health_servicer: health.aio.HealthServicer, max_message_bytes: int
) -> grpc.aio.Server:
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # gRPC sets SO_REUSEPORT by default: a second agent would silently share the port.
            ("grpc.so_reuseport", 0),
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    return server


def bind(server: grpc.aio.Server, address: str) -> int:
    """Bind the listener; returns the port (the real one when asked for port 0)."""
    try:
        port = int(server.add_insecure_port(address))
    except RuntimeError as exc:
        raise ConfigError(f"grpc_address: cannot listen on {address}: {exc}") from exc
    if port == 0:
        raise ConfigError(f"grpc_address: cannot listen on {address}")
    return port
