"""The fleet service (protos/edge_agent/_proto/fleet.proto) over a Registry and a BlobStore.

Every registry call runs on the registry's own thread (`_db`), never on the event loop: a slow
query or a big write delays that caller only. Every caller is bounded: a token bucket per device
and one for the publisher (RESOURCE_EXHAUSTED beyond it), one live long-poll per device (a newer
one replaces the older, which answers ABORTED), reports only about the models in the device's
desired state (the rest are ignored and counted), blob uploads capped in size and time, a device
reads only releases a rollout sent it, FleetStatus in pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import grpc

from edge_agent._proto import fleet_pb2 as pb
from edge_agent.controlplane.blobs import BlobStore
from edge_agent.controlplane.learning import ParameterServer
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
    Aborted,
    ConfigError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ReleaseRejected,
    ResourceExhausted,
    Unauthenticated,
)
from edge_agent.fleet import auth, signing
from edge_agent.fleet.release import CHUNK_SIZE, MAX_VERSION, Release, check_fresh, parse_release
from edge_agent.observability.logging import get_logger
from edge_agent.rpc.status import to_status
from edge_agent.rpc.wire import Malformed

log = get_logger(__name__)

MAX_WAIT_MS = 60_000
SEEN_FLUSH_S = 5.0
TOKEN_CACHE_S = 30.0  # how long a replica trusts a device's token hash without reading it
MAX_TOKEN_CACHE = 200_000  # how stale the stored last_seen may be (FleetStatus adds this replica's)
SCOPES = {pb.FLEET: FLEET, pb.GROUP: GROUP, pb.CANARY: CANARY}
SCOPE_ENUM = {v: k for k, v in SCOPES.items()}
ACTIONS = {
    pb.ControlRolloutRequest.PAUSE: "pause",
    pb.ControlRolloutRequest.RESUME: "resume",
    pb.ControlRolloutRequest.ROLLBACK: "rollback",
}
REPORT_STATES = frozenset({"downloading", "installed", "serving", "retrying", "failed"})
MAX_REPORTS = 256  # per poll
# The largest request each method reads, checked before it is parsed (rpc/wire.py); beyond it
# the call answers INVALID_ARGUMENT. A poll carries at most MAX_REPORTS short reports.
MAX_REQUEST_BYTES = {
    "WatchDesiredState": 512 << 10,
    "MissingBlobs": 1 << 20,
    "UploadBlob": CHUNK_SIZE + (4 << 10),
    "RegisterRelease": 2 << 20,
    "SetTarget": 4 << 10,
    "ControlRollout": 4 << 10,
    "FleetStatus": 4 << 10,
    "GetManifest": 4 << 10,
    "GetBlob": 4 << 10,
    "StartLearning": 16 << 10,
    "StopLearning": 4 << 10,
    "LearningStatus": 4 << 10,
    "UploadUpdate": CHUNK_SIZE + (4 << 10),
    "EnrollDevices": 2 << 20,
    "RevokeDevice": 4 << 10,
}
MAX_UPDATE_BYTES = 256 << 20
MAX_ENROLL = 10_000
GROUP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_device_id(device_id: str) -> None:
    if not device_id or len(device_id) > 128 or not device_id.isprintable():
        raise InvalidArgument(f"device id {device_id!r}: use 1-128 printable characters")


MAX_ERROR_CHARS = 1000
DEFAULT_PAGE, MAX_PAGE = 500, 1000
IGNORED_LOG_INTERVAL_S = 60.0  # per device: one log line for ignored reports, then counts only
R = TypeVar("R")


@dataclasses.dataclass(frozen=True)
class ServiceLimits:
    """What one caller may cost the control plane."""

    device_rate: float = 20.0  # calls per second per device (a download is one call per blob)
    device_burst: int = 200
    publisher_rate: float = 100.0  # scripts polling FleetStatus included
    publisher_burst: int = 1000
    max_blob_bytes: int = 8 << 30
    upload_seconds: float = 3600.0  # one whole blob upload
    upload_idle_seconds: float = 60.0  # between two messages of an upload


@dataclasses.dataclass
class ServiceStats:
    """Read by the metrics collector (controlplane/server.py)."""

    reports_ignored: int = 0
    rate_limited: dict[str, int] = dataclasses.field(default_factory=dict)  # role -> count
    polls_replaced: int = 0
    polls_waiting: int = 0
    fetch_refused: int = 0


class TokenBucket:
    """`rate` calls a second on average, `burst` at once."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self._rate, self._burst = rate, float(burst)
        self._tokens, self._at = float(burst), now

    def take(self, now: float) -> bool:
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


def accept_reports(
    reports: Sequence[pb.ModelReport], desired: Mapping[str, int]
) -> tuple[list[Report], int]:
    """The reports worth keeping: one per model of the device's desired state, in a known state,
    with the error and variant cut to size; and how many others were ignored. Only the first
    MAX_REPORTS are looked at (a device with more models than that does not exist)."""
    kept: dict[str, Report] = {}
    ignored = max(0, len(reports) - MAX_REPORTS)
    for r in reports[:MAX_REPORTS]:
        if r.model not in desired or r.model in kept or r.state not in REPORT_STATES:
            ignored += 1
            continue
        if max(r.installed_version, r.serving_version, r.target_version) > MAX_VERSION:
            ignored += 1
            continue
        kept[r.model] = Report(
            r.model,
            r.installed_version,
            r.serving_version,
            r.target_version,
            r.state,
            r.error[:MAX_ERROR_CHARS],
            r.variant[:40],
        )
    return list(kept.values()), ignored


def check_version(version: int) -> int:
    if not 1 <= version <= MAX_VERSION:
        raise InvalidArgument(f"version {version} is not in 1..2^63-1")
    return version


def _unary(
    method: Callable[[FleetServicer, Any, grpc.aio.ServicerContext], Awaitable[R]],
) -> Callable[[FleetServicer, Any, grpc.aio.ServicerContext], Awaitable[R]]:
    @functools.wraps(method)
    async def wrapper(self: FleetServicer, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            if isinstance(request, Malformed):
                raise InvalidArgument(request.reason)
            return await method(self, request, context)
        except Exception as exc:
            code, message = to_status(exc, rpc=method.__name__)
            await context.abort(code, message)
            raise  # unreachable: abort raises

    return wrapper


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


class Poll:
    """A device's live long-poll: woken when its desired state may have changed, or when a
    newer poll of the same device replaces it."""

    __slots__ = ("changed", "replaced")

    def __init__(self) -> None:
        self.changed = asyncio.Event()
        self.replaced = False


class FleetServicer:
    """Registered with fleet_pb2_grpc.add_FleetServiceServicer_to_server (by method name)."""

    def __init__(
        self,
        registry: Registry,
        blobs: BlobStore,
        publisher_token: str,
        max_failure_share: float,
        limits: ServiceLimits | None = None,
        trusted_keys: Iterable[Path] = (),
        learning_key: Path | None = None,
    ) -> None:
        self._registry = registry
        self._blobs = blobs
        self._publisher_token = publisher_token
        self._max_failure_share = max_failure_share
        self._limits = limits or ServiceLimits()
        self._trusted_keys = list(trusted_keys)
        # Every registry call goes through _db, on the registry's threads: one for SQLite (one
        # connection), several for PostgreSQL (a pool connection each; queries wait on the
        # network, not the GIL).
        self._executor = ThreadPoolExecutor(
            max_workers=registry.threads, thread_name_prefix="registry"
        )
        self._buckets: dict[str, TokenBucket] = {}
        self._polls: dict[str, Poll] = {}  # device -> its live long-poll
        # Devices seen since the last flush (touch): one write per interval, not one per poll.
        self._seen: dict[str, float] = {}
        self._tokens: dict[str, tuple[str, float]] = {}  # device -> (token hash, until)
        # Tells this replica's own notices from others' (PostgreSQL LISTEN/NOTIFY).
        self.replica = uuid.uuid4().hex[:12]
        self._ignored_logged: dict[str, float] = {}
        self.stats = ServiceStats()
        self._background: set[asyncio.Task[None]] = set()
        self.learning = ParameterServer(registry, blobs, self._db, self._notify, learning_key)

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    async def db(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        """Run a registry call on the registry thread (the dashboard reads through this)."""
        return await self._db(fn, *args, **kwargs)

    async def _db(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def _notify(self, devices: Iterable[str] | None = None) -> None:
        """Desired state changed for `devices` (None: possibly for any): wake their long-polls
        here (O(devices affected)), and tell the other replicas through the database."""
        devices = None if devices is None else sorted(set(devices))
        self._wake(devices)
        listed = json.dumps(devices) if devices is not None else ""
        # NOTIFY payloads are limited to 8000 bytes: a longer list becomes "everyone".
        payload = f"{self.replica} {listed if devices is not None and len(listed) < 7000 else '*'}"
        task = asyncio.get_running_loop().create_task(self._db(self._registry.notify, payload))
        self._background.add(task)
        task.add_done_callback(self._notified)

    def _notified(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The other replicas' polls then see the change at their next wake or timeout.
            log.warning("registry.notify_failed", error=str(task.exception()))

    def _wake(self, devices: Iterable[str] | None) -> None:
        if devices is None:
            self._tokens.clear()
        else:
            devices = list(devices)
            for device in devices:  # enrolled again, rotated, revoked: read the token anew
                self._tokens.pop(device, None)
        polls = self._polls.values() if devices is None else map(self._polls.get, devices)
        for poll in polls:
            if poll is not None:
                poll.changed.set()

    def remote_change(self, payload: str) -> None:
        """A notice from the database (another replica's change); on the event loop."""
        replica, _, listed = payload.partition(" ")
        if replica == self.replica:
            return  # ours: woken already
        try:
            devices = None if listed in ("*", "") else [str(d) for d in json.loads(listed)]
        except (ValueError, TypeError):
            devices = None
        self._wake(devices)

    def _limit(self, key: str, role: str) -> None:
        """Raise ResourceExhausted when `key` (an authenticated caller) is over its rate."""
        now = time.monotonic()
        bucket = self._buckets.get(key)
        if bucket is None:
            rate, burst = (
                (self._limits.publisher_rate, self._limits.publisher_burst)
                if role == "publisher"
                else (self._limits.device_rate, self._limits.device_burst)
            )
            bucket = self._buckets[key] = TokenBucket(rate, burst, now)
        if not bucket.take(now):
            self.stats.rate_limited[role] = self.stats.rate_limited.get(role, 0) + 1
            raise ResourceExhausted(f"too many calls from this {role}; slow down and retry")

    # -- credentials ----------------------------------------------------------------------------

    async def _device_of(self, token: str, device_id: str) -> str | None:
        if not token or not device_id or len(device_id) > 128:
            return None
        # A device's token hash, kept TOKEN_CACHE_S (every call needs it; a database round trip
        # each is most of a poll's cost). Revocation and rotation drop it at once here, and on
        # the other replicas through their change notices.
        now = time.monotonic()
        given = auth.token_hash(token)
        cached = self._tokens.get(device_id)
        if cached is not None and cached[1] > now and auth.same(given, cached[0]):
            return device_id
        # Not cached, expired, or another token (perhaps one given since): the database says.
        stored = await self._db(self._registry.token_hash, device_id)
        if stored is None:
            self._tokens.pop(device_id, None)
            return None
        if len(self._tokens) >= MAX_TOKEN_CACHE:
            self._tokens.clear()
        self._tokens[device_id] = (stored, now + TOKEN_CACHE_S)
        return device_id if auth.same(given, stored) else None

    async def _publisher(self, context: grpc.aio.ServicerContext) -> None:
        token, _ = auth.bearer(context.invocation_metadata())
        if token and auth.same(token, self._publisher_token):
            self._limit("publisher", "publisher")
            return
        # A device token, with or without its x-device-id: the caller is known, the role wrong.
        holder = None
        if token:
            holder = await self._db(self._registry.device_with_token, auth.token_hash(token))
        if holder is not None:
            raise PermissionDenied("this call needs the publisher token, not a device token")
        raise Unauthenticated("missing or unknown publisher token")

    async def _device(self, context: grpc.aio.ServicerContext) -> str:
        token, device_id = auth.bearer(context.invocation_metadata())
        device = await self._device_of(token, device_id)
        if device is not None:
            self._limit(f"device:{device}", "device")
            return device
        if token and auth.same(token, self._publisher_token):
            raise PermissionDenied("this call needs a device token (with x-device-id)")
        raise Unauthenticated("missing or unknown device credentials")

    # -- publishing -----------------------------------------------------------------------------

    @_unary
    async def MissingBlobs(
        self, request: pb.MissingBlobsRequest, context: grpc.aio.ServicerContext
    ) -> pb.MissingBlobsResponse:
        await self._publisher(context)

        def missing() -> list[str]:
            return [
                d
                for d in request.digests
                if self._registry.blob(d) is None or not self._blobs.exists(d)
            ]

        return pb.MissingBlobsResponse(missing=await self._db(missing))

    @_unary
    async def UploadBlob(
        self,
        request_iterator: AsyncIterator[pb.UploadBlobRequest],
        context: grpc.aio.ServicerContext,
    ) -> pb.UploadBlobResponse:
        await self._publisher(context)
        writer = None
        digest, size = "", 0
        try:
            async for message in self._uploaded(request_iterator):
                if writer is None:
                    digest, size = message.digest, message.size
                    if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
                        raise InvalidArgument(f"blob digest {digest!r} is not a sha256 hex")
                    if size > self._limits.max_blob_bytes:
                        raise InvalidArgument(
                            f"blob of {size} bytes is over this control plane's limit "
                            f"{self._limits.max_blob_bytes} (--max-blob-bytes)"
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
        await self._db(self._registry.add_blob, BlobInfo(digest, size, CHUNK_SIZE, tuple(chunks)))
        log.info("blob.stored", digest=digest, size=size)
        return pb.UploadBlobResponse(digest=digest, size=size)

    async def _uploaded(self, request_iterator: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """The messages of a client stream (UploadBlob, UploadUpdate), each parsed and within
        the bounds: a stalled upload holds a temporary file or memory, so every message must
        come within upload_idle_seconds and the whole within upload_seconds."""
        limits = self._limits
        deadline = time.monotonic() + limits.upload_seconds
        while True:
            # (Not asyncio.timeout around the loop: its scope would span the yields.)
            wait = min(limits.upload_idle_seconds, deadline - time.monotonic())
            try:
                message = await asyncio.wait_for(anext(request_iterator), max(wait, 0))
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise InvalidArgument(
                    f"upload too slow: a message every {limits.upload_idle_seconds:g} s and the "
                    f"whole within {limits.upload_seconds:g} s"
                ) from None
            if isinstance(message, Malformed):
                raise InvalidArgument(message.reason)
            yield message

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

    @_unary
    async def RegisterRelease(
        self, request: pb.RegisterReleaseRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterReleaseResponse:
        await self._publisher(context)
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
        try:
            await asyncio.to_thread(self._check_signatures, release, request)
        except ReleaseRejected as exc:
            raise InvalidArgument(f"refused: {exc}") from exc

        def check_blobs() -> None:
            for entry in release.all_files():
                info = self._registry.blob(entry.sha256)
                if info is None or not self._blobs.exists(entry.sha256):
                    raise InvalidArgument(f"blob {entry.sha256} ({entry.path}) was not uploaded")
                if info.size != entry.size:
                    raise InvalidArgument(f"{entry.path}: size {entry.size} != stored {info.size}")

        await self._db(check_blobs)
        await self._db(
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
        rollout = await self._db(
            self._registry.set_target,
            request.model,
            check_version(request.version),
            scope,
            request.group,
            request.canary_percent,
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
        self._notify(rollout.devices)
        return rollout_message(rollout)

    @_unary
    async def SetTarget(
        self, request: pb.SetTargetRequest, context: grpc.aio.ServicerContext
    ) -> pb.RolloutStatus:
        await self._publisher(context)
        return await self._set_target(request)

    @_unary
    async def ControlRollout(
        self, request: pb.ControlRolloutRequest, context: grpc.aio.ServicerContext
    ) -> pb.RolloutStatus:
        await self._publisher(context)
        action = ACTIONS.get(request.action)
        if action is None:
            raise InvalidArgument("action must be PAUSE, RESUME or ROLLBACK")
        rollout = await self._db(self._registry.control, request.model, action)
        log.info(
            "rollout.changed", model=rollout.model, version=rollout.version, state=rollout.state
        )
        # A rollback or pause moves its devices (back) to the rollout before it.
        self._notify(rollout.devices)
        return rollout_message(rollout)

    @_unary
    async def FleetStatus(
        self, request: pb.FleetStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.FleetStatusResponse:
        await self._publisher(context)
        if request.rollout_id:
            rollouts = await self._db(self._registry.rollouts)
            found = [r for r in rollouts if r.id == request.rollout_id]
            if not found:
                raise NotFound(f"no rollout {request.rollout_id}")
            return pb.FleetStatusResponse(rollouts=[rollout_message(found[0])])
        size = min(request.page_size or DEFAULT_PAGE, MAX_PAGE)
        if len(request.page_token) > 128:
            raise InvalidArgument("page_token is not one this control plane gave")

        def page() -> pb.FleetStatusResponse:
            response = pb.FleetStatusResponse()
            devices = self._registry.devices(request.page_token, size + 1)
            for device in devices[:size]:
                response.devices.append(
                    pb.DeviceStatus(
                        device_id=device.device_id,
                        group=device.group,
                        last_seen=max(device.last_seen, self._seen.get(device.device_id, 0.0)),
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
            if not request.page_token:
                response.rollouts.extend(
                    rollout_message(r, with_devices=False) for r in self._registry.rollouts()
                )
            return response

        return await self._db(page)

    # -- devices --------------------------------------------------------------------------------

    def _count_ignored(self, device: str, ignored: int) -> None:
        self.stats.reports_ignored += ignored
        now = time.monotonic()
        if (
            now - self._ignored_logged.get(device, -IGNORED_LOG_INTERVAL_S)
            >= IGNORED_LOG_INTERVAL_S
        ):
            self._ignored_logged[device] = now
            log.warning(
                "device.reports_ignored",
                device=device,
                ignored=ignored,
                why="not about a model of its desired state, repeated, or an unknown state",
            )

    @_unary
    async def WatchDesiredState(
        self, request: pb.WatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.DesiredState:
        device = await self._device(context)
        desired = await self._db(self._registry.desired, device)
        reports, ignored = accept_reports(request.reports, desired)
        if ignored:
            self._count_ignored(device, ignored)
        news = await self._db(self._registry.record, device, reports, time.time())
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
        paused = (
            await self._db(self._registry.auto_pause, self._max_failure_share) if failed else []
        )
        if paused:
            log.warning("rollout.auto_paused", rollouts=[r.id for r in paused])
            self._notify(d for r in paused for d in r.devices)
        # One live long-poll per device: this one replaces an older one (which answers ABORTED).
        older = self._polls.get(device)
        if older is not None:
            older.replaced = True
            older.changed.set()
            self.stats.polls_replaced += 1
        poll = self._polls[device] = Poll()
        self.stats.polls_waiting += 1
        try:
            # The desired state just read serves the first look, unless the reports changed it.
            first = desired if not news and not paused else None
            return await self._wait(device, request, poll, first)
        finally:
            self.stats.polls_waiting -= 1
            if self._polls.get(device) is poll:
                del self._polls[device]

    def _desired_state(self, device: str, desired: dict[str, int] | None = None) -> pb.DesiredState:
        """Versions to run and learning tasks to take part in (on the registry thread)."""
        if desired is None:
            desired = self._registry.desired(device)
        learning = self.learning.assignments(device)
        rounds = [(a.task_id, a.round, a.global_weights.digest) for a in learning]
        return pb.DesiredState(
            revision=revision(desired, rounds),
            models=[pb.ModelTarget(model=m, version=v) for m, v in sorted(desired.items())],
            learning=learning,
        )

    async def _wait(
        self,
        device: str,
        request: pb.WatchRequest,
        poll: Poll,
        first: dict[str, int] | None = None,
    ) -> pb.DesiredState:
        deadline = time.monotonic() + min(request.wait_ms, MAX_WAIT_MS) / 1000
        while True:
            poll.changed.clear()  # before reading: a change made while we read wakes us again
            state = await self._db(self._desired_state, device, first)
            first = None
            remaining = deadline - time.monotonic()
            if state.revision != request.known_revision or remaining <= 0:
                self._seen[device] = time.time()
                return state
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(poll.changed.wait(), remaining)
            if poll.replaced:
                raise Aborted("replaced by a newer long-poll of this device")

    @_unary
    async def GetManifest(
        self, request: pb.GetManifestRequest, context: grpc.aio.ServicerContext
    ) -> pb.Manifest:
        device = await self._device(context)
        version = check_version(request.version)

        def manifest() -> pb.Manifest:
            # NOT_FOUND either way: a device learns nothing of releases not sent to it.
            found = self._registry.release(request.model, version)
            if found is None or not self._registry.may_fetch_release(
                device, request.model, version
            ):
                self.stats.fetch_refused += found is not None
                raise NotFound(f"no release {request.model} v{version} for this device")
            answer = pb.Manifest(
                release_json=found.release_json,
                signature=found.signature,
                variant_signatures=found.variant_signatures,
            )
            for digest in found.digests:
                info = self._registry.blob(digest)
                if info is None:
                    raise NotFound(f"blob {digest} of {request.model} v{version} is missing")
                answer.blobs.append(
                    pb.BlobRef(
                        digest=digest,
                        size=info.size,
                        chunk_size=info.chunk_size,
                        chunk_digests=list(info.chunk_digests),
                    )
                )
            return answer

        return await self._db(manifest)

    async def GetBlob(self, request: pb.GetBlobRequest, context: grpc.aio.ServicerContext) -> None:
        try:
            if isinstance(request, Malformed):
                raise InvalidArgument(request.reason)
            device = await self._device(context)

            def open_blob() -> Any:
                info = self._registry.blob(request.digest)
                if info is None or not self._blobs.exists(request.digest):
                    raise NotFound(f"no blob {request.digest} for this device")
                if not self._registry.may_fetch_blob(device, request.digest):
                    self.stats.fetch_refused += 1
                    raise NotFound(f"no blob {request.digest} for this device")
                if request.offset > info.size:
                    raise InvalidArgument(f"offset {request.offset} is beyond the blob's end")
                return self._blobs.open(request.digest)

            f = await self._db(open_blob)
        except Exception as exc:
            code, message = to_status(exc, rpc="GetBlob")
            await context.abort(code, message)
            raise
        sent = 0
        with f:
            try:
                await asyncio.to_thread(f.seek, request.offset)
                # Written, not yielded: a peer gone mid-blob ends here, not in grpc's own log.
                while data := await asyncio.to_thread(f.read, CHUNK_SIZE):
                    await context.write(pb.BlobChunk(data=data))
                    sent += len(data)
            except (asyncio.CancelledError, Exception) as exc:
                if not isinstance(exc, asyncio.CancelledError) and (
                    type(exc).__name__ != "ExecuteBatchError"
                ):
                    raise
                # A device that died or lost its link mid-download (it resumes from its verified
                # chunks): ordinary on a fleet, not an error.
                log.info(
                    "blob.transfer_cut",
                    device_id=device,
                    digest=request.digest,
                    offset=request.offset,
                    bytes_sent=sent,
                )
                if isinstance(exc, asyncio.CancelledError):
                    raise

    # -- enrollment -----------------------------------------------------------------------------

    @_unary
    async def EnrollDevices(
        self, request: pb.EnrollDevicesRequest, context: grpc.aio.ServicerContext
    ) -> pb.EnrollDevicesResponse:
        await self._publisher(context)
        if not 0 < len(request.devices) <= MAX_ENROLL:
            raise InvalidArgument(f"enroll 1..{MAX_ENROLL} devices per call")
        ids = [d.device_id for d in request.devices]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise InvalidArgument(f"device ids given twice: {duplicates[:5]}")
        for d in request.devices:
            check_device_id(d.device_id)
            if d.group and not GROUP_NAME.match(d.group):
                raise InvalidArgument(f"group {d.group!r}: use letters, digits, '.', '_', '-'")
        tokens = {d.device_id: auth.new_token() for d in request.devices}
        rows = [
            (d.device_id, d.group, auth.token_hash(tokens[d.device_id])) for d in request.devices
        ]
        await self._db(self._registry.enroll, rows, request.rotate)
        log.info("devices.enrolled", count=len(rows), rotated=request.rotate)  # never the tokens
        self._notify(tokens)
        return pb.EnrollDevicesResponse(
            tokens=[pb.DeviceToken(device_id=i, token=t) for i, t in tokens.items()]
        )

    @_unary
    async def RevokeDevice(
        self, request: pb.RevokeDeviceRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevokeDeviceResponse:
        await self._publisher(context)
        await self._db(self._registry.revoke, request.device_id)
        log.info("device.revoked", device=request.device_id)
        older = self._polls.pop(request.device_id, None)
        if older is not None:  # its long-poll ends now
            older.replaced = True
            older.changed.set()
        self._notify([request.device_id])  # and on the other replicas: its desired state is {}
        return pb.RevokeDeviceResponse()

    # -- learning -------------------------------------------------------------------------------

    @_unary
    async def StartLearning(
        self, request: pb.StartLearningRequest, context: grpc.aio.ServicerContext
    ) -> pb.LearningTask:
        await self._publisher(context)
        task_id, notice = await self.learning.start(request.spec)
        task = (await self.learning.status(task_id))[0]
        task.notice = notice
        return task

    @_unary
    async def StopLearning(
        self, request: pb.StopLearningRequest, context: grpc.aio.ServicerContext
    ) -> pb.LearningTask:
        await self._publisher(context)
        await self.learning.stop(request.task_id)
        return (await self.learning.status(request.task_id))[0]

    @_unary
    async def LearningStatus(
        self, request: pb.LearningStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.LearningStatusResponse:
        await self._publisher(context)
        return pb.LearningStatusResponse(tasks=await self.learning.status(request.task_id))

    @_unary
    async def UploadUpdate(
        self,
        request_iterator: AsyncIterator[pb.UpdateChunk],
        context: grpc.aio.ServicerContext,
    ) -> pb.UpdateAck:
        device = await self._device(context)
        header: pb.UpdateChunk | None = None
        parts: list[bytes] = []
        received = 0
        async for message in self._uploaded(request_iterator):
            if header is None:
                header = message
                if not 0 < header.size <= MAX_UPDATE_BYTES:
                    raise InvalidArgument(
                        f"update of {header.size} bytes: must be 1..{MAX_UPDATE_BYTES}"
                    )
            received += len(message.data)
            if received > header.size:
                raise InvalidArgument(f"more than the declared {header.size} bytes")
            parts.append(message.data)
        if header is None:
            raise InvalidArgument("empty update")
        payload = b"".join(parts)
        if len(payload) != header.size or hashlib.sha256(payload).hexdigest() != header.sha256:
            raise InvalidArgument("the update's bytes do not match its declared size and sha256")
        return await self.learning.receive(device, header, payload)

    # -- housekeeping ---------------------------------------------------------------------------

    async def flush_seen(self) -> None:
        """Write when devices were last seen (batched: one transaction per interval)."""
        seen, self._seen = self._seen, {}
        try:
            await self._db(self._registry.touch, seen)
        except Exception:
            for device, at in seen.items():  # kept for the next round
                self._seen[device] = max(at, self._seen.get(device, 0.0))
            raise

    async def flush_seen_forever(self, interval: float = SEEN_FLUSH_S) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.flush_seen()
            except Exception as exc:  # the database is away: the next round tries again
                log.warning("registry.touch_failed", error=str(exc))

    async def prune_forever(self, interval: float = 3600.0) -> None:
        """Every `interval`, bound the report history (registry.prune); forget rate buckets and
        log throttles of callers not seen for a while."""
        while True:
            try:
                removed = await self._db(self._registry.prune, time.time())
                if removed:
                    log.info("registry.pruned", rows=removed)
            except Exception:  # logged; the next round tries again
                log.exception("registry.prune_failed")
            self._buckets.clear()  # a full bucket is what a new one is: nothing is lost
            self._ignored_logged.clear()
            await asyncio.sleep(interval)


def read_or_create_publisher_token(data_dir: Path, path: Path | None = None) -> str:
    """DATA_DIR/publisher.token, created on first start; or `path`, which must exist (replicas
    share one token: a missing file is a mistake, not a reason to make a second token)."""
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"--publisher-token-file {path}: not a file")
        return auth.read_token(path)
    path = data_dir / "publisher.token"
    if not path.exists():
        auth.write_secret(path, auth.new_token())
        log.info("controlplane.publisher_token_created", path=str(path))
    return auth.read_token(path)
