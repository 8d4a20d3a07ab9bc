"""The fleet service (protos/edge_agent/_proto/fleet.proto) over a Registry and a BlobStore:
the one servicer the control plane registers, composed of its groups of RPCs.

- publishing (controlplane/publishing.py): blobs, releases, rollouts, the fleet's status;
- device sync (controlplane/devicesync.py): the long-poll for desired state, manifests, blobs;
- enrollment (controlplane/enrollment.py): devices enrolled in bulk, revoked;
- learning (controlplane/learningcalls.py): tasks, and devices' updates.
What they share (controlplane/shared.py): every registry call runs on the registry's own thread,
never on the event loop; every caller is bounded (a token bucket per device and one for the
publisher, RESOURCE_EXHAUSTED beyond it); a change of desired state wakes the long-polls it
concerns, here and on the other replicas.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from edge_agent.controlplane.blobs import BlobStore
from edge_agent.controlplane.devicesync import (
    MAX_REPORTS,
    SEEN_FLUSH_S,
    DeviceSync,
    accept_reports,
)
from edge_agent.controlplane.enrollment import Enrollment, check_device_id
from edge_agent.controlplane.learning import ParameterServer
from edge_agent.controlplane.learningcalls import MAX_UPDATE_BYTES, LearningCalls
from edge_agent.controlplane.publishing import Publishing, report_message, rollout_message
from edge_agent.controlplane.registry import Registry
from edge_agent.controlplane.shared import (
    FleetCore,
    ServiceLimits,
    ServiceStats,
    TokenBucket,
    check_version,
)
from edge_agent.errors import ConfigError
from edge_agent.fleet import auth
from edge_agent.fleet.release import CHUNK_SIZE
from edge_agent.observability.logging import get_logger

__all__ = [
    "MAX_REPORTS",
    "MAX_REQUEST_BYTES",
    "MAX_UPDATE_BYTES",
    "FleetServicer",
    "ServiceLimits",
    "ServiceStats",
    "TokenBucket",
    "accept_reports",
    "check_device_id",
    "check_version",
    "read_or_create_publisher_token",
    "report_message",
    "rollout_message",
]

log = get_logger(__name__)

PRUNE_INTERVAL_S = 3600.0
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
R = TypeVar("R")


class FleetServicer:
    """Registered with rpc/wire.py's method_handlers, which looks each method up by name: each
    is its group's (the names in the group's RPCS), so the service stays one object while each
    group reads on its own."""

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
        self._core = FleetCore(registry, blobs, publisher_token, limits or ServiceLimits())
        self.stats = self._core.stats
        self.replica = self._core.replica
        self.learning = ParameterServer(
            registry, blobs, self._core.db, self._core.notify, learning_key
        )
        self._sync = DeviceSync(self._core, self.learning, max_failure_share)
        self.health = self._sync.health
        groups = (
            Publishing(self._core, trusted_keys),
            self._sync,
            Enrollment(self._core),
            LearningCalls(self._core, self.learning),
        )
        for group in groups:
            for name in group.RPCS:
                setattr(self, name, getattr(group, name))

    def close(self) -> None:
        self._core.close()

    async def db(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        """Run a registry call on the registry thread (the dashboard reads through this)."""
        return await self._core.db(fn, *args, **kwargs)

    def remote_change(self, payload: str) -> None:
        """A notice from the database (another replica's change); on the event loop."""
        self._core.remote_change(payload)

    async def flush_seen(self) -> None:
        """Write when devices were last seen (batched: one transaction per interval)."""
        await self._sync.flush_seen()

    async def flush_seen_forever(self, interval: float = SEEN_FLUSH_S) -> None:
        await self._sync.flush_seen_forever(interval)

    async def prune_forever(self, interval: float = PRUNE_INTERVAL_S) -> None:
        """Every `interval`, bound the report history (registry.prune); forget rate buckets and
        log throttles of callers not seen for a while."""
        while True:
            try:
                removed = await self._core.db(self._core.registry.prune, time.time())
                if removed:
                    log.info("registry.pruned", rows=removed)
            except Exception:  # logged; the next round tries again
                log.exception("registry.prune_failed")
            self._core.callers.forget_rates()
            self._sync.forget_log_throttles()
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
