"""What every group of fleet RPCs (publishing, device sync, enrollment, learning) stands on.

Written once so that each group reads as its RPCs alone: the registry's own threads (`db`: a
slow query delays its caller only, never the event loop), who the caller is (a device's token or
the publisher's) and how fast it may call (a token bucket each), how a change of desired state
reaches the long-polls (here and, through the database, on the other replicas), and the bounds of
a client stream (an upload).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc

from edge_agent.controlplane import defaults
from edge_agent.controlplane.blobs import BlobStore
from edge_agent.controlplane.registry import Registry
from edge_agent.errors import InvalidArgument, PermissionDenied, ResourceExhausted, Unauthenticated
from edge_agent.fleet import auth
from edge_agent.fleet.release import MAX_VERSION
from edge_agent.observability.logging import get_logger
from edge_agent.rpc.wire import Malformed

log = get_logger(__name__)

TOKEN_CACHE_S = 30.0  # how long a replica trusts a device's token hash without reading it
MAX_TOKEN_CACHE = 200_000  # device token hashes a replica keeps at most
MAX_NOTICE_CHARS = 7000  # NOTIFY payloads are limited to 8000 bytes
R = TypeVar("R")
Db = Callable[..., Awaitable[Any]]  # runs a registry call on the registry thread (FleetCore.db)


@dataclasses.dataclass(frozen=True)
class ServiceLimits:
    """What one caller may cost the control plane."""

    device_rate: float = defaults.DEVICE_RATE
    device_burst: int = defaults.DEVICE_BURST
    publisher_rate: float = defaults.PUBLISHER_RATE
    publisher_burst: int = defaults.PUBLISHER_BURST
    max_blob_bytes: int = defaults.MAX_BLOB_BYTES
    upload_seconds: float = defaults.UPLOAD_SECONDS
    upload_idle_seconds: float = defaults.UPLOAD_IDLE_SECONDS


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


def check_version(version: int) -> int:
    if not 1 <= version <= MAX_VERSION:
        raise InvalidArgument(f"version {version} is not in 1..2^63-1")
    return version


class Poll:
    """A device's live long-poll: woken when its desired state may have changed, or when a
    newer poll of the same device replaces it."""

    __slots__ = ("changed", "replaced")

    def __init__(self) -> None:
        self.changed = asyncio.Event()
        self.replaced = False

    def replace(self) -> None:
        """End this poll: it answers ABORTED (a newer one took its place, or its device is gone)."""
        self.replaced = True
        self.changed.set()


class Callers:
    """Who is calling (a device by its token, or the publisher) and whether it may call now."""

    def __init__(
        self,
        registry: Registry,
        db: Db,
        publisher_token: str,
        limits: ServiceLimits,
        stats: ServiceStats,
    ) -> None:
        self._registry = registry
        self._db = db
        self._publisher_token = publisher_token
        self._limits = limits
        self._stats = stats
        self._buckets: dict[str, TokenBucket] = {}
        self._tokens: dict[str, tuple[str, float]] = {}  # device -> (token hash, until)

    async def device(self, context: grpc.aio.ServicerContext) -> str:
        """The calling device (its rate limit taken), or the refusal a wrong caller gets."""
        token, device_id = auth.bearer(context.invocation_metadata())
        device = await self._device_of(token, device_id)
        if device is not None:
            self._limit(f"device:{device}", "device")
            return device
        if token and auth.same(token, self._publisher_token):
            raise PermissionDenied("this call needs a device token (with x-device-id)")
        raise Unauthenticated("missing or unknown device credentials")

    async def publisher(self, context: grpc.aio.ServicerContext) -> None:
        """Return when the publisher calls (its rate limit taken); refuse anyone else."""
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
            self._stats.rate_limited[role] = self._stats.rate_limited.get(role, 0) + 1
            raise ResourceExhausted(f"too many calls from this {role}; slow down and retry")

    def forget_tokens(self, devices: Iterable[str] | None) -> None:
        """Read these devices' tokens anew (enrolled again, rotated, revoked); None: everyone's."""
        if devices is None:
            self._tokens.clear()
        for device in devices or ():
            self._tokens.pop(device, None)

    def forget_rates(self) -> None:
        """Forget every rate bucket: a full bucket is what a new one is, so nothing is lost."""
        self._buckets.clear()


class FleetCore:
    """The registry and blob store with their thread, the callers, the live long-polls and the
    change notices, shared by every group of fleet RPCs."""

    def __init__(
        self,
        registry: Registry,
        blobs: BlobStore,
        publisher_token: str,
        limits: ServiceLimits,
    ) -> None:
        self.registry = registry
        self.blobs = blobs
        self.limits = limits
        self.stats = ServiceStats()
        # Every registry call goes through db, on the registry's threads: one for SQLite (one
        # connection), several for PostgreSQL (a pool connection each; queries wait on the
        # network, not the GIL).
        self._executor = ThreadPoolExecutor(
            max_workers=registry.threads, thread_name_prefix="registry"
        )
        self.callers = Callers(registry, self.db, publisher_token, limits, self.stats)
        self.polls: dict[str, Poll] = {}  # device -> its live long-poll
        # Devices seen since the last flush (touch): one write per interval, not one per poll.
        self.seen: dict[str, float] = {}
        # Tells this replica's own notices from others' (PostgreSQL LISTEN/NOTIFY).
        self.replica = uuid.uuid4().hex[:12]
        self._background: set[asyncio.Task[None]] = set()

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    async def db(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        """Run a registry call on the registry thread."""
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def open_poll(self, device: str) -> Poll:
        """The device's new long-poll; an older one of the same device answers ABORTED."""
        older = self.polls.get(device)
        if older is not None:
            older.replace()
            self.stats.polls_replaced += 1
        poll = self.polls[device] = Poll()
        return poll

    def close_poll(self, device: str, poll: Poll) -> None:
        if self.polls.get(device) is poll:
            del self.polls[device]

    def end_poll(self, device: str) -> None:
        """The device's long-poll, if any, ends now (its device was revoked)."""
        older = self.polls.pop(device, None)
        if older is not None:
            older.replace()

    def notify(self, devices: Iterable[str] | None = None) -> None:
        """Desired state changed for `devices` (None: possibly for any): wake their long-polls
        here (O(devices affected)), and tell the other replicas through the database."""
        devices = None if devices is None else sorted(set(devices))
        self._wake(devices)
        listed = json.dumps(devices) if devices is not None else ""
        # A list too long for one notice becomes "everyone".
        fits = devices is not None and len(listed) < MAX_NOTICE_CHARS
        payload = f"{self.replica} {listed if fits else '*'}"
        task = asyncio.get_running_loop().create_task(self.db(self.registry.notify, payload))
        self._background.add(task)
        task.add_done_callback(self._notified)

    def _notified(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The other replicas' polls then see the change at their next wake or timeout.
            log.warning("registry.notify_failed", error=str(task.exception()))

    def _wake(self, devices: list[str] | None) -> None:
        self.callers.forget_tokens(devices)
        polls = self.polls.values() if devices is None else map(self.polls.get, devices)
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

    async def uploaded(self, request_iterator: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """The messages of a client stream (UploadBlob, UploadUpdate), each parsed and within
        the bounds: a stalled upload holds a temporary file or memory, so every message must
        come within upload_idle_seconds and the whole within upload_seconds."""
        limits = self.limits
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
