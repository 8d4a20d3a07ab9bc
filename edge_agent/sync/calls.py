"""The device's calls to the control plane for the sync, each with its deadline: the long-poll for
the desired state, a release's manifest, a blob's bytes. One or several replicas
("HOST:PORT,HOST:PORT") behind one FailoverStub: calls go to one, the next takes over when it
stops answering."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from edge_agent._proto import fleet_pb2 as pb
from edge_agent.fleet.connect import FailoverStub

MANIFEST_TIMEOUT_S = 60
BLOB_TIMEOUT_S = 600
WATCH_MARGIN_S = 30  # beyond the long-poll's wait: the answer's way back


class ControlPlaneCalls:
    def __init__(self, stub: FailoverStub, metadata: Sequence[tuple[str, str]]) -> None:
        self.stub = stub
        self.metadata = metadata  # the device's token and id

    @property
    def address(self) -> str:
        return self.stub.address

    def fail_over(self) -> str | None:
        """Move to the next replica; its address, or None when there is only one."""
        return self.stub.fail_over()

    def close(self) -> None:
        """Cancels the call in flight (the long-poll)."""
        self.stub.close()

    def watch(
        self,
        revision: str,
        wait_s: float,
        reports: list[pb.ModelReport],
        health: pb.DeviceHealth | None = None,
    ) -> pb.DesiredState:
        """The desired state once it differs from `revision`, or after `wait_s` seconds."""
        request = pb.WatchRequest(
            known_revision=revision, wait_ms=int(wait_s * 1000), reports=reports, health=health
        )
        response: pb.DesiredState = self.stub.WatchDesiredState(
            request, metadata=self.metadata, timeout=wait_s + WATCH_MARGIN_S
        )
        return response

    def manifest(self, model: str, version: int) -> pb.Manifest:
        response: pb.Manifest = self.stub.GetManifest(
            pb.GetManifestRequest(model=model, version=version),
            metadata=self.metadata,
            timeout=MANIFEST_TIMEOUT_S,
        )
        return response

    def blob(self, digest: str, offset: int) -> _Pieces:
        """The blob's bytes from `offset` on."""
        call = self.stub.GetBlob(
            pb.GetBlobRequest(digest=digest, offset=offset),
            metadata=self.metadata,
            timeout=BLOB_TIMEOUT_S,
        )
        return _Pieces(call)


class _Pieces:
    """A GetBlob call as an iterator of bytes that can be cancelled (common/device_blobs.py cuts a
    server off at the declared size)."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._call:
            yield chunk.data

    def cancel(self) -> None:
        self._call.cancel()
