"""The publisher's fleet RPCs: upload blobs, register a signed release, point devices at a
version (a rollout), steer a rollout, read the fleet's status.

Only the publisher token may call these. A release is checked before it is stored (fresh, one
signature per variant, with --trusted-key each verified and covering exactly its files, every
blob uploaded with its size); a blob upload is bounded in size and time; FleetStatus answers in
pages, so a fleet of any size costs one bounded read per call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import grpc

from edge_agent._proto import fleet_pb2 as pb
from edge_agent.controlplane.canary import Analysis, analysis_of
from edge_agent.controlplane.fleethealth import verdict_message
from edge_agent.controlplane.registry import CANARY, FLEET, GROUP, BlobInfo, Report, Rollout
from edge_agent.controlplane.shared import FleetCore, check_version
from edge_agent.errors import InvalidArgument, NotFound, ReleaseRejected
from edge_agent.fleet import signing
from edge_agent.fleet.release import CHUNK_SIZE, Release, check_fresh, parse_release
from edge_agent.observability.logging import get_logger
from edge_agent.rpc.status import answers

log = get_logger(__name__)

SCOPES = {pb.FLEET: FLEET, pb.GROUP: GROUP, pb.CANARY: CANARY}
SCOPE_ENUM = {v: k for k, v in SCOPES.items()}
ACTIONS = {
    pb.ControlRolloutRequest.PAUSE: "pause",
    pb.ControlRolloutRequest.RESUME: "resume",
    pb.ControlRolloutRequest.ROLLBACK: "rollback",
}
DEFAULT_PAGE, MAX_PAGE = 500, 1000
MAX_PAGE_TOKEN_CHARS = 128  # a page token is a device id


def rollout_message(rollout: Rollout, with_devices: bool = True) -> pb.RolloutStatus:
    return pb.RolloutStatus(
        id=rollout.id,
        model=rollout.model,
        version=rollout.version,
        scope=SCOPE_ENUM[rollout.scope],
        group=rollout.group,
        canary_percent=rollout.canary_percent,
        state=rollout.state,
        reason=rollout.reason,
        devices=list(rollout.devices) if with_devices else [],
        failed=rollout.failed,
        device_count=len(rollout.devices),
        device_states=dict(rollout.device_states),
        analysis=Analysis.from_json(dict(rollout.analysis)).message() if rollout.analysis else None,
        verdict=verdict_message(rollout.verdict) if rollout.verdict else None,
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


def check_digest(digest: str) -> None:
    if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
        raise InvalidArgument(f"blob digest {digest!r} is not a sha256 hex")


def check_release_request(request: pb.RegisterReleaseRequest) -> Release:
    """The release a registration carries, refused unless fresh and signed once per variant."""
    try:
        release = parse_release(request.release_json)
        check_fresh(release)
    except ReleaseRejected as exc:
        raise InvalidArgument(f"release.json: {exc}") from exc
    if not request.signature:
        raise InvalidArgument("a release needs its signature")
    signed = set(request.variant_signatures)
    if signed != set(release.variants):
        raise InvalidArgument(
            f"variants {sorted(release.variants)} need one signature each; got {sorted(signed)}"
        )
    return release


class Publishing:
    RPCS = (
        "MissingBlobs", "UploadBlob", "RegisterRelease", "SetTarget", "ControlRollout",
        "FleetStatus",
    )  # fmt: skip

    def __init__(self, core: FleetCore, trusted_keys: Iterable[Path] = ()) -> None:
        self._core = core
        self._registry = core.registry
        self._blobs = core.blobs
        self._trusted_keys = list(trusted_keys)

    @answers
    async def MissingBlobs(
        self, request: pb.MissingBlobsRequest, context: grpc.aio.ServicerContext
    ) -> pb.MissingBlobsResponse:
        await self._core.callers.publisher(context)

        def missing() -> list[str]:
            return [d for d in request.digests if not self._stored(d)]

        return pb.MissingBlobsResponse(missing=await self._core.db(missing))

    def _stored(self, digest: str) -> BlobInfo | None:
        """The blob's registry row, if the blob store holds it too (on the registry thread)."""
        info = self._registry.blob(digest)
        return info if info is not None and self._blobs.exists(digest) else None

    @answers
    async def UploadBlob(
        self,
        request_iterator: AsyncIterator[pb.UploadBlobRequest],
        context: grpc.aio.ServicerContext,
    ) -> pb.UploadBlobResponse:
        await self._core.callers.publisher(context)
        max_bytes = self._core.limits.max_blob_bytes
        writer = None
        digest, size = "", 0
        try:
            async for message in self._core.uploaded(request_iterator):
                if writer is None:
                    digest, size = message.digest, message.size
                    check_digest(digest)
                    if size > max_bytes:
                        raise InvalidArgument(
                            f"blob of {size} bytes is over this control plane's limit "
                            f"{max_bytes} (--max-blob-bytes)"
                        )
                    writer = await asyncio.to_thread(self._blobs.writer, digest, size)
                await asyncio.to_thread(writer.write, message.data)
            if writer is None:
                raise InvalidArgument("empty upload")
            chunks = await asyncio.to_thread(writer.commit)
            writer = None
        finally:
            if writer is not None:
                await asyncio.to_thread(writer.abort)
        info = BlobInfo(digest, size, CHUNK_SIZE, tuple(chunks))
        await self._core.db(self._registry.add_blob, info)
        log.info("blob.stored", digest=digest, size=size)
        return pb.UploadBlobResponse(digest=digest, size=size)

    def _check_signatures(self, release: Release, request: pb.RegisterReleaseRequest) -> None:
        """With --trusted-key: every variant's signature verifies against a publisher key and
        covers exactly release.json and that variant's files."""
        if not self._trusted_keys:
            return
        for name in release.variant_names():
            signature = (
                request.signature if name == release.variant else request.variant_signatures[name]
            )
            signed = signing.signed_files(signature, self._trusted_keys)
            files = {f.path: f.sha256 for f in release.select(name).files}
            signing.check_signed(signed, request.release_json, files)

    def _check_blobs(self, release: Release) -> None:
        """Every file of the release was uploaded, with its size (on the registry thread)."""
        for entry in release.all_files():
            info = self._stored(entry.sha256)
            if info is None:
                raise InvalidArgument(f"blob {entry.sha256} ({entry.path}) was not uploaded")
            if info.size != entry.size:
                raise InvalidArgument(f"{entry.path}: size {entry.size} != stored {info.size}")

    @answers
    async def RegisterRelease(
        self, request: pb.RegisterReleaseRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterReleaseResponse:
        await self._core.callers.publisher(context)
        release = check_release_request(request)
        try:
            await asyncio.to_thread(self._check_signatures, release, request)
        except ReleaseRejected as exc:
            raise InvalidArgument(f"refused: {exc}") from exc
        await self._core.db(self._check_blobs, release)
        await self._core.db(
            self._registry.add_release,
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
            signature_checked=bool(self._trusted_keys),
        )
        response = pb.RegisterReleaseResponse(model=release.model, version=release.version)
        if request.activate:
            target = pb.SetTargetRequest()
            target.CopyFrom(request.target)
            target.model, target.version = release.model, release.version
            response.rollout.CopyFrom(await self._set_target(target))
        return response

    async def _set_target(self, request: pb.SetTargetRequest) -> pb.RolloutStatus:
        scope = SCOPES.get(request.scope, FLEET)
        # Every canary is judged on its serving health unless the publisher turns it off.
        analysis = (
            analysis_of(request.analysis, request.canary_percent).to_json()
            if scope == CANARY
            else None
        )
        rollout = await self._core.db(
            self._registry.set_target,
            request.model,
            check_version(request.version),
            scope,
            request.group,
            request.canary_percent,
            analysis,
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
        return self._moved(rollout)

    def _moved(self, rollout: Rollout) -> pb.RolloutStatus:
        """Wake the rollout's devices (their desired state changed); its status for the answer."""
        self._core.notify(rollout.devices)
        return rollout_message(rollout)

    @answers
    async def SetTarget(
        self, request: pb.SetTargetRequest, context: grpc.aio.ServicerContext
    ) -> pb.RolloutStatus:
        await self._core.callers.publisher(context)
        return await self._set_target(request)

    @answers
    async def ControlRollout(
        self, request: pb.ControlRolloutRequest, context: grpc.aio.ServicerContext
    ) -> pb.RolloutStatus:
        await self._core.callers.publisher(context)
        action = ACTIONS.get(request.action)
        if action is None:
            raise InvalidArgument("action must be PAUSE, RESUME or ROLLBACK")
        rollout = await self._core.db(self._registry.control, request.model, action)
        log.info(
            "rollout.changed", model=rollout.model, version=rollout.version, state=rollout.state
        )
        # A rollback or pause moves its devices (back) to the rollout before it.
        return self._moved(rollout)

    @answers
    async def FleetStatus(
        self, request: pb.FleetStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.FleetStatusResponse:
        await self._core.callers.publisher(context)
        if request.rollout_id:
            rollouts = await self._core.db(self._registry.rollouts)
            found = [r for r in rollouts if r.id == request.rollout_id]
            if not found:
                raise NotFound(f"no rollout {request.rollout_id}")
            return pb.FleetStatusResponse(rollouts=[rollout_message(found[0])])
        size = min(request.page_size or DEFAULT_PAGE, MAX_PAGE)
        if len(request.page_token) > MAX_PAGE_TOKEN_CHARS:
            raise InvalidArgument("page_token is not one this control plane gave")
        return await self._core.db(self._status_page, request.page_token, size)

    def _status_page(self, page_token: str, size: int) -> pb.FleetStatusResponse:
        """`size` devices after `page_token`, with every rollout on the first page (on the
        registry thread)."""
        response = pb.FleetStatusResponse()
        devices = self._registry.devices(page_token, size + 1)
        for device in devices[:size]:
            response.devices.append(
                pb.DeviceStatus(
                    device_id=device.device_id,
                    group=device.group,
                    # The stored last_seen lags by the flush interval: this replica adds its own.
                    last_seen=max(device.last_seen, self._core.seen.get(device.device_id, 0.0)),
                    last_error=device.last_error,
                    models=[report_message(r) for r in device.reports],
                    desired=[
                        pb.ModelTarget(model=m, version=v)
                        for m, v in sorted(self._registry.desired(device.device_id).items())
                    ],
                )
            )
        if len(devices) > size:
            response.next_page_token = devices[size - 1].device_id
        if not page_token:
            response.rollouts.extend(
                rollout_message(r, with_devices=False) for r in self._registry.rollouts()
            )
        return response
