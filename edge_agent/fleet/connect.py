"""How our clients reach a gRPC listener: the agent's sync and learning threads, the publisher
commands and `edge-agent infer|models|examples` all open their channels here.

It sits below both the daemon and the command-line tools, so that the agent never imports a CLI
module to talk to its control plane, and TLS credentials, message limits and replica failover
are written once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from edge_agent._proto import fleet_pb2 as pb
from edge_agent._proto import fleet_pb2_grpc as pb_grpc
from edge_agent.errors import ConfigError
from edge_agent.fleet.release import CHUNK_SIZE

if TYPE_CHECKING:
    from edge_agent.common.progress import Progress

CHANNEL_OPTIONS: Sequence[tuple[str, int]] = (
    # What a device or a publisher reads: a blob chunk (1 MiB), a manifest, a status page. A
    # hostile server cannot make it hold more than this per message.
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 2 * CHUNK_SIZE),
)


def channel_credentials(
    ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials | None:
    """TLS to the control plane when `ca` is given (the server is verified with it); `cert` and
    `key` are our identity for mTLS."""
    if ca is None:
        return None
    try:
        return grpc.ssl_channel_credentials(
            root_certificates=ca.read_bytes(),
            private_key=key.read_bytes() if key is not None else None,
            certificate_chain=cert.read_bytes() if cert is not None else None,
        )
    except OSError as exc:
        raise ConfigError(f"cannot read a TLS file: {exc}") from exc


def open_channel(
    address: str,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, int]] = CHANNEL_OPTIONS,
) -> grpc.Channel:
    """TLS with `credentials`, plaintext without; `options` bound the messages both ways."""
    if credentials is not None:
        return grpc.secure_channel(address, credentials, options=list(options))
    return grpc.insecure_channel(address, options=list(options))


def split_addresses(addresses: str) -> list[str]:
    """ "HOST:PORT,HOST:PORT" -> the addresses, in order (several control-plane replicas)."""
    return [a.strip() for a in addresses.split(",") if a.strip()]


class FailoverStub:
    """A FleetService stub over one of several control-plane replicas. Calls go to the current
    replica; `fail_over` moves to the next one (the caller decides when: a call that found the
    replica unreachable). Any replica serves any device, and a blob download resumes wherever it
    stopped, so moving loses nothing. Thread-safe: the sync thread and the learning thread share
    it."""

    def __init__(self, addresses: str, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.addresses = split_addresses(addresses)
        if not self.addresses:
            raise ConfigError("control_plane: no address given")
        self._credentials = credentials
        self._lock = threading.Lock()
        self._index = 0
        self._channel = open_channel(self.addresses[0], credentials)
        self._stub = pb_grpc.FleetServiceStub(self._channel)
        self._closed = False

    @property
    def address(self) -> str:
        return self.addresses[self._index]

    def __getattr__(self, method: str) -> Any:
        with self._lock:
            return getattr(self._stub, method)

    def fail_over(self) -> str | None:
        """Move to the next replica; returns its address (None with a single one)."""
        if len(self.addresses) == 1:
            return None
        with self._lock:
            if self._closed:
                return None
            old = self._channel
            self._index = (self._index + 1) % len(self.addresses)
            self._channel = open_channel(self.addresses[self._index], self._credentials)
            self._stub = pb_grpc.FleetServiceStub(self._channel)
        old.close()
        return self.address

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._channel.close()


def upload_chunks(
    digest: str, path: Path, sent: Callable[[int], None] | None = None
) -> Iterator[pb.UploadBlobRequest]:
    """UploadBlob's messages for the file at `path`: digest and size first, then 1 MiB chunks.
    `sent(nbytes)` is told each chunk's size once gRPC asks for the next message, i.e. when
    that chunk has gone to the transport (a progress display counts there, without a copy); it
    runs on gRPC's thread, so it must not raise."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        first = True
        while True:
            data = f.read(CHUNK_SIZE)
            if first or data:
                yield pb.UploadBlobRequest(digest=digest if first else "", size=size, data=data)
                if sent is not None:
                    sent(len(data))
            first = False
            if not data:
                return


def upload_missing(
    stub: pb_grpc.FleetServiceStub,
    meta: Any,
    files: Mapping[str, Path],
    shown: Progress,
    what: str,
    timeout: float,
) -> int:
    """Upload, in order, the `files` (digest -> path) the control plane lacks (MissingBlobs),
    their bytes shown as one transfer called `what`; returns the bytes uploaded."""
    shown.phase("asking the control plane which blobs it has")
    request = pb.MissingBlobsRequest(digests=sorted(files))
    missing = set(stub.MissingBlobs(request, metadata=meta, timeout=timeout).missing)
    todo = {digest: path for digest, path in files.items() if digest in missing}
    total = sum(path.stat().st_size for path in todo.values())
    if todo:
        # How many of a release's blobs go; a single file needs no count.
        count = f" ({len(todo)} of {len(files)} blobs)" if len(files) > 1 else ""
        with shown.transfer(what + count, total) as sent:
            for digest, path in todo.items():
                stub.UploadBlob(upload_chunks(digest, path, sent), metadata=meta, timeout=timeout)
    return total
