"""Connection hygiene for every gRPC listener we run: the agent's inference and control listeners
and the control plane's.

gRPC itself offers a cap on connections in total (`grpc.max_allowed_incoming_connections`: a
connection over it is closed at once), an idle timeout (`grpc.max_connection_idle_ms`: GOAWAY,
then close), keepalive enforcement (a client that pings more often than allowed gets GOAWAY) and
`maximum_concurrent_rpcs`; `server_options` sets them. It offers no cap per peer address and no
deadline for a new connection's first request, so one client can hold every slot of the total
cap with idle connections. `ConnectionGuard` adds both (Linux): once a second it lists this
process's established TCP connections on each watched port (/proc/self/fd and
/proc/self/net/tcp{,6}), and shuts down (shutdown(2); gRPC then closes the connection itself)
the connections of a peer address beyond its cap, those that never made a call first, and every
connection that has made no call within `first_request_seconds`. Handlers tell the guard about
calls with `saw(peer)`, which costs a known connection's call one dict lookup.

The caps are sized to the process's file descriptor limit (`fit_to_fd_limit`), so that
connections can never exhaust it: a process out of descriptors cannot accept, open a model file
or write its registry, whatever the caps say.
"""

from __future__ import annotations

import dataclasses
import inspect
import ipaddress
import os
import resource
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import grpc

from edge_agent.observability.logging import get_logger

log = get_logger(__name__)

# Descriptors kept out of the connection budget: model and weight files, the registry, blobs,
# log and notify sockets, the loader's and ONNX Runtime's own.
FD_RESERVE = 256
SCAN_INTERVAL_S = 1.0
# A peer that made a call is remembered this long after its connection is gone: long enough for
# a scan to list a connection whose first call came before it (a busy machine delays scans).
FORGET_AFTER_S = 60.0
_ESTABLISHED = "01"


@dataclasses.dataclass(frozen=True)
class ConnectionLimits:
    """What one listener allows. 0 for a count means "no cap of our own" (gRPC's defaults).
    No defaults here: the agent's come from its Settings, the control plane's from
    controlplane/defaults.py."""

    max_connections: int  # in total, before fit_to_fd_limit lowers it
    max_connections_per_peer: int  # per remote IP address (a NAT puts many behind one)
    idle_seconds: float  # no call outstanding for this long: GOAWAY, then close
    first_request_seconds: float  # a new connection must make a call within this
    max_concurrent_rpcs: int


def fit_to_fd_limit(limits: ConnectionLimits, listeners: int) -> ConnectionLimits:
    """Lower the total cap so that `listeners` listeners at their cap, plus FD_RESERVE, stay
    under the soft RLIMIT_NOFILE (raised to the hard limit first, as far as allowed)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    budget = max(16, (soft - FD_RESERVE) // max(1, listeners))
    if limits.max_connections <= budget:
        return limits
    log.warning(
        "connections.limit_lowered",
        configured=limits.max_connections,
        effective=budget,
        fd_limit=soft,
        listeners=listeners,
        hint="raise LimitNOFILE (systemd) or ulimit -n for more connections",
    )
    return dataclasses.replace(limits, max_connections=budget)


def server_options(limits: ConnectionLimits) -> list[tuple[str, Any]]:
    """gRPC server arguments for the limits gRPC enforces itself."""
    options: list[tuple[str, Any]] = [
        # gRPC sets SO_REUSEPORT by default: a second server would silently share the port.
        ("grpc.so_reuseport", 0),
        ("grpc.max_connection_idle_ms", int(limits.idle_seconds * 1000)),
        # A TLS or HTTP/2 handshake that does not finish in time is dropped.
        ("grpc.server_handshake_timeout_ms", int(limits.first_request_seconds * 1000)),
        # Keepalive: the server pings a silent client every 2 minutes and drops it when the
        # answer does not come in 20 s (a device that vanished without closing); a client that
        # pings more often than every 5 minutes without calls gets GOAWAY after two strikes.
        ("grpc.keepalive_time_ms", 120_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", 300_000),
        ("grpc.http2.max_ping_strikes", 2),
    ]
    if limits.max_connections > 0:
        options.append(("grpc.max_allowed_incoming_connections", limits.max_connections))
    return options


def parse_peer(peer: str) -> tuple[str, int] | None:
    """gRPC's peer string ("ipv4:10.0.0.7:5123", "ipv6:[::1]:5123", "ipv6:%5B::1%5D:5123") ->
    (address, port); None for a unix socket or anything else."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    rest = rest.replace("%5B", "[").replace("%5D", "]")
    host, _, port = rest.rpartition(":")
    try:
        return _normal(host.strip("[]")), int(port)
    except ValueError:
        return None


def _normal(host: str) -> str:
    address = ipaddress.ip_address(host)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


@dataclasses.dataclass
class _Watch:
    per_peer: int
    first_request_s: float


@dataclasses.dataclass
class _Connection:
    fd: int
    port: int  # ours
    peer: tuple[str, int]
    first_seen: float
    called: bool = False


@dataclasses.dataclass
class GuardStats:
    """Read by the metrics collectors."""

    open: dict[int, int] = dataclasses.field(default_factory=dict)  # port -> connections
    closed: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> count


class ConnectionGuard:
    """Per-peer caps and first-request deadlines for the watched TCP ports (module doc)."""

    def __init__(self, interval: float = SCAN_INTERVAL_S) -> None:
        self._interval = interval
        self._watches: dict[int, _Watch] = {}
        self._known: dict[tuple[int, str, int], _Connection] = {}  # (port, ip, port) -> conn
        # Peers (ip, port) that made a call, and the peer strings already noted (a noted peer
        # costs a call one dict lookup), each with when: kept while the connection lives, and
        # for a while after it is gone (a call may come before a scan first lists it).
        self._called: dict[tuple[str, int], float] = {}
        self._noted: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = GuardStats()
        self.enabled = os.path.isdir("/proc/self/fd") and os.path.exists("/proc/self/net/tcp")

    def watch(self, port: int, limits: ConnectionLimits) -> None:
        if port > 0:
            self._watches[port] = _Watch(
                limits.max_connections_per_peer, limits.first_request_seconds
            )

    def saw(self, peer: str) -> None:
        """A call arrived from `peer` (context.peer()). Every call counts, those made before a
        scan first lists the connection too: a connection that opened its calls in its first
        second and then kept them running was shut as one that never made a call."""
        if peer in self._noted:
            return
        now = time.monotonic()
        self._noted[peer] = now
        parsed = parse_peer(peer)
        if parsed is not None:
            self._called[parsed] = now

    def start(self) -> None:
        if not self.enabled:
            log.warning("connections.guard_unavailable", reason="needs Linux /proc")
            return
        if self._watches and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="connection-guard", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.scan()
            except Exception:  # a scan must never end the guard
                log.exception("connections.scan_failed")

    def scan(self, now: float | None = None) -> int:
        """One pass: learn new connections, enforce the caps; returns how many were shut."""
        now = time.monotonic() if now is None else now
        current: dict[tuple[int, str, int], _Connection] = {}
        for fd, port, peer in _established(set(self._watches)):
            key = (port, *peer)
            known = self._known.get(key)
            if known is None or known.fd != fd:
                known = _Connection(fd, port, peer, now)
            current[key] = known
        self._known = current
        for connection in current.values():
            if not connection.called and connection.peer in self._called:
                connection.called = True
        live_peers = {c.peer for c in current.values()}
        # Forget peers gone for a while (snapshots: saw() adds from the event loop meanwhile).
        cutoff = time.monotonic() - FORGET_AFTER_S
        for peer, noted in list(self._called.items()):
            if noted < cutoff and peer not in live_peers:
                self._called.pop(peer, None)
        for text, noted in list(self._noted.items()):
            if noted < cutoff and parse_peer(text) not in live_peers:
                self._noted.pop(text, None)
        victims: dict[tuple[int, str, int], str] = {}
        by_peer: dict[tuple[int, str], list[_Connection]] = {}
        for key, connection in current.items():
            watch = self._watches[connection.port]
            if not connection.called and now - connection.first_seen > watch.first_request_s:
                victims[key] = "no_request"
            by_peer.setdefault((connection.port, connection.peer[0]), []).append(connection)
        for (port, _), connections in by_peer.items():
            cap = self._watches[port].per_peer
            alive = [c for c in connections if (c.port, *c.peer) not in victims]
            if cap <= 0 or len(alive) <= cap:
                continue
            # Keep those that made calls, oldest first; shut the rest beyond the cap.
            alive.sort(key=lambda c: (not c.called, c.first_seen))
            for c in alive[cap:]:
                victims[(c.port, *c.peer)] = "peer_cap"
        shut: dict[str, int] = {}
        for key, reason in victims.items():
            connection = current[key]
            if _shut(connection.fd, connection.peer):
                shut[reason] = shut.get(reason, 0) + 1
                del self._known[key]
        self.stats.open = {port: 0 for port in self._watches}
        for key in self._known:
            self.stats.open[key[0]] += 1
        for reason, count in shut.items():
            self.stats.closed[reason] = self.stats.closed.get(reason, 0) + count
        if shut:  # one line per scan, not one per connection: an attack must not flood the log
            log.warning("connections.closed", **shut)
        return sum(shut.values())


class NotingServer:
    """Stands in for a grpc.aio.Server when services are added: every method handler is
    wrapped to tell the guard that its connection made a call (what the generated
    add_..._to_server functions and our own registration call are the two methods below)."""

    def __init__(self, server: grpc.aio.Server, guard: ConnectionGuard) -> None:
        self._server = server
        self._guard = guard

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_NotingGeneric(h, self._guard) for h in handlers)
        )

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self._server.add_registered_method_handlers(
            service, {name: noting(h, self._guard) for name, h in handlers.items()}
        )


# grpc ships no type information here (mypy sees Any).
class _NotingGeneric(grpc.GenericRpcHandler):  # type: ignore[misc]
    def __init__(self, inner: grpc.GenericRpcHandler, guard: ConnectionGuard) -> None:
        self._inner = inner
        self._guard = guard
        self._wrapped: dict[str, grpc.RpcMethodHandler | None] = {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method
        if method not in self._wrapped:  # bounded: only methods the service knows are kept
            handler = self._inner.service(details)
            if handler is None:
                return None
            self._wrapped[method] = noting(handler, self._guard)
        return self._wrapped[method]


def noting(handler: grpc.RpcMethodHandler, guard: ConnectionGuard) -> grpc.RpcMethodHandler:
    """`handler` with its behaviour wrapped: guard.saw(context.peer()) first."""
    for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        behaviour = getattr(handler, kind)
        if behaviour is None:
            continue
        if inspect.isasyncgenfunction(behaviour):

            async def stream(request: Any, context: Any, _b: Any = behaviour) -> Any:
                guard.saw(context.peer())
                async for item in _b(request, context):
                    yield item

            wrapped: Any = stream
        elif inspect.iscoroutinefunction(behaviour):

            async def call(request: Any, context: Any, _b: Any = behaviour) -> Any:
                guard.saw(context.peer())
                return await _b(request, context)

            wrapped = call
        else:  # a plain function: gRPC runs it on a thread, and so it stays

            def plain(request: Any, context: Any, _b: Any = behaviour) -> Any:
                guard.saw(context.peer())
                return _b(request, context)

            wrapped = plain
        return handler._replace(**{kind: wrapped})
    return handler


def _socket_inodes() -> dict[int, int]:
    """inode -> fd of every socket this process holds."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found[int(target[8:-1])] = int(name)
    return found


def _decode(text: str) -> tuple[str, int]:
    """/proc/net/tcp{,6} "0100007F:1F91" (little-endian 32-bit words) -> (address, port)."""
    address, port = text.split(":")
    raw = bytes.fromhex(address)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    host = str(ipaddress.ip_address(words))
    return _normal(host), int(port, 16)


def _established(ports: set[int]) -> Iterator[tuple[int, int, tuple[str, int]]]:
    """(fd, our port, (peer address, peer port)) of this process's established connections to
    one of `ports`."""
    inodes = _socket_inodes()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _ESTABLISHED:
                continue
            fd = inodes.get(int(fields[9]))
            if fd is None:
                continue
            local = _decode(fields[1])
            if local[1] in ports:
                yield fd, local[1], _decode(fields[2])


def _shut(fd: int, peer: tuple[str, int]) -> bool:
    """shutdown(2) our socket `fd`, after checking it is still the connection to `peer` (the
    number may have been reused since the scan). gRPC sees the end and closes it itself."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return False
    try:
        name = sock.getpeername()
        if (_normal(name[0]), name[1]) != peer:
            return False
        sock.shutdown(socket.SHUT_RDWR)
        return True
    except (OSError, ValueError):
        return False
    finally:
        sock.detach()  # the descriptor stays gRPC's
