"""`edge-agent control-plane serve`: the composition root of the control plane.

DATA_DIR/registry.sqlite (SQLite, WAL), DATA_DIR/blobs/ (content-addressed), and
DATA_DIR/publisher.token (created on first start, mode 0600). SIGTERM/SIGINT stop it: listeners
close, in-flight calls get the grace, long-polls answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from pathlib import Path

import grpc

from edge_agent._proto import fleet_pb2_grpc as pb_grpc
from edge_agent.controlplane.blobs import FileBlobStore
from edge_agent.controlplane.registry import SqliteRegistry
from edge_agent.controlplane.service import FleetServicer, read_or_create_publisher_token
from edge_agent.errors import ConfigError
from edge_agent.fleet import auth
from edge_agent.fleet.release import CHUNK_SIZE
from edge_agent.observability.logging import get_logger

log = get_logger(__name__)
REGISTRY_FILE = "registry.sqlite"


@dataclasses.dataclass(frozen=True)
class ControlPlaneSettings:
    data_dir: Path
    address: str = "0.0.0.0:8010"
    # A rollout pauses itself once more than this share of its devices report a failed install.
    max_failure_share: float = 0.2
    shutdown_grace_seconds: float = 5.0
    # TLS (both or neither); a client CA makes it mTLS: devices and publishers need a cert.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None


def open_registry(data_dir: Path) -> SqliteRegistry:
    data_dir.mkdir(parents=True, exist_ok=True)
    return SqliteRegistry(data_dir / REGISTRY_FILE)


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


class ControlPlane:
    def __init__(self, settings: ControlPlaneSettings) -> None:
        self.settings = settings
        self._stop = asyncio.Event()

    async def run(self) -> None:
        data_dir = self.settings.data_dir
        if not 0 <= self.settings.max_failure_share <= 1:
            raise ConfigError("max_failure_share must lie in [0, 1] (1: never pause)")
        registry = open_registry(data_dir)
        token = read_or_create_publisher_token(data_dir)
        servicer = FleetServicer(
            registry, FileBlobStore(data_dir / "blobs"), token, self.settings.max_failure_share
        )
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", 4 * CHUNK_SIZE),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ]
        )
        pb_grpc.add_FleetServiceServicer_to_server(servicer, server)
        try:
            credentials = self._credentials()
            if credentials is not None:
                port = server.add_secure_port(self.settings.address, credentials)
            else:
                port = server.add_insecure_port(self.settings.address)
        except (RuntimeError, OSError) as exc:
            raise ConfigError(f"cannot bind {self.settings.address}: {exc}") from exc
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal)
        await server.start()
        host = self.settings.address.rpartition(":")[0]
        log.info(
            "controlplane.started",
            address=f"{host}:{port}",
            port=port,
            data_dir=str(data_dir),
            pid=os.getpid(),
        )
        try:
            await self._stop.wait()
        finally:
            await server.stop(self.settings.shutdown_grace_seconds)
            registry.close()
            log.info("controlplane.stopped")

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
