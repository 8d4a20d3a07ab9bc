"""Swap mechanics: how the versions that serve a model change while it serves.

A swap builds versions on the one loader thread (at a lower CPU priority than serving, so builds
never run in parallel with each other and never on the serving path), then activates the built
ones in one synchronous step of the event loop (see registry.py); the versions they replace are
retired in that same step and released once their admitted requests have finished.

Swap policies:
- overlap (default): the new version is built while the old one serves; both are loaded briefly.
- drain_first: for devices that cannot hold two copies. New requests wait (bounded by the model's
  queue size, and by their deadlines) while the old version drains and is released and the new
  one loads; callers see a pause, not an error. If the new version fails, the old one is rebuilt.

Each swap logs `model.swapped` with its pause and the process's peak resident memory during it
(the same numbers are metrics); each failure logs `model.load_failed` with its reason, which also
stays in RepositoryIndex and the model's per-version health entry.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from edge_agent.errors import ModelLoadError
from edge_agent.observability import memory
from edge_agent.observability.logging import get_logger
from edge_agent.repository import config as cfg
from edge_agent.repository.ensemble import build_ensemble, is_ensemble
from edge_agent.repository.registry import (
    LOADING,
    READY,
    UNAVAILABLE,
    UNLOADING,
    ModelEntry,
    ModelRegistry,
    VersionState,
)
from edge_agent.repository.scan import FileList, ModelFiles
from edge_agent.repository.version import ModelVersion, Source, build_version
from edge_agent.runtime.priority import Priority
from edge_agent.settings import Settings

log = get_logger(__name__)

T = TypeVar("T")
# A version built ahead of its load (from pushed files): the model, its files and its source.
Prebuilt = tuple[ModelVersion, FileList, Source]


@dataclasses.dataclass(frozen=True)
class SwapPlan:
    """What one load does to a model: the versions the version policy chooses, which of them
    to build (from `source` and `files`), and those already built that can serve as they are."""

    source: Source
    files: ModelFiles
    chosen: list[int]
    rebuild: list[int]
    reuse: Mapping[int, ModelVersion]


def plan_swap(
    entry: ModelEntry,
    source: Source,
    files: ModelFiles,
    chosen: list[int],
    prebuilt: Mapping[int, Prebuilt],
    force: bool,
) -> SwapPlan:
    """Rebuild each chosen version that does not serve already from exactly these files and
    source (every chosen version when `force`); reuse a prebuilt one built from the same."""

    def serves_as_is(version: int) -> bool:
        state = entry.versions.get(version)
        return (
            state is not None
            and state.state == READY
            and state.files == files.version(version)
            and state.source == source
        )

    rebuild = [v for v in chosen if force or not serves_as_is(v)]
    reuse = {
        v: model
        for v, (model, built_files, built_source) in prebuilt.items()
        if v in rebuild and built_files == files.version(v) and built_source == source
    }
    return SwapPlan(source, files, chosen, rebuild, reuse)


@dataclasses.dataclass(frozen=True)
class _SwapStart:
    """What a swap's report compares with: the versions serving, the time and the resident
    memory when it started."""

    versions: list[int]
    time: float
    rss_bytes: int

    @classmethod
    def now(cls, entry: ModelEntry) -> _SwapStart:
        memory.reset_peak()  # the swap's memory peak is measured from here
        versions = [m.version for m in entry.ready_versions()]
        return cls(versions, time.monotonic(), memory.rss_bytes())


class Swapper:
    """Builds versions on the loader thread and changes which of them serve. The caller holds
    the model's lock; `changed` is awaited after each change to the serving table (health)."""

    def __init__(
        self,
        settings: Settings,
        changed: Callable[[], Awaitable[None]],
        registry: ModelRegistry,
    ) -> None:
        self.settings = settings  # the builds read the current settings (a reload replaces them)
        self._repository = settings.model_repository
        self._changed = changed
        self._registry = registry  # an ensemble is checked against the step models serving
        self.priority = Priority(settings.loader_nice)  # runtime/priority.py
        self._loader = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="model-loader",
            initializer=self.priority.lower_this_thread,
        )

    async def in_loader(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._loader, fn, *args)

    def shutdown(self) -> None:
        """A build in progress finishes on its thread, unused; none starts after this."""
        self._loader.shutdown(wait=False, cancel_futures=True)

    # -- the swap -------------------------------------------------------------------------------

    async def swap(self, entry: ModelEntry, plan: SwapPlan, policy: str) -> None:
        """Serve the plan's versions by `policy` (a first load, or nothing to build: overlap)."""
        if plan.rebuild and policy == "drain_first" and entry.ready_versions():
            await self._drain_first(entry, plan)
        else:
            await self._overlap(entry, plan)

    async def _overlap(self, entry: ModelEntry, plan: SwapPlan) -> None:
        start = _SwapStart.now(entry)
        results = await self.build(entry, plan.source, plan.rebuild, reuse=plan.reuse)
        # The step: new versions serve and the unchosen stop, together, or nothing retires.
        replaced = self.activate(entry, plan.source, plan.files, results)
        retiring: list[VersionState] = []
        if any(entry.versions[v].state == READY for v in plan.chosen):
            unchosen = [s.version for s in entry.states() if s.version not in plan.chosen]
            retiring = self.retire(entry, unchosen, "unloaded: replaced by a newer version")
        await self._changed()
        await self.release(retiring, replaced)
        changed = replaced or retiring or any(isinstance(r, ModelVersion) for r in results.values())
        if start.versions and changed:  # a first load is no swap
            self._swapped(entry, "overlap", start, 0.0)

    async def _drain_first(self, entry: ModelEntry, plan: SwapPlan) -> None:
        start = _SwapStart.now(entry)
        serving = entry.ready_versions()
        entry.gate = asyncio.Event()
        entry.gate_limit = max(
            level.max_queue_size for m in serving for level in m.scheduler.policy.levels
        )
        try:
            old = {
                s.version: (s.source, s.files)
                for s in entry.states()
                if s.state == READY and (s.version not in plan.chosen or s.version in plan.rebuild)
            }
            retiring = self.retire(entry, list(old), "unloaded: replaced (drain_first)")
            await self._changed()
            await self.release(retiring, [])
            results = await self.build(entry, plan.source, plan.rebuild, reuse=plan.reuse)
            self.activate(entry, plan.source, plan.files, results)
            restored = not any(entry.versions[v].state == READY for v in plan.chosen)
            if restored:
                # Nothing new serves: bring the old versions back, each as it was built.
                log.warning("model.swap_restoring", model=entry.name, versions=sorted(old))
                for version, (old_source, old_files) in old.items():
                    if old_source is None:
                        continue
                    rebuilt = await self.build(entry, old_source, [version])
                    self.activate(entry, old_source, ModelFiles((), {version: old_files}), rebuilt)
        finally:
            entry.gate.set()
            entry.gate = None
        pause = time.monotonic() - start.time
        self._swapped(entry, "drain_first", start, pause, restored)

    def _swapped(
        self,
        entry: ModelEntry,
        policy: str,
        start: _SwapStart,
        pause: float,
        restored: bool = False,
    ) -> None:
        """Report a swap (or, `restored`, a drain_first swap that failed and brought the old
        versions back: requests paused all the same, but nothing was swapped)."""
        peak = memory.peak_rss_bytes()
        life = entry.lifecycle
        if not restored:
            life.swaps[policy] = life.swaps.get(policy, 0) + 1
        life.last_pause_s, life.last_peak_rss_bytes = pause, peak
        log.info(
            "model.swap_restored" if restored else "model.swapped",
            model=entry.name,
            policy=policy,
            versions_before=start.versions,
            versions=[m.version for m in entry.ready_versions()],
            pause_seconds=round(pause, 4),
            peak_rss_bytes=peak,
            rss_before_bytes=start.rss_bytes,
            seconds=round(time.monotonic() - start.time, 3),
        )

    async def unload(self, entry: ModelEntry, reason: str) -> None:
        """Every version of the model stops serving and is released."""
        retiring = self.retire(entry, [s.version for s in entry.states()], reason)
        await self._changed()
        await self.release(retiring, [])
        for state in retiring:
            state.reason = reason
        log.info("model.unloaded", model=entry.name, versions=[s.version for s in retiring])
        await self._changed()

    # -- the steps ------------------------------------------------------------------------------

    async def build(
        self,
        entry: ModelEntry,
        source: Source,
        versions: list[int],
        model_dir: Path | None = None,
        reuse: Mapping[int, ModelVersion] | None = None,
    ) -> dict[int, ModelVersion | str]:
        """Build each version on the loader thread: a ModelVersion, or the reason it failed.
        `model_dir`: where the version directories are (a staging directory for a push; by
        default the model's directory in the repository)."""
        model_dir = model_dir or self._repository / entry.name
        results: dict[int, ModelVersion | str] = {}
        for version in versions:
            if reuse and version in reuse:
                results[version] = reuse[version]
                continue
            if version not in entry.versions or entry.versions[version].state != READY:
                entry.versions[version] = VersionState(version, LOADING)
                await self._changed()
            started = time.monotonic()
            try:
                if is_ensemble(source[0]):  # no files to load: on the loop, it reads the table
                    built: ModelVersion = build_ensemble(
                        entry.name, version, source[0], self._registry, self.settings
                    )
                else:
                    built = await self.in_loader(
                        build_version,
                        model_dir,
                        version,
                        source[0],
                        source[1],
                        self.settings,
                        self.priority,
                        any(v.state == READY for v in entry.versions.values()),
                    )
            except ModelLoadError as exc:
                results[version] = str(exc)
                continue
            except Exception as exc:  # a bug or an ORT surprise must not stop the others
                log.exception("model.load_error", model=entry.name, version=version)
                results[version] = f"unexpected error: {exc!r}"
                continue
            results[version] = built
            _log_loaded(entry.name, built, started)
        return results

    def activate(
        self,
        entry: ModelEntry,
        source: Source,
        files: ModelFiles,
        results: Mapping[int, ModelVersion | str],
    ) -> list[ModelVersion]:
        """One synchronous step: built versions serve, failed ones are recorded. Returns the
        models this replaced (same version numbers), to be released."""
        replaced = []
        for version, result in results.items():
            state = entry.versions.get(version)
            if isinstance(result, str):
                if state is not None and state.state == READY:
                    state.reason = f"reload failed, the previous build serves: {result}"
                else:
                    entry.versions[version] = VersionState(version, UNAVAILABLE, result)
                self.failed(entry, version, result)
                continue
            if state is not None and state.model is not None:
                replaced.append(state.model)
            entry.versions[version] = VersionState(
                version, READY, model=result, files=files.version(version), source=source
            )
        return replaced

    @staticmethod
    def retire(entry: ModelEntry, versions: list[int], reason: str) -> list[VersionState]:
        """One synchronous step: these versions stop taking requests."""
        retired = []
        for version in versions:
            state = entry.versions[version]
            if state.state == READY:
                state.state, state.reason = UNLOADING, reason
                retired.append(state)
        return retired

    @staticmethod
    async def release(retiring: list[VersionState], replaced: list[ModelVersion]) -> None:
        """Wait for the retired versions' admitted requests, then free them."""
        await asyncio.gather(
            *(s.model.close() for s in retiring if s.model is not None),
            *(m.close() for m in replaced),
        )
        for state in retiring:
            if state.state == UNLOADING:
                state.state, state.model = UNAVAILABLE, None

    @staticmethod
    def failed(entry: ModelEntry, version: int | None, reason: str) -> None:
        entry.lifecycle.load_failures += 1
        log.error("model.load_failed", model=entry.name, version=version, reason=reason)


def _log_loaded(name: str, built: ModelVersion, started: float) -> None:
    log.info(
        "model.loaded",
        model=name,
        version=built.version,
        provider=built.provider,
        max_batch_size=built.max_batch_size,
        instances=cfg.instance_count(built.config),
        inline=built.scheduler.policy.inline,
        intra_op_threads=built.intra_op_threads,
        execution=built.execution_mode,
        warmup_runs=built.warmup_runs,
        seconds=round(time.monotonic() - started, 3),
    )
