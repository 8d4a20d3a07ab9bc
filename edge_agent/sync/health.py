"""How the device serves, for its control plane: a DeviceHealth on every long-poll (sync/syncer.py).

Per loaded model version, the counters its statistics keep (requests, failures, rejections,
summed latency and compute time, requests by latency bucket), cumulative since this agent
started; per device, uptime, resident memory, free bytes where the state directory is, and the
load average. Cumulative counters make the report idempotent: the control plane takes the
difference from the last report it kept of this start (`boot`), so a lost or repeated poll
neither loses nor doubles a request. A few hundred bytes a model.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from edge_agent._proto import fleet_pb2 as pb
from edge_agent.observability import memory
from edge_agent.repository.version import ModelVersion

MAX_VERSIONS = 64  # per report; the control plane refuses more


class HealthReporter:
    def __init__(self, versions: Callable[[], Sequence[ModelVersion]], state_dir: Path) -> None:
        self._versions = versions  # every loaded version (the registry's table, thread-safe)
        self._state_dir = state_dir
        self._boot = secrets.token_hex(8)
        self._started = time.monotonic()

    def report(self) -> pb.DeviceHealth:
        health = pb.DeviceHealth(
            boot=self._boot,
            uptime_seconds=round(time.monotonic() - self._started, 3),
            rss_bytes=memory.rss_bytes(),
            disk_free_bytes=_free_bytes(self._state_dir),
            load1=os.getloadavg()[0],
        )
        for model in list(self._versions())[:MAX_VERSIONS]:
            stats = model.stats.snapshot()
            health.versions.add(
                model=model.name,
                version=model.version,
                provider=model.provider,
                requests=stats.success.count + stats.fail.count,
                failures=stats.fail.count,
                rejections=sum(stats.rejections.values()),
                latency_us=(stats.success.ns + stats.fail.ns) // 1000,
                compute_us=stats.compute_infer.ns // 1000,
                latency_buckets=stats.latency_buckets,
            )
        return health


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0
