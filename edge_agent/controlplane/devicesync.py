"""The devices' fleet RPCs: the long-poll for desired state (with the device's reports), and the
reads of a release it was sent (manifest, blobs).

A device keeps one call outstanding almost all the time: WatchDesiredState records its reports,
then holds until its desired state (versions to run, learning tasks) differs from the revision
it knows, or the wait it asked for (at most MAX_WAIT_MS) ends. One live long-poll per device: a
newer one replaces the older, which answers ABORTED. Only reports about the models of the
device's desired state count (the rest are ignored and counted), and a device reads only
releases a rollout sent it: NOT_FOUND otherwise, so it learns nothing of other releases.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping, Sequence
from typing import BinaryIO

import grpc

from edge_agent._proto import fleet_pb2 as pb
from edge_agent.controlplane.fleethealth import FleetHealth
from edge_agent.controlplane.learning import ParameterServer
from edge_agent.controlplane.registry import FAILED, Report, revision
from edge_agent.controlplane.shared import FleetCore, Poll, check_version
from edge_agent.errors import Aborted, InvalidArgument, NotFound
from edge_agent.fleet.release import CHUNK_SIZE, MAX_VERSION
from edge_agent.observability.logging import get_logger
from edge_agent.rpc.status import answers, parsed, to_status

log = get_logger(__name__)

MAX_WAIT_MS = 60_000
SEEN_FLUSH_S = 5.0  # how stale the stored last_seen may be (FleetStatus adds this replica's)
REPORT_STATES = frozenset({"downloading", "installed", "serving", "retrying", "failed"})
MAX_REPORTS = 256  # per poll
MAX_ERROR_CHARS = 1000
MAX_VARIANT_CHARS = 40
IGNORED_LOG_INTERVAL_S = 60.0  # per device: one log line for ignored reports, then counts only


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
            r.variant[:MAX_VARIANT_CHARS],
        )
    return list(kept.values()), ignored


def reported_versions(desired: Mapping[str, int], request: pb.WatchRequest) -> dict[str, set[int]]:
    """Per model of the device's desired state, the versions its health may be about: the one
    it was sent and those its reports say it serves or has installed."""
    allowed = {model: {version} for model, version in desired.items()}
    for r in request.reports[:MAX_REPORTS]:
        if r.model in allowed:
            allowed[r.model].update(v for v in (r.serving_version, r.installed_version) if v)
    return allowed


def is_transfer_cut(exc: BaseException) -> bool:
    """Whether a blob transfer ended because the device went away (cancelled, or grpc's failed
    write to a closed call): ordinary on a fleet, not an error."""
    return isinstance(exc, asyncio.CancelledError) or type(exc).__name__ == "ExecuteBatchError"


class DeviceSync:
    """The devices' RPCs, and when devices were last seen."""

    RPCS = ("WatchDesiredState", "GetManifest", "GetBlob")

    def __init__(
        self, core: FleetCore, learning: ParameterServer, max_failure_share: float
    ) -> None:
        self._core = core
        self._registry = core.registry
        self._learning = learning
        self._max_failure_share = max_failure_share
        self._ignored_logged: dict[str, float] = {}
        self.health = FleetHealth(core)

    # -- the long-poll --------------------------------------------------------------------------

    @answers
    async def WatchDesiredState(
        self, request: pb.WatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.DesiredState:
        device = await self._core.callers.device(context)
        desired = await self._core.db(self._registry.desired, device)
        changed = await self._record(device, request.reports, desired)
        if request.HasField("health"):
            await self.health.take(device, request.health, reported_versions(desired, request))
        poll = self._core.open_poll(device)
        self._core.stats.polls_waiting += 1
        try:
            # The desired state just read serves the first look, unless the reports changed it.
            return await self._wait(device, request, poll, None if changed else desired)
        finally:
            self._core.stats.polls_waiting -= 1
            self._core.close_poll(device, poll)

    async def _record(
        self, device: str, reports: Sequence[pb.ModelReport], desired: Mapping[str, int]
    ) -> bool:
        """Store the device's reports; pause the rollouts its failures push over the share.
        Returns whether that may have changed the device's desired state."""
        accepted, ignored = accept_reports(reports, desired)
        if ignored:
            self._count_ignored(device, ignored)
        news = await self._core.db(self._registry.record, device, accepted, time.time())
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
            await self._core.db(self._registry.auto_pause, self._max_failure_share)
            if failed
            else []
        )
        if paused:
            log.warning("rollout.auto_paused", rollouts=[r.id for r in paused])
            self._core.notify(d for r in paused for d in r.devices)
        return bool(news or paused)

    def _count_ignored(self, device: str, ignored: int) -> None:
        self._core.stats.reports_ignored += ignored
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

    def forget_log_throttles(self) -> None:
        self._ignored_logged.clear()

    def _desired_state(self, device: str, desired: dict[str, int] | None = None) -> pb.DesiredState:
        """Versions to run and learning tasks to take part in (on the registry thread)."""
        if desired is None:
            desired = self._registry.desired(device)
        learning = self._learning.assignments(device)
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
            state = await self._core.db(self._desired_state, device, first)
            first = None
            remaining = deadline - time.monotonic()
            if state.revision != request.known_revision or remaining <= 0:
                self._core.seen[device] = time.time()
                return state
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(poll.changed.wait(), remaining)
            if poll.replaced:
                raise Aborted("replaced by a newer long-poll of this device")

    # -- what a rollout sent ------------------------------------------------------------------

    @answers
    async def GetManifest(
        self, request: pb.GetManifestRequest, context: grpc.aio.ServicerContext
    ) -> pb.Manifest:
        device = await self._core.callers.device(context)
        version = check_version(request.version)
        return await self._core.db(self._manifest, device, request.model, version)

    def _manifest(self, device: str, model: str, version: int) -> pb.Manifest:
        """On the registry thread. NOT_FOUND either way: a device learns nothing of releases not
        sent to it."""
        found = self._registry.release(model, version)
        if found is None or not self._registry.may_fetch_release(device, model, version):
            self._core.stats.fetch_refused += found is not None
            raise NotFound(f"no release {model} v{version} for this device")
        answer = pb.Manifest(
            release_json=found.release_json,
            signature=found.signature,
            variant_signatures=found.variant_signatures,
        )
        for digest in found.digests:
            info = self._registry.blob(digest)
            if info is None:
                raise NotFound(f"blob {digest} of {model} v{version} is missing")
            answer.blobs.append(
                pb.BlobRef(
                    digest=digest,
                    size=info.size,
                    chunk_size=info.chunk_size,
                    chunk_digests=list(info.chunk_digests),
                )
            )
        return answer

    async def GetBlob(self, request: pb.GetBlobRequest, context: grpc.aio.ServicerContext) -> None:
        # Not `answers`, which would wrap the sending too: opening the blob answers with our
        # status; what fails mid-transfer (other than a cut) is left to grpc.
        try:
            parsed(request)
            device = await self._core.callers.device(context)
            f = await self._core.db(self._open_blob, device, request)
        except Exception as exc:
            await context.abort(*to_status(exc, rpc="GetBlob"))
            raise AssertionError("unreachable: abort raises") from exc
        with f:
            await self._send(f, device, request, context)

    def _open_blob(self, device: str, request: pb.GetBlobRequest) -> BinaryIO:
        """On the registry thread. NOT_FOUND for a blob no rollout sent the device."""
        info = self._registry.blob(request.digest)
        if info is None or not self._core.blobs.exists(request.digest):
            raise NotFound(f"no blob {request.digest} for this device")
        if not self._registry.may_fetch_blob(device, request.digest):
            self._core.stats.fetch_refused += 1
            raise NotFound(f"no blob {request.digest} for this device")
        if request.offset > info.size:
            raise InvalidArgument(f"offset {request.offset} is beyond the blob's end")
        return self._core.blobs.open(request.digest)

    @staticmethod
    async def _send(
        f: BinaryIO, device: str, request: pb.GetBlobRequest, context: grpc.aio.ServicerContext
    ) -> None:
        sent = 0
        try:
            await asyncio.to_thread(f.seek, request.offset)
            # Written, not yielded: a peer gone mid-blob ends here, not in grpc's own log.
            while data := await asyncio.to_thread(f.read, CHUNK_SIZE):
                await context.write(pb.BlobChunk(data=data))
                sent += len(data)
        except (asyncio.CancelledError, Exception) as exc:
            if not is_transfer_cut(exc):
                raise
            # A device that died or lost its link mid-download (it resumes from its verified
            # chunks).
            log.info(
                "blob.transfer_cut",
                device_id=device,
                digest=request.digest,
                offset=request.offset,
                bytes_sent=sent,
            )
            if isinstance(exc, asyncio.CancelledError):
                raise

    # -- last seen ------------------------------------------------------------------------------

    async def flush_seen(self) -> None:
        """Write when devices were last seen (batched: one transaction per interval)."""
        seen, self._core.seen = self._core.seen, {}
        try:
            await self._core.db(self._registry.touch, seen)
        except Exception:
            for device, at in seen.items():  # kept for the next round
                self._core.seen[device] = max(at, self._core.seen.get(device, 0.0))
            raise

    async def flush_seen_forever(self, interval: float = SEEN_FLUSH_S) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.flush_seen()
            except Exception as exc:  # the database is away: the next round tries again
                log.warning("registry.touch_failed", error=str(exc))
