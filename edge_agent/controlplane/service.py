"""The fleet service (protos/edge_agent/_proto/fleet.proto) over a Registry and a BlobStore."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc

from edge_agent._proto import fleet_pb2 as pb
from edge_agent.api.status import to_status
from edge_agent.controlplane.blobs import BlobStore
from edge_agent.controlplane.registry import (
    CANARY,
    FAILED,
    FLEET,
    GROUP,
    BlobInfo,
    Registry,
    Report,
    Rollout,
    revision,
)
from edge_agent.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ReleaseRejected,
    Unauthenticated,
)
from edge_agent.fleet import auth
from edge_agent.fleet.release import CHUNK_SIZE, parse_release
from edge_agent.observability.logging import get_logger

log = get_logger(__name__)

MAX_WAIT_MS = 60_000
SCOPES = {pb.FLEET: FLEET, pb.GROUP: GROUP, pb.CANARY: CANARY}
SCOPE_ENUM = {v: k for k, v in SCOPES.items()}
ACTIONS = {
    pb.ControlRolloutRequest.PAUSE: "pause",
    pb.ControlRolloutRequest.RESUME: "resume",
    pb.ControlRolloutRequest.ROLLBACK: "rollback",
}
R = TypeVar("R")


def _unary(
    method: Callable[[FleetServicer, Any, grpc.aio.ServicerContext], Awaitable[R]],
) -> Callable[[FleetServicer, Any, grpc.aio.ServicerContext], Awaitable[R]]:
    @functools.wraps(method)
    async def wrapper(self: FleetServicer, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            return await method(self, request, context)
        except Exception as exc:
            code, message = to_status(exc, rpc=method.__name__)
            await context.abort(code, message)
            raise  # unreachable: abort raises

    return wrapper


def rollout_message(rollout: Rollout) -> pb.RolloutStatus:
    return pb.RolloutStatus(
        id=rollout.id,
        model=rollout.model,
        version=rollout.version,
        scope=SCOPE_ENUM[rollout.scope],
        group=rollout.group,
        canary_percent=rollout.canary_percent,
        state=rollout.state,
        reason=rollout.reason,
        devices=list(rollout.devices),
        failed=rollout.failed,
        device_count=len(rollout.devices),
        device_states=dict(rollout.device_states),
    )


def report_message(report: Report) -> pb.ModelReport:
    return pb.ModelReport(
        model=report.model,
        installed_version=report.installed_version,
        serving_version=report.serving_version,
        target_version=report.target_version,
        state=report.state,
        error=report.error,
        variant=report.variant,
    )


class FleetServicer:
    """Registered with fleet_pb2_grpc.add_FleetServiceServicer_to_server (by method name)."""

    def __init__(
        self,
        registry: Registry,
        blobs: BlobStore,
        publisher_token: str,
        max_failure_share: float,
    ) -> None:
        self._registry = registry
        self._blobs = blobs
        self._publisher_token = publisher_token
        self._max_failure_share = max_failure_share
        self._changed = asyncio.Event()  # replaced after each change; long-polls wait on it

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- credentials ----------------------------------------------------------------------------

    def _device_of(self, token: str, device_id: str) -> str | None:
        stored = self._registry.token_hash(device_id) if device_id else None
        if stored is not None and auth.same(auth.token_hash(token), stored):
            return device_id
        return None

    def _publisher(self, context: grpc.aio.ServicerContext) -> None:
        token, _ = auth.bearer(context.invocation_metadata())
        if token and auth.same(token, self._publisher_token):
            return
        # A device token, with or without its x-device-id: the caller is known, the role wrong.
        if token and self._registry.device_with_token(auth.token_hash(token)) is not None:
            raise PermissionDenied("this call needs the publisher token, not a device token")
        raise Unauthenticated("missing or unknown publisher token")

    def _device(self, context: grpc.aio.ServicerContext) -> str:
        token, device_id = auth.bearer(context.invocation_metadata())
        device = self._device_of(token, device_id)
        if device is not None:
            return device
        if token and auth.same(token, self._publisher_token):
            raise PermissionDenied("this call needs a device token (with x-device-id)")
        raise Unauthenticated("missing or unknown device credentials")

    # -- publishing -----------------------------------------------------------------------------

    @_unary
    async def MissingBlobs(
        self, request: pb.MissingBlobsRequest, context: grpc.aio.ServicerContext
    ) -> pb.MissingBlobsResponse:
        self._publisher(context)
        missing = [
            d
            for d in request.digests
            if self._registry.blob(d) is None or not self._blobs.exists(d)
        ]
        return pb.MissingBlobsResponse(missing=missing)

    @_unary
    async def UploadBlob(
        self,
        request_iterator: AsyncIterator[pb.UploadBlobRequest],
        context: grpc.aio.ServicerContext,
    ) -> pb.UploadBlobResponse:
        self._publisher(context)
        writer = None
        digest, size = "", 0
        try:
            async for message in request_iterator:
                if writer is None:
                    digest, size = message.digest, message.size
                    if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
                        raise InvalidArgument(f"blob digest {digest!r} is not a sha256 hex")
                    writer = self._blobs.writer(digest, size)
                writer.write(message.data)
            if writer is None:
                raise InvalidArgument("empty upload")
            chunks = writer.commit()
            writer = None
        finally:
            if writer is not None:
                writer.abort()
        self._registry.add_blob(BlobInfo(digest, size, CHUNK_SIZE, tuple(chunks)))
        log.info("blob.stored", digest=digest, size=size)
        return pb.UploadBlobResponse(digest=digest, size=size)

    @_unary
    async def RegisterRelease(
        self, request: pb.RegisterReleaseRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterReleaseResponse:
        self._publisher(context)
        try:
            release = parse_release(request.release_json)
        except ReleaseRejected as exc:
            raise InvalidArgument(f"release.json: {exc}") from exc
        if not request.signature:
            raise InvalidArgument("a release needs its signature")
        signed = set(request.variant_signatures)
        if signed != set(release.variants):
            raise InvalidArgument(
                f"variants {sorted(release.variants)} need one signature each; got {sorted(signed)}"
            )
        for entry in release.all_files():
            info = self._registry.blob(entry.sha256)
            if info is None or not self._blobs.exists(entry.sha256):
                raise InvalidArgument(f"blob {entry.sha256} ({entry.path}) was not uploaded")
            if info.size != entry.size:
                raise InvalidArgument(f"{entry.path}: size {entry.size} != stored {info.size}")
        self._registry.add_release(
            release.model,
            release.version,
            request.release_json,
            request.signature,
            {f.sha256 for f in release.all_files()},
            dict(request.variant_signatures),
        )
        log.info(
            "release.registered",
            model=release.model,
            version=release.version,
            variants=release.variant_names(),
        )
        response = pb.RegisterReleaseResponse(model=release.model, version=release.version)
        if request.activate:
            target = pb.SetTargetRequest()
            target.CopyFrom(request.target)
            target.model, target.version = release.model, release.version
            response.rollout.CopyFrom(self._set_target(target))
        return response

    def _set_target(self, request: pb.SetTargetRequest) -> pb.RolloutStatus:
        scope = SCOPES.get(request.scope, FLEET)
        rollout = self._registry.set_target(
            request.model, request.version, scope, request.group, request.canary_percent
        )
        log.info(  # counts only: a fleet of thousands would make one unreadable line
            "rollout.started",
            rollout=rollout.id,
            model=rollout.model,
            version=rollout.version,
            scope=scope,
            devices=len(rollout.devices),
            device_states=dict(rollout.device_states),
        )
        self._notify()
        return rollout_message(rollout)

    @_unary
    async def SetTarget(
        self, request: pb.SetTargetRequest, context: grpc.aio.ServicerContext
    ) -> pb.RolloutStatus:
        self._publisher(context)
        return self._set_target(request)

    @_unary
    async def ControlRollout(
        self, request: pb.ControlRolloutRequest, context: grpc.aio.ServicerContext
    ) -> pb.RolloutStatus:
        self._publisher(context)
        action = ACTIONS.get(request.action)
        if action is None:
            raise InvalidArgument("action must be PAUSE, RESUME or ROLLBACK")
        rollout = self._registry.control(request.model, action)
        log.info(
            "rollout.changed", model=rollout.model, version=rollout.version, state=rollout.state
        )
        self._notify()
        return rollout_message(rollout)

    @_unary
    async def FleetStatus(
        self, request: pb.FleetStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.FleetStatusResponse:
        self._publisher(context)
        response = pb.FleetStatusResponse()
        for device in self._registry.devices():
            response.devices.append(
                pb.DeviceStatus(
                    device_id=device.device_id,
                    group=device.group,
                    last_seen=device.last_seen,
                    last_error=device.last_error,
                    models=[report_message(r) for r in device.reports],
                    desired=[
                        pb.ModelTarget(model=m, version=v)
                        for m, v in sorted(self._registry.desired(device.device_id).items())
                    ],
                )
            )
        response.rollouts.extend(rollout_message(r) for r in self._registry.rollouts())
        return response

    # -- devices --------------------------------------------------------------------------------

    @_unary
    async def WatchDesiredState(
        self, request: pb.WatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.DesiredState:
        device = self._device(context)
        reports = [
            Report(
                r.model,
                r.installed_version,
                r.serving_version,
                r.target_version,
                r.state[:40],
                r.error[:1000],
                r.variant[:40],
            )
            for r in request.reports
        ]
        news = self._registry.record(device, reports, time.time())
        for r in news:  # once per change: a device repeats its reports on every poll
            if r.error:
                log.warning(
                    "device.reported_failure",
                    device=device,
                    model=r.model,
                    version=r.target_version,
                    error=r.error,
                )
        failed = any(r.state == FAILED for r in news)
        if failed and self._registry.auto_pause(self._max_failure_share):
            log.warning("rollout.auto_paused")
            self._notify()
        wait = min(request.wait_ms, MAX_WAIT_MS) / 1000
        deadline = time.monotonic() + wait
        while True:
            desired = self._registry.desired(device)
            current = revision(desired)
            remaining = deadline - time.monotonic()
            if current != request.known_revision or remaining <= 0:
                break
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)
        self._registry.record(device, (), time.time())  # last seen
        return pb.DesiredState(
            revision=current,
            models=[pb.ModelTarget(model=m, version=v) for m, v in sorted(desired.items())],
        )

    @_unary
    async def GetManifest(
        self, request: pb.GetManifestRequest, context: grpc.aio.ServicerContext
    ) -> pb.Manifest:
        self._device(context)
        found = self._registry.release(request.model, request.version)
        if found is None:
            raise NotFound(f"no release {request.model} v{request.version}")
        manifest = pb.Manifest(
            release_json=found.release_json,
            signature=found.signature,
            variant_signatures=found.variant_signatures,
        )
        for digest in found.digests:
            info = self._registry.blob(digest)
            if info is None:
                raise NotFound(f"blob {digest} of {request.model} v{request.version} is missing")
            manifest.blobs.append(
                pb.BlobRef(
                    digest=digest,
                    size=info.size,
                    chunk_size=info.chunk_size,
                    chunk_digests=list(info.chunk_digests),
                )
            )
        return manifest

    async def GetBlob(
        self, request: pb.GetBlobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.BlobChunk]:
        try:
            self._device(context)
            if self._registry.blob(request.digest) is None or not self._blobs.exists(
                request.digest
            ):
                raise NotFound(f"no blob {request.digest}")
            f = self._blobs.open(request.digest)
        except Exception as exc:
            code, message = to_status(exc, rpc="GetBlob")
            await context.abort(code, message)
            raise
        with f:
            f.seek(request.offset)
            while data := await asyncio.to_thread(f.read, CHUNK_SIZE):
                yield pb.BlobChunk(data=data)


def read_or_create_publisher_token(data_dir: Path) -> str:
    path = data_dir / "publisher.token"
    if not path.exists():
        auth.write_secret(path, auth.new_token())
        log.info("controlplane.publisher_token_created", path=str(path))
    return auth.read_token(path)
