"""The serving table: which versions of which models exist, in which state, and which one serves a
request. Only the lifecycle (repository/lifecycle.py and the modules it drives: swap.py, push.py,
rollback.py) changes it, always on the event loop and in single synchronous steps, so a request
sees either the old table or the new one.

A request takes its version with `acquire` and queues on that version's scheduler in the same
event-loop step, so a version that is retired afterwards still finishes every request it admitted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading

from edge_agent.errors import DeadlineExceeded, EdgeAgentError, NotFound, QueueFull, Unavailable
from edge_agent.repository.scan import FileList, ModelFiles
from edge_agent.repository.version import ModelVersion, Source

READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"


@dataclasses.dataclass
class VersionState:
    version: int
    state: str
    reason: str = ""
    model: ModelVersion | None = None
    # What the serving model was built from.
    files: FileList = ()
    source: Source | None = None


@dataclasses.dataclass
class Lifecycle:
    """A model's lifecycle counters; they outlive its versions (metrics)."""

    swaps: dict[str, int] = dataclasses.field(default_factory=dict)  # by swap policy
    load_failures: int = 0
    last_pause_s: float = 0.0
    last_peak_rss_bytes: int = 0


@dataclasses.dataclass
class ModelEntry:
    name: str
    versions: dict[int, VersionState] = dataclasses.field(default_factory=dict)
    error: str = ""  # why the last load failed as a whole (bad config.pbtxt, no versions)
    applied: ModelFiles | None = None  # the files the last load acted on (poll mode)
    withdrawn: set[int] = dataclasses.field(default_factory=set)  # rolled back
    lifecycle: Lifecycle = dataclasses.field(default_factory=Lifecycle)
    # drain_first swap in progress: requests wait for this event (at most gate_limit of them).
    gate: asyncio.Event | None = None
    gate_limit: int = 0
    waiting: int = 0

    def ready_versions(self) -> list[ModelVersion]:
        return [
            s.model
            for _, s in sorted(self.versions.items())
            if s.state == READY and s.model is not None
        ]

    def states(self) -> list[VersionState]:
        return [s for _, s in sorted(self.versions.items())]


class ModelRegistry:
    def __init__(self) -> None:
        self._models: dict[str, ModelEntry] = {}
        self._lock = threading.Lock()  # the metrics thread reads the table too

    # -- serving --------------------------------------------------------------------------------

    def get(self, name: str, version: str = "") -> ModelVersion:
        """The version to serve: the one named, or the newest ready one."""
        entry = self._models.get(name)
        if entry is None:
            raise NotFound(f"unknown model '{name}'")
        if entry.error and not entry.ready_versions():
            raise Unavailable(f"model '{name}' failed to load: {entry.error}")
        if version:
            if not (version.isascii() and version.isdigit()) or int(version) not in entry.versions:
                raise NotFound(f"model '{name}' has no version '{version}'")
            state = entry.versions[int(version)]
            if state.model is None or state.state != READY:
                raise Unavailable(
                    f"model '{name}' version {version} is {state.state}"
                    + (f": {state.reason}" if state.reason else "")
                )
            return state.model
        newest, model = -1, None  # the newest ready version, without sorting (every request)
        for number, state in entry.versions.items():
            if number > newest and state.state == READY and state.model is not None:
                newest, model = number, state.model
        if model is None:
            reasons = "; ".join(
                f"version {s.version}: {s.state}" + (f" ({s.reason})" if s.reason else "")
                for s in entry.states()
            )
            raise Unavailable(f"model '{name}' has no ready version ({reasons or 'not loaded'})")
        return model

    async def acquire(self, name: str, version: str, deadline: float | None) -> ModelVersion:
        """`get`, after waiting out a drain_first swap in progress (bounded; `deadline` is in
        loop.time() seconds). The caller must queue on the result before its next await."""
        entry = self._models.get(name)
        while entry is not None and entry.gate is not None:
            if entry.waiting >= entry.gate_limit:
                raise QueueFull(
                    f"model '{name}' is swapping versions and {entry.waiting} requests already "
                    "wait for it; retry later"
                )
            timeout = None
            if deadline is not None:
                timeout = deadline - asyncio.get_running_loop().time()
            entry.waiting += 1
            try:
                await asyncio.wait_for(entry.gate.wait(), timeout)
            except TimeoutError:
                raise DeadlineExceeded(
                    f"model '{name}': the deadline passed while it was swapping versions"
                ) from None
            finally:
                entry.waiting -= 1
            entry = self._models.get(name)
        return self.get(name, version)

    def is_ready(self, name: str, version: str = "") -> bool:
        try:
            self.get(name, version)
        except EdgeAgentError:
            return False
        return True

    # -- the table ------------------------------------------------------------------------------

    def entry(self, name: str) -> ModelEntry:
        entry = self._models.get(name)
        if entry is None:
            raise NotFound(f"unknown model '{name}'")
        return entry

    def find(self, name: str) -> ModelEntry | None:
        return self._models.get(name)

    def ensure(self, name: str) -> ModelEntry:
        with self._lock:
            return self._models.setdefault(name, ModelEntry(name))

    def remove(self, name: str) -> None:
        with self._lock:
            self._models.pop(name, None)

    def entries(self) -> list[ModelEntry]:
        with self._lock:
            return sorted(self._models.values(), key=lambda e: e.name)

    def versions(self) -> list[ModelVersion]:
        """Every loaded version (serving or draining), for statistics and metrics."""
        return [s.model for entry in self.entries() for s in entry.states() if s.model is not None]

    def activity(self) -> tuple[int, int]:
        """(requests queued or running now, requests finished so far) over every loaded version:
        what local training's pacing reads (learn/participant.py)."""
        busy = done = 0
        for model in self.versions():
            busy += model.scheduler.busy()
            done += model.stats.success.count + model.stats.fail.count
        return busy, done

    async def close(self) -> None:
        """Let every scheduler finish what it admitted, then stop its threads."""
        await asyncio.gather(*(model.close() for model in self.versions()))
