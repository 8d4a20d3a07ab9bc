"""Model lifecycle: load, reload, unload, roll back and poll, without failing a request.

Every operation on a model holds that model's lock and runs on the event loop; building a version
(ORT session, warmup, golden check) runs on the one loader thread, so loads never run in
parallel with each other and never on the serving path. A built version becomes current in one
synchronous step of the loop (see registry.py); the versions it replaces stop taking requests in
that same step and are released once their admitted requests have finished.

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
import contextlib
import dataclasses
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf import json_format, text_format

from edge_agent._proto import model_config_pb2 as mc
from edge_agent.common import failpoints
from edge_agent.common.files import write_atomically
from edge_agent.errors import (
    DiskFull,
    EdgeAgentError,
    FailedPrecondition,
    InvalidArgument,
    ModelLoadError,
    NotFound,
    Unavailable,
)
from edge_agent.observability import memory
from edge_agent.observability.logging import get_logger
from edge_agent.repository import config as cfg
from edge_agent.repository import staging
from edge_agent.repository.registry import (
    LOADING,
    READY,
    UNAVAILABLE,
    UNLOADING,
    ModelEntry,
    ModelRegistry,
    VersionState,
)
from edge_agent.repository.scan import (
    FileList,
    ModelFiles,
    StabilityTracker,
    model_dirs,
    scan_model,
    scan_repository,
)
from edge_agent.repository.version import ModelVersion, build_version
from edge_agent.runtime.priority import Priority
from edge_agent.settings import SWAP_POLICIES, Settings

log = get_logger(__name__)

T = TypeVar("T")
# A version built ahead of its load: the model, the files and the config it was built from.
Prebuilt = tuple[ModelVersion, FileList, tuple[mc.ModelConfig, bool]]
ROLLBACK_PARAMETER = "rollback"
STATE_FILE = "lifecycle.json"


@dataclasses.dataclass(frozen=True)
class LoadRequest:
    """What a RepositoryModelLoad asks, parsed (see api/servicer.py)."""

    config_json: str | None = None
    files: Mapping[int, Mapping[str, bytes]] = dataclasses.field(default_factory=dict)
    rollback: bool = False


def config_from_json(text: str, model: str) -> tuple[mc.ModelConfig, bool, str]:
    """The `config` parameter (a JSON ModelConfig) -> (config, whether it sets max_batch_size,
    its config.pbtxt text)."""
    config = mc.ModelConfig()
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        json_format.ParseDict(data, config)
    except (ValueError, RecursionError, json_format.ParseError) as exc:
        raise InvalidArgument(f"parameter 'config' is not a valid model config: {exc}") from exc
    if config.name and config.name != model:
        raise InvalidArgument(f"parameter 'config' names model {config.name!r}, not {model!r}")
    config.name = model
    batch_given = "max_batch_size" in data
    text_config = text_format.MessageToString(config)
    if batch_given and config.max_batch_size == 0:
        # An explicit 0 ("does not batch") would vanish from the text and autocomplete again.
        text_config = "max_batch_size: 0\n" + text_config
    return config, batch_given, text_config


class ModelManager:
    def __init__(self, settings: Settings, registry: ModelRegistry) -> None:
        self._settings = settings
        self._repository = settings.model_repository
        self._registry = registry
        # One loader thread, at a lower CPU priority than serving (runtime/priority.py).
        self._priority = Priority(settings.loader_nice)
        self._loader = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="model-loader",
            initializer=self._priority.lower_this_thread,
        )
        self._locks: dict[str, asyncio.Lock] = {}
        self._listeners: list[Callable[[], Awaitable[None]]] = []
        self._poll_task: asyncio.Task[None] | None = None
        self._operations: set[asyncio.Future[None]] = set()  # detached load / unload / rollback
        self._overrides: dict[str, tuple[mc.ModelConfig, bool]] = {}  # in-memory config params
        self._state_path = settings.state_dir / STATE_FILE if settings.state_dir else None
        self._withdrawn = self._read_state()

    @property
    def repository(self) -> Path:
        return self._repository

    @property
    def mode(self) -> str:
        return self._settings.model_control_mode

    def on_change(self, listener: Callable[[], Awaitable[None]]) -> None:
        self._listeners.append(listener)

    async def _changed(self) -> None:
        for listener in self._listeners:
            await listener()

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def _in_loader(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._loader, fn, *args)

    # -- start and stop -------------------------------------------------------------------------

    async def start(self) -> None:
        """The loads at start, by mode; then polling in poll mode."""
        if not self._priority.enabled:
            reason = self._priority.disabled_reason
            log.warning("lifecycle.loader_priority_unchanged", reason=reason)
        staging.clean_staging(self._repository)
        first_scan = await asyncio.to_thread(scan_repository, self._repository)
        names = sorted(first_scan)
        if self.mode == "explicit":
            wanted = set(self._settings.load_model)
            names = names if "*" in wanted else sorted(wanted)
        for name in names:
            try:
                await self.load(name, LoadRequest(), at_start=True)
            except NotFound as exc:
                log.error("model.load_failed", model=name, reason=str(exc))
            except EdgeAgentError:
                pass  # recorded and logged; the other models go on
        if self.mode == "poll":
            self._poll_task = asyncio.create_task(self._poll(first_scan), name="repository-poll")

    async def stop(self) -> None:
        """Stop polling (a load in progress finishes on its thread, unused)."""
        if self._poll_task is not None:
            self._poll_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll_task
        self._loader.shutdown(wait=False, cancel_futures=True)

    # -- the operations -------------------------------------------------------------------------

    async def _detached(self, operation: Awaitable[None]) -> None:
        """Run an operation to its end even if the caller goes away (an RPC deadline or a
        cancelled client must not leave a swap half done), and wait for it."""
        task = asyncio.ensure_future(operation)
        self._operations.add(task)
        task.add_done_callback(self._operations.discard)
        await asyncio.shield(task)

    async def load(self, name: str, request: LoadRequest, at_start: bool = False) -> None:
        """Load or reload `name` from the repository (or from pushed files, or roll it back).
        Raises the reason when the model or a version it should serve failed to load."""
        await self._detached(self._load_request(name, request, at_start))

    async def _load_request(self, name: str, request: LoadRequest, at_start: bool) -> None:
        staging.check_model_name(name)
        if request.rollback:
            if request.files or request.config_json:
                raise InvalidArgument("'rollback' cannot be combined with 'config' or files")
            await self._rollback(name)
            return
        if self.mode != "explicit" and not at_start:
            raise Unavailable(
                f"explicit model load / unload is not allowed in model control mode "
                f"'{self.mode}' (start the agent with --model-control-mode explicit)"
            )
        override = None
        config_text = None
        if request.config_json is not None:
            config, batch_given, config_text = config_from_json(request.config_json, name)
            override = (config, batch_given)
        async with self._lock(name):
            entry = self._registry.find(name)
            if entry is not None and entry.withdrawn:  # an explicit load undoes a rollback
                entry.withdrawn.clear()
                self._write_state()
            prebuilt: dict[int, Prebuilt] = {}
            if request.files:
                files = request.files
                prebuilt = await self._push(
                    name,
                    lambda: staging.stage(self._repository, name, files, config_text),
                    sorted(files),
                    ["config.pbtxt"] if config_text is not None else [],
                    sum(len(c) for f in files.values() for c in f.values()),
                )
                self._overrides.pop(name, None)  # the config is now config.pbtxt
            elif override is not None:
                self._overrides[name] = override
            else:
                self._overrides.pop(name, None)
            if not (self._repository / name).is_dir():
                self._registry.remove(name)
                await self._close_unused(name, prebuilt)
                raise NotFound(f"no model '{name}' in the repository")
            await self._load_prebuilt(name, prebuilt)

    async def unload(self, name: str) -> None:
        await self._detached(self._unload_request(name))

    async def _unload_request(self, name: str) -> None:
        if self.mode != "explicit":
            raise Unavailable(
                f"explicit model load / unload is not allowed in model control mode '{self.mode}'"
            )
        staging.check_model_name(name)
        async with self._lock(name):
            entry = self._registry.find(name)
            if entry is None:
                if (self._repository / name).is_dir():
                    return  # known, not loaded: nothing to do
                raise NotFound(f"no model '{name}' in the repository")
            await self._unload(entry, "unloaded")

    async def rollback(self, name: str) -> None:
        """Serve the newest version older than the one serving now, through the same swap path.
        The rolled-back version is withdrawn (persisted with --state-dir) until an explicit load
        of the model or a newer version on disk."""
        await self._detached(self._rollback(name))

    async def _rollback(self, name: str) -> None:
        async with self._lock(name):
            entry = self._registry.find(name)
            ready = entry.ready_versions() if entry is not None else []
            if entry is None or not ready:
                raise FailedPrecondition(f"model '{name}' serves no version to roll back from")
            current = ready[-1].version
            on_disk = scan_model(self._repository / name).versions
            earlier = [v for v in on_disk if v < current and v not in entry.withdrawn]
            if not earlier:
                raise FailedPrecondition(
                    f"model '{name}' has no version older than {current} on disk to roll back to"
                )
            entry.withdrawn.add(current)
            await self._in_loader(
                staging.restore_model_files, self._repository / name, max(earlier)
            )
            try:
                await self._load(name)
            finally:
                if entry.versions.get(current) and entry.versions[current].state == READY:
                    entry.withdrawn.discard(current)  # the rollback failed: it still serves
                    await self._in_loader(
                        staging.restore_model_files, self._repository / name, current
                    )
            self._write_state()
            log.info("model.rolled_back", model=name, from_version=current)

    async def install(self, name: str, version: int, source: Path) -> None:
        """Install `source` (a directory of verified files, the sync's) as `version` of `name`
        through the push path: copied to staging, built, warmed and checked there, installed by
        rename, then swapped in. Allowed in every model control mode."""
        await self._detached(self._install_from(name, version, source))

    async def _install_from(self, name: str, version: int, source: Path) -> None:
        staging.check_model_name(name)
        async with self._lock(name):
            # A release that carries the model's config.pbtxt / warmup/ installs them too.
            prebuilt = await self._push(
                name,
                lambda: staging.stage_directory(self._repository, name, version, source),
                [version],
                staging.model_files_of(source),
                staging.tree_size(source),
            )
            self._registry.ensure(name).withdrawn.discard(version)
            await self._load_prebuilt(name, prebuilt)
            self._write_state()

    async def adopt(self, name: str, version: int) -> None:
        """Serve `version`, already in the repository with the files its installer checked (an
        install cut off between the rename and its record), as `install` would have: its own
        config.pbtxt / warmup/, not withdrawn, loaded by the model's version policy."""
        await self._detached(self._adopt(name, version))

    async def _adopt(self, name: str, version: int) -> None:
        staging.check_model_name(name)
        async with self._lock(name):
            if not (self._repository / name / str(version)).is_dir():
                raise NotFound(f"model '{name}' has no version {version} on disk")
            self._registry.ensure(name).withdrawn.discard(version)
            self._withdrawn.get(name, set()).discard(version)
            await self._in_loader(staging.restore_model_files, self._repository / name, version)
            await self._load(name)
            self._write_state()

    async def serve_only_up_to(self, name: str, version: int) -> None:
        """Serve `version` (on disk already) as the newest: newer versions on disk are withdrawn
        (a rollback, persisted), this one and older ones are not. Allowed in every mode."""
        await self._detached(self._serve_only_up_to(name, version))

    async def _serve_only_up_to(self, name: str, version: int) -> None:
        staging.check_model_name(name)
        async with self._lock(name):
            on_disk = (await asyncio.to_thread(scan_model, self._repository / name)).versions
            if version not in on_disk:
                raise NotFound(f"model '{name}' has no version {version} on disk")
            entry = self._registry.ensure(name)
            entry.withdrawn = {v for v in on_disk if v > version}
            self._withdrawn.pop(name, None)
            await self._in_loader(staging.restore_model_files, self._repository / name, version)
            await self._load(name)
            self._write_state()

    async def reconfigure(self, settings: Settings, rebuild: bool) -> None:
        """New settings (a SIGHUP reload): reload every model on disk through the hot-swap path,
        unload models no longer on disk (in explicit mode only the loaded models are reloaded).
        Versions whose files and config did not change are kept unless `rebuild` (settings that
        builds read changed)."""
        self._settings = settings
        on_disk = await asyncio.to_thread(model_dirs, self._repository)
        loaded = {e.name for e in self._registry.entries() if e.ready_versions()}
        names = loaded if self.mode == "explicit" else set(on_disk) | loaded
        for name in sorted(names):
            async with self._lock(name):
                if name not in on_disk:
                    await self._drop(name)
                    continue
                with contextlib.suppress(EdgeAgentError):  # recorded and logged
                    await self._load(name, force=rebuild)
        await self._changed()

    def activity(self) -> tuple[int, int]:
        """(requests queued or running, requests finished so far), every model together."""
        return self._registry.activity()

    def serving_version(self, name: str) -> int:
        """The newest version of `name` serving now (0: none)."""
        entry = self._registry.find(name)
        ready = entry.ready_versions() if entry is not None else []
        return ready[-1].version if ready else 0

    # -- loading --------------------------------------------------------------------------------

    async def _load_prebuilt(self, name: str, prebuilt: Mapping[int, Prebuilt]) -> None:
        """`_load` offered versions built ahead; those it did not take are closed."""
        try:
            await self._load(name, prebuilt)
        finally:
            await self._close_unused(name, prebuilt)

    async def _close_unused(self, name: str, prebuilt: Mapping[int, Prebuilt]) -> None:
        for model, _, _ in prebuilt.values():
            if not self._serves(name, model):
                await model.close()

    def _serves(self, name: str, model: ModelVersion) -> bool:
        entry = self._registry.find(name)
        return entry is not None and any(s.model is model for s in entry.states())

    async def _load(
        self, name: str, prebuilt: Mapping[int, Prebuilt] | None = None, force: bool = False
    ) -> None:
        """Bring the model to what its files and version policy say, swapping atomically.
        `prebuilt`: versions already built from exactly these files (pushed ones). `force`:
        rebuild even unchanged versions (the settings they were built with changed)."""
        model_dir = self._repository / name
        entry = self._registry.ensure(name)
        entry.withdrawn |= self._withdrawn.pop(name, set())
        files = await asyncio.to_thread(scan_model, model_dir)
        try:
            if name in self._overrides:
                config, batch_given = self._overrides[name]
            else:
                config, batch_given = cfg.read_config(model_dir)
            policy = self._swap_policy(config)
            available = [v for v in files.versions if v not in entry.withdrawn]
            chosen, absent = cfg.select_versions(config, available)
            if not chosen and not absent:
                raise ModelLoadError(
                    f"no version directories (expected {name}/<number>/"
                    f"{config.default_model_filename or cfg.DEFAULT_MODEL_FILENAME})"
                )
        except ModelLoadError as exc:
            entry.error, entry.applied = str(exc), files
            self._failed(entry, None, str(exc))
            await self._changed()
            raise
        entry.error = ""
        entry.applied = files
        source = (config, batch_given)
        rebuild = [
            v
            for v in chosen
            if force
            or not (
                v in entry.versions
                and entry.versions[v].state == READY
                and entry.versions[v].files == files.version(v)
                and entry.versions[v].source == source
            )
        ]
        reuse = {
            v: model
            for v, (model, built_files, built_source) in (prebuilt or {}).items()
            if v in rebuild and built_files == files.version(v) and built_source == source
        }
        if rebuild and policy == "drain_first" and entry.ready_versions():
            await self._swap_drain_first(entry, source, files, chosen, rebuild, reuse)
        else:
            await self._swap_overlap(entry, source, files, chosen, rebuild, reuse)
        for version in entry.withdrawn & set(entry.versions):
            if entry.versions[version].state == UNAVAILABLE:
                entry.versions[version].reason = "rolled back"
        for version in absent:
            reason = "version_policy names this version; its directory is missing"
            entry.versions[version] = VersionState(version, UNAVAILABLE, reason)
            self._failed(entry, version, reason)
        await self._changed()
        failures = [
            f"version {v}: {entry.versions[v].reason}"
            for v in [*rebuild, *absent]
            if entry.versions[v].state != READY or entry.versions[v].reason
        ]
        if failures:
            raise ModelLoadError(f"failed to load '{name}': " + "; ".join(failures))

    def _swap_policy(self, config: mc.ModelConfig) -> str:
        value = self._settings.swap_policy
        if "swap_policy" in config.parameters:
            value = config.parameters["swap_policy"].string_value.strip()
        if value not in SWAP_POLICIES:
            raise ModelLoadError(f"config.pbtxt parameters: swap_policy {value!r}: {SWAP_POLICIES}")
        return value

    async def _build(
        self,
        entry: ModelEntry,
        source: tuple[mc.ModelConfig, bool],
        versions: list[int],
        model_dir: Path | None = None,
        reuse: Mapping[int, ModelVersion] | None = None,
    ) -> dict[int, ModelVersion | str]:
        """Build each version on the loader thread: a ModelVersion, or the reason it failed."""
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
                built = await self._in_loader(
                    build_version,
                    model_dir,
                    version,
                    source[0],
                    source[1],
                    self._settings,
                    self._priority,
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
            log.info(
                "model.loaded",
                model=entry.name,
                version=version,
                provider=built.provider,
                max_batch_size=built.max_batch_size,
                instances=cfg.instance_count(built.config),
                inline=built.scheduler.policy.inline,
                intra_op_threads=built.intra_op_threads,
                execution=built.execution_mode,
                warmup_runs=built.warmup_runs,
                seconds=round(time.monotonic() - started, 3),
            )
        return results

    def _install(
        self,
        entry: ModelEntry,
        source: tuple[mc.ModelConfig, bool],
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
                self._failed(entry, version, result)
                continue
            if state is not None and state.model is not None:
                replaced.append(state.model)
            entry.versions[version] = VersionState(
                version, READY, model=result, files=files.version(version), source=source
            )
        return replaced

    def _retire(self, entry: ModelEntry, versions: list[int], reason: str) -> list[VersionState]:
        """One synchronous step: these versions stop taking requests."""
        retired = []
        for version in versions:
            state = entry.versions[version]
            if state.state == READY:
                state.state, state.reason = UNLOADING, reason
                retired.append(state)
        return retired

    async def _release(self, retiring: list[VersionState], replaced: list[ModelVersion]) -> None:
        """Wait for the retired versions' admitted requests, then free them."""
        await asyncio.gather(
            *(s.model.close() for s in retiring if s.model is not None),
            *(m.close() for m in replaced),
        )
        for state in retiring:
            if state.state == UNLOADING:
                state.state, state.model = UNAVAILABLE, None

    @staticmethod
    def _swap_start(entry: ModelEntry) -> tuple[list[int], float, int]:
        """(versions serving, start time, resident memory) of a swap; its memory peak starts."""
        memory.reset_peak()
        return [m.version for m in entry.ready_versions()], time.monotonic(), memory.rss_bytes()

    async def _swap_overlap(
        self,
        entry: ModelEntry,
        source: tuple[mc.ModelConfig, bool],
        files: ModelFiles,
        chosen: list[int],
        rebuild: list[int],
        reuse: Mapping[int, ModelVersion],
    ) -> None:
        before, started, rss_before = self._swap_start(entry)
        results = await self._build(entry, source, rebuild, reuse=reuse)
        # The step: new versions serve and the unchosen stop, together, or nothing retires.
        replaced = self._install(entry, source, files, results)
        retiring: list[VersionState] = []
        if any(entry.versions[v].state == READY for v in chosen):
            unchosen = [s.version for s in entry.states() if s.version not in chosen]
            retiring = self._retire(entry, unchosen, "unloaded: replaced by a newer version")
        await self._changed()
        await self._release(retiring, replaced)
        changed = replaced or retiring or any(isinstance(r, ModelVersion) for r in results.values())
        if before and changed:  # a first load is no swap
            self._swapped(entry, "overlap", before, 0.0, started, rss_before)

    async def _swap_drain_first(
        self,
        entry: ModelEntry,
        source: tuple[mc.ModelConfig, bool],
        files: ModelFiles,
        chosen: list[int],
        rebuild: list[int],
        reuse: Mapping[int, ModelVersion],
    ) -> None:
        before, started, rss_before = self._swap_start(entry)
        serving = entry.ready_versions()
        entry.gate = asyncio.Event()
        entry.gate_limit = max(
            level.max_queue_size for m in serving for level in m.scheduler.policy.levels
        )
        try:
            old = {
                s.version: (s.source, s.files)
                for s in entry.states()
                if s.state == READY and (s.version not in chosen or s.version in rebuild)
            }
            retiring = self._retire(entry, list(old), "unloaded: replaced (drain_first)")
            await self._changed()
            await self._release(retiring, [])
            results = await self._build(entry, source, rebuild, reuse=reuse)
            self._install(entry, source, files, results)
            restored = not any(entry.versions[v].state == READY for v in chosen)
            if restored:
                # Nothing new serves: bring the old versions back, each as it was built.
                log.warning("model.swap_restoring", model=entry.name, versions=sorted(old))
                for version, (old_source, old_files) in old.items():
                    if old_source is None:
                        continue
                    rebuilt = await self._build(entry, old_source, [version])
                    self._install(entry, old_source, ModelFiles((), {version: old_files}), rebuilt)
        finally:
            entry.gate.set()
            entry.gate = None
        pause = time.monotonic() - started
        self._swapped(entry, "drain_first", before, pause, started, rss_before, restored)

    def _swapped(
        self,
        entry: ModelEntry,
        policy: str,
        before: list[int],
        pause: float,
        started: float,
        rss_before: int,
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
            versions_before=before,
            versions=[m.version for m in entry.ready_versions()],
            pause_seconds=round(pause, 4),
            peak_rss_bytes=peak,
            rss_before_bytes=rss_before,
            seconds=round(time.monotonic() - started, 3),
        )

    def _failed(self, entry: ModelEntry, version: int | None, reason: str) -> None:
        entry.lifecycle.load_failures += 1
        log.error("model.load_failed", model=entry.name, version=version, reason=reason)

    async def _unload(self, entry: ModelEntry, reason: str) -> None:
        retiring = self._retire(entry, [s.version for s in entry.states()], reason)
        await self._changed()
        await self._release(retiring, [])
        for state in retiring:
            state.reason = reason
        log.info("model.unloaded", model=entry.name, versions=[s.version for s in retiring])
        await self._changed()

    async def _push(
        self,
        name: str,
        stage: Callable[[], Path],
        versions: list[int],
        model_files: list[str],
        size: int,
    ) -> dict[int, Prebuilt]:
        """Stage the files (`stage` writes them, `size` bytes, to a staging model directory),
        build every staged version from there (it must load, warm and pass its golden check),
        then install them into the repository. Returns the built versions, which serve as they
        are when the load that follows selects them."""
        try:
            staged = await self._in_loader(stage)
        except OSError as exc:
            if DiskFull.caused(exc):
                raise DiskFull(self._repository, size, f"staging '{name}'") from exc
            raise FailedPrecondition(f"cannot write to the model repository: {exc}") from exc
        try:
            config, batch_given = await asyncio.to_thread(cfg.read_config, staged)
            trial = self._registry.find(name) or ModelEntry(name)
            probe = ModelEntry(name, lifecycle=trial.lifecycle)
            results = await self._build(probe, (config, batch_given), versions, staged)
            staged_files = await asyncio.to_thread(scan_model, staged)
            built = {
                v: (r, staged_files.version(v), (config, batch_given))
                for v, r in results.items()
                if isinstance(r, ModelVersion)
            }
            failed = {v: r for v, r in results.items() if isinstance(r, str)}
            if failed:
                for model, _, _ in built.values():
                    await model.close()
                for version, reason in failed.items():
                    self._failed(trial, version, reason)
                raise ModelLoadError(
                    f"failed to load '{name}' from the pushed files: "
                    + "; ".join(f"version {v}: {r}" for v, r in sorted(failed.items()))
                )
            try:
                await self._in_loader(failpoints.reach, "install.staged")
                await self._in_loader(
                    staging.install, staged, self._repository, versions, model_files
                )
                await self._in_loader(failpoints.reach, "install.renamed")
            except OSError as exc:
                for model, _, _ in built.values():
                    await model.close()
                if DiskFull.caused(exc):
                    raise DiskFull(self._repository, size, f"installing '{name}'") from exc
                raise FailedPrecondition(
                    f"cannot install into the model repository: {exc}"
                ) from exc
        finally:
            await asyncio.to_thread(staging.discard, staged)
        log.info("model.files_installed", model=name, versions=versions)
        return built

    # -- poll mode ------------------------------------------------------------------------------

    async def _poll(self, first_scan: Mapping[str, ModelFiles]) -> None:
        tracker = StabilityTracker(first_scan)
        while True:
            await asyncio.sleep(self._settings.repository_poll_secs)
            try:
                await self.poll_once(tracker)
            except Exception:  # one bad scan must not end polling
                log.exception("repository.poll_failed")

    async def poll_once(self, tracker: StabilityTracker) -> None:
        scan = await asyncio.to_thread(scan_repository, self._repository)
        applied = {e.name: e.applied for e in self._registry.entries()}
        decision = tracker.decide(scan, applied)
        for name in decision.pending:
            log.info("repository.change_pending", model=name)
        for name in decision.load:
            async with self._lock(name):
                # A failure is logged and recorded; the other models go on.
                with contextlib.suppress(EdgeAgentError):
                    await self._load(name)
        for name in decision.unload:
            async with self._lock(name):
                if name not in model_dirs(self._repository):
                    await self._drop(name)

    async def _drop(self, name: str) -> None:
        """The model's directory is gone: unload it and forget it (caller holds its lock)."""
        entry = self._registry.find(name)
        if entry is not None:
            await self._unload(entry, "unloaded: removed from the repository")
            self._registry.remove(name)
            await self._changed()

    # -- rollbacks across restarts ----------------------------------------------------------------

    def _read_state(self) -> dict[str, set[int]]:
        if self._state_path is None or not self._state_path.exists():
            return {}
        try:
            data = json.loads(self._state_path.read_text())
            return {str(k): {int(v) for v in vs} for k, vs in data["withdrawn"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("lifecycle.state_unreadable", path=str(self._state_path), error=str(exc))
            return {}

    def _write_state(self) -> None:
        """Persist the rollbacks; a state directory that cannot be written is logged (the
        rollback itself has happened and serves; it will not survive a restart)."""
        if self._state_path is None:
            return
        withdrawn = {e.name: sorted(e.withdrawn) for e in self._registry.entries() if e.withdrawn}
        withdrawn.update({k: sorted(v) for k, v in self._withdrawn.items() if v})
        try:
            write_atomically(self._state_path, json.dumps({"withdrawn": withdrawn}).encode())
        except OSError as exc:
            log.error("lifecycle.state_unwritable", path=str(self._state_path), error=str(exc))
