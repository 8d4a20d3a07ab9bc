"""`edge-agent control-plane serve`: the composition root of the control plane.

Embedded default: DATA_DIR (mode 0700)/registry.sqlite (SQLite, WAL) and DATA_DIR/blobs/
(content-addressed). At fleet scale: `--database postgresql://...` and `--blob-store
s3://BUCKET/PREFIX?endpoint=URL`, shared by any number of replicas (changes reach the others'
long-polls through LISTEN/NOTIFY). The publisher token: DATA_DIR/publisher.token (created on first
start, mode 0600), or `--publisher-token-file` (the same file for every replica). SIGTERM/SIGINT
stop it: listeners close, in-flight calls get the grace, long-polls answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from edge_agent._proto import fleet_pb2 as pb
from edge_agent.controlplane import defaults
from edge_agent.controlplane.blobs import BlobStore, FileBlobStore
from edge_agent.controlplane.database import PostgresDatabase, describe, open_database
from edge_agent.controlplane.fleethealth import FleetHealthCollector
from edge_agent.controlplane.registry import SqliteRegistry, SqlRegistry
from edge_agent.controlplane.service import (
    MAX_REQUEST_BYTES,
    FleetServicer,
    ServiceLimits,
    read_or_create_publisher_token,
)
from edge_agent.errors import ConfigError
from edge_agent.fleet import auth
from edge_agent.fleet.release import CHUNK_SIZE
from edge_agent.observability.logging import get_logger
from edge_agent.observability.metrics import ConnectionCollector
from edge_agent.rpc.connections import (
    ConnectionGuard,
    ConnectionLimits,
    NotingServer,
    fit_to_fd_limit,
    server_options,
)
from edge_agent.rpc.listen import check_listen
from edge_agent.rpc.wire import add_service, method_handlers
from edge_agent.settings import parse_address

if TYPE_CHECKING:  # the dashboard's aiohttp is imported only when a dashboard is asked for
    from aiohttp import web

log = get_logger(__name__)
REGISTRY_FILE = "registry.sqlite"
FLEET_SERVICE = pb.DESCRIPTOR.services_by_name["FleetService"]
# The largest message the control plane reads: one upload chunk (1 MiB of data) or a release
# registration, with room to spare. A device's poll is far smaller; a flood of reports is cut
# here, before it is parsed.
MAX_RECEIVE_BYTES = 2 * CHUNK_SIZE
MAX_SEND_BYTES = 64 << 20
METRIC_PREFIX = "edge_agent_controlplane"


@dataclasses.dataclass(frozen=True)
class ControlPlaneSettings:
    data_dir: Path
    address: str = defaults.ADDRESS
    max_failure_share: float = defaults.MAX_FAILURE_SHARE
    shutdown_grace_seconds: float = 5.0
    # TLS (both or neither); a client CA makes it mTLS: devices and publishers need a cert.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # Publisher public keys: RegisterRelease refuses a release no key of these signed.
    trusted_keys: tuple[Path, ...] = ()
    metrics_address: str = ""  # HOST:PORT for Prometheus /metrics; "" = none
    # Also each device's health counters on /metrics (a series per device: a fleet has
    # thousands, so off by default).
    metrics_per_device: bool = False
    # Signs learned releases (learning on the fleet); read at start, never sent anywhere.
    # Without it learning tasks are refused.
    learning_key: Path | None = None
    connections: ConnectionLimits = dataclasses.field(
        default_factory=lambda: ConnectionLimits(
            max_connections=defaults.MAX_CONNECTIONS,
            max_connections_per_peer=defaults.MAX_CONNECTIONS_PER_PEER,
            idle_seconds=defaults.IDLE_SECONDS,
            first_request_seconds=defaults.FIRST_REQUEST_SECONDS,
            max_concurrent_rpcs=defaults.MAX_CONCURRENT_RPCS,
        )
    )
    service: ServiceLimits = dataclasses.field(default_factory=ServiceLimits)
    # "" = SQLite in DATA_DIR; postgresql://USER@HOST/DB (a password belongs in PGPASSWORD or
    # ~/.pgpass, not here: the URL is logged with any password masked, but it shows in ps).
    database: str = ""
    blob_store: str = ""  # "" = DATA_DIR/blobs; s3://BUCKET/PREFIX?endpoint=URL
    publisher_token_file: Path | None = None  # "" = DATA_DIR/publisher.token
    dashboard_address: str = ""  # HOST:PORT for the read-only fleet dashboard; "" = none


def open_registry(data_dir: Path, database: str = "") -> SqlRegistry:
    """The registry: SQLite in `data_dir`, or the database `database` names. `data_dir` is made
    (or narrowed to) mode 0700: it holds the publisher token (and the SQLite registry)."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if stat.S_IMODE(data_dir.stat().st_mode) & 0o077:
        os.chmod(data_dir, 0o700)
    if not database:
        return SqliteRegistry(data_dir / REGISTRY_FILE)
    return SqlRegistry(open_database(database))


def open_blob_store(data_dir: Path, spec: str) -> BlobStore:
    if not spec:
        return FileBlobStore(data_dir / "blobs")
    from edge_agent.controlplane.s3 import S3BlobStore

    return S3BlobStore(spec, data_dir / "spool")


def add_device(data_dir: Path, device_id: str, group: str, token_file: Path) -> None:
    """Enroll a device (or re-key it): its token goes to `token_file` (created 0600; an existing
    file is refused, it may be another credential), its hash to the registry."""
    if not device_id or len(device_id) > 128 or not device_id.isprintable():
        raise ConfigError(f"device id {device_id!r}: use 1-128 printable characters")
    if token_file.exists() or token_file.is_symlink():
        raise ConfigError(
            f"{token_file} exists: refusing to overwrite it (it may hold another credential, "
            "e.g. the publisher token); choose a new file for the device token"
        )
    if not (data_dir / REGISTRY_FILE).is_file():
        raise ConfigError(f"{data_dir} holds no control plane registry (start it there first)")
    token = auth.new_token()
    auth.write_secret(token_file, token)  # first: a file we cannot write enrolls nothing
    registry = open_registry(data_dir)
    try:
        registry.add_device(device_id, group, auth.token_hash(token))
    except BaseException:
        token_file.unlink(missing_ok=True)
        raise
    finally:
        registry.close()


class ServiceCollector:
    """edge_agent_controlplane_* from the service's stats, read at scrape."""

    def __init__(self, servicer: FleetServicer) -> None:
        self._servicer = servicer

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats, learning = self._servicer.stats, self._servicer.learning.stats
        counter, gauge = CounterMetricFamily, GaugeMetricFamily
        # (family, name, help, label names, samples as (label values, value))
        families: tuple[tuple[Any, str, str, list[str], list[tuple[list[str], float]]], ...] = (
            (counter, "reports_ignored",
             "Device reports ignored: not about a model of the device's desired state",
             [], [([], stats.reports_ignored)]),
            (counter, "rate_limited",
             "Calls refused with RESOURCE_EXHAUSTED by a caller's rate limit",
             ["role"], [([role], n) for role, n in sorted(stats.rate_limited.items())]),
            (counter, "polls_replaced",
             "Long-polls ended because the same device started a newer one",
             [], [([], stats.polls_replaced)]),
            (counter, "fetch_refused",
             "Manifest or blob reads refused: no rollout sent that release to the device",
             [], [([], stats.fetch_refused)]),
            (gauge, "polls_waiting", "Long-polls held open now", [], [([], stats.polls_waiting)]),
            (counter, "learning_aggregations", "Aggregations of buffered updates",
             [], [([], learning.aggregations)]),
            (counter, "learning_gated_out", "Candidates below the validation gate",
             [], [([], learning.gated_out)]),
            (counter, "learning_updates", "Updates received (all tasks)",
             [], [([], learning.updates)]),
            (counter, "learning_updates_refused", "Updates refused as malformed",
             [], [([], learning.refused)]),
        )  # fmt: skip
        for kind, name, text, labels, samples in families:
            family = kind(f"{METRIC_PREFIX}_{name}", text, labels=labels)
            for values, value in samples:
                family.add_metric(values, value)
            yield family


@dataclasses.dataclass
class Running:
    """What startup opened and shutdown closes."""

    registry: SqlRegistry
    servicer: FleetServicer
    server: grpc.aio.Server
    guard: ConnectionGuard
    metrics: Any  # prometheus_client's HTTP server, or None
    dashboard: web.AppRunner | None
    background: list[asyncio.Task[None]]
    listening: threading.Event | None  # stops the LISTEN thread (PostgreSQL)


class ControlPlane:
    def __init__(self, settings: ControlPlaneSettings) -> None:
        self.settings = settings
        self._stop = asyncio.Event()

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, stop (uvicorn's startup / main loop / shutdown)."""
        running = await self._startup()
        try:
            await self._stop.wait()
        finally:
            await self._shutdown(running)

    async def _startup(self) -> Running:
        s = self.settings
        self._check_settings()
        os.umask(0o077)  # everything the control plane writes is its own
        registry = open_registry(s.data_dir, s.database)
        try:
            blobs = open_blob_store(s.data_dir, s.blob_store)
            token = read_or_create_publisher_token(s.data_dir, s.publisher_token_file)
        except BaseException:
            registry.close()
            raise
        limits = fit_to_fd_limit(s.connections, listeners=1)
        guard = ConnectionGuard()
        servicer = FleetServicer(
            registry,
            blobs,
            token,
            s.max_failure_share,
            s.service,
            s.trusted_keys,
            s.learning_key,
        )
        server, port = self._grpc_server(servicer, guard, limits)
        metrics = self._metrics(servicer, guard)
        dashboard = await self._dashboard(servicer, registry, blobs, token)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal)
        await server.start()
        guard.watch(port, limits)
        guard.start()
        background = [
            asyncio.create_task(servicer.prune_forever(), name="prune"),
            asyncio.create_task(servicer.flush_seen_forever(), name="last-seen"),
            asyncio.create_task(servicer.health.run_forever(), name="fleet-health"),
        ]
        listening = self._listen(registry, servicer, loop)
        background.append(asyncio.create_task(servicer.learning.run_forever(), name="learning"))
        running = Running(
            registry, servicer, server, guard, metrics, dashboard[0], background, listening
        )
        self._log_started(running, blobs, port, limits, dashboard[1])
        return running

    def _check_settings(self) -> None:
        s = self.settings
        if not 0 <= s.max_failure_share <= 1:
            raise ConfigError("max_failure_share must lie in [0, 1] (1: never pause)")
        for key in s.trusted_keys:
            if not key.is_file():
                raise ConfigError(f"--trusted-key {key}: not a file")
        if s.learning_key is not None and not s.learning_key.is_file():
            raise ConfigError(f"--learning-key {s.learning_key}: not a file")

    def _grpc_server(
        self, servicer: FleetServicer, guard: ConnectionGuard, limits: ConnectionLimits
    ) -> tuple[grpc.aio.Server, int]:
        """The fleet service's listener, bound (not started); and its port."""
        server = grpc.aio.server(
            maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
            options=[
                ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
                ("grpc.max_send_message_length", MAX_SEND_BYTES),
                # gRPC core cancels calls that wait for the (Python) server to pick them up
                # beyond 1,000 (its default): a fleet reconnecting at once, every device opening
                # a long-poll, got CANCELLED by the hundred. Let the call cap bound them instead.
                ("grpc.server.max_pending_requests", limits.max_concurrent_rpcs),
                ("grpc.server.max_pending_requests_hard_limit", limits.max_concurrent_rpcs),
                *server_options(limits),
            ],
        )
        handlers = method_handlers(FLEET_SERVICE, pb, servicer, MAX_REQUEST_BYTES)
        add_service(NotingServer(server, guard), FLEET_SERVICE, handlers)
        address = self.settings.address
        try:
            credentials = self._credentials()
            if credentials is not None:
                return server, server.add_secure_port(address, credentials)
            return server, server.add_insecure_port(address)
        except (RuntimeError, OSError) as exc:
            raise ConfigError(f"cannot bind {address}: {exc}") from exc

    async def _dashboard(
        self, servicer: FleetServicer, registry: SqlRegistry, blobs: BlobStore, token: str
    ) -> tuple[web.AppRunner | None, int | None]:
        """The read-only dashboard, serving, and its port; (None, None) without
        --dashboard-address."""
        s = self.settings
        if not s.dashboard_address:
            return None, None
        from edge_agent.controlplane import dashboard as pages

        check_listen(s.dashboard_address, "--dashboard-address")
        tls = self._ssl() if s.tls_cert is not None else None
        board = pages.Dashboard(servicer.db, registry, blobs, token, tls=tls is not None)
        return await pages.start(board.app(), s.dashboard_address, tls)

    def _log_started(
        self,
        running: Running,
        blobs: BlobStore,
        port: int,
        limits: ConnectionLimits,
        dashboard_port: int | None,
    ) -> None:
        s = self.settings
        if not s.trusted_keys:
            log.warning(
                "controlplane.releases_unverified",
                hint="without --trusted-key, RegisterRelease stores releases it cannot check "
                "(devices still verify them)",
            )
        host = s.address.rpartition(":")[0]
        metrics = running.metrics
        log.info(
            "controlplane.started",
            address=f"{host}:{port}",
            port=port,
            data_dir=str(s.data_dir),
            database=describe(s.database) if s.database else "sqlite",
            schema_version=running.registry.schema_version,
            blob_store=blobs.describe(),
            max_connections=limits.max_connections,
            max_concurrent_rpcs=limits.max_concurrent_rpcs,
            metrics_port=metrics.server_address[1] if metrics is not None else None,
            dashboard_port=dashboard_port,
            pid=os.getpid(),
        )

    async def _shutdown(self, running: Running) -> None:
        """Background work stops, listeners close (in-flight calls get the grace), what is
        pending is written, then everything closes."""
        for task in running.background:
            task.cancel()
        if running.dashboard is not None:
            await running.dashboard.cleanup()
        await running.server.stop(self.settings.shutdown_grace_seconds)
        if running.listening is not None:
            running.listening.set()
        try:
            await running.servicer.flush_seen()
        except Exception as exc:  # the database is gone: when devices were seen is lost
            log.warning("registry.touch_failed", error=str(exc))
        running.guard.stop()
        running.servicer.close()
        running.registry.close()
        if running.metrics is not None:
            running.metrics.shutdown()
            running.metrics.server_close()
        log.info("controlplane.stopped")

    @staticmethod
    def _listen(
        registry: SqlRegistry, servicer: FleetServicer, loop: asyncio.AbstractEventLoop
    ) -> threading.Event | None:
        """With PostgreSQL: a thread LISTENing for the other replicas' changes, each handed to
        the service on the loop. Returns the event that stops it."""
        db = registry.database
        if not isinstance(db, PostgresDatabase):
            return None
        stop = threading.Event()

        def deliver(payload: str) -> None:
            loop.call_soon_threadsafe(servicer.remote_change, payload)

        threading.Thread(
            target=db.listen, args=(deliver, stop), name="registry-listen", daemon=True
        ).start()
        return stop

    def _metrics(self, servicer: FleetServicer, guard: ConnectionGuard) -> Any:
        if not self.settings.metrics_address:
            return None
        from prometheus_client import CollectorRegistry, start_http_server

        host, port = parse_address(self.settings.metrics_address, "--metrics-address")
        registry = CollectorRegistry()
        registry.register(ServiceCollector(servicer))
        registry.register(
            FleetHealthCollector(servicer.health, METRIC_PREFIX, self.settings.metrics_per_device)
        )
        registry.register(ConnectionCollector(guard.stats, METRIC_PREFIX))
        try:
            server, _ = start_http_server(port, addr=host.strip("[]"), registry=registry)
        except OSError as exc:
            raise ConfigError(f"--metrics-address {self.settings.metrics_address}: {exc}") from exc
        return server

    def _ssl(self) -> Any:
        """The gRPC listener's TLS settings for the dashboard's HTTPS (mTLS with a client CA)."""
        from edge_agent.rpc.web import ssl_context

        s = self.settings
        return ssl_context(s.tls_cert, s.tls_key, s.tls_client_ca)

    def _credentials(self) -> grpc.ServerCredentials | None:
        s = self.settings
        if (s.tls_cert is None) != (s.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key: give both or neither")
        if s.tls_cert is None or s.tls_key is None:
            if s.tls_client_ca is not None:
                raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")
            return None
        ca = s.tls_client_ca.read_bytes() if s.tls_client_ca is not None else None
        return grpc.ssl_server_credentials(
            [(s.tls_key.read_bytes(), s.tls_cert.read_bytes())],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )

    def _on_signal(self) -> None:
        if self._stop.is_set():
            os._exit(1)
        self._stop.set()
