"""Whether a listen address can be bound, checked before the slow part of a start."""

from __future__ import annotations

import errno
import socket

from edge_agent.errors import ConfigError
from edge_agent.settings import parse_address


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
                hint = ""
                if exc.errno == errno.EADDRINUSE:  # e.g. a second agent on the same host
                    flag = "--" + key.replace("_", "-")
                    hint = f" (another process listens there: give this one another with {flag})"
                raise ConfigError(
                    f"{key}: cannot listen on {address}: {exc.strerror or exc}{hint}"
                ) from exc
