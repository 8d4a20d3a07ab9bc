"""Model lifecycle: load, reload, unload, roll back and poll, without failing a request.

ModelManager is the one object the agent, its front ends and the sync hold to change which model
versions serve. It parses what is asked, holds the model's lock for every operation (each runs on
the event loop, to its end even when the caller goes away) and drives the modules that do the
work: swap.py (build, activate, retire, release; the swap policies), push.py (pushed files),
rollback.py (withdrawn versions, persisted), poll.py (poll mode).

Words, each with one meaning here and in those modules:
- stage: write files into a staging directory on the repository's filesystem (staging.py): the
  inline files of a RepositoryModelLoad, or the directory of a release the sync assembled.
- build: make a ModelVersion from a version directory (sessions, warmup, golden check;
  version.py), on the one loader thread, off the serving path.
- install: move staged version directories into the repository, fsynced, by rename
  (staging.install). An installed version directory is never changed in place; a version the
  sync reports "installed" is one it installed so.
- activate: make built versions the ones that serve, in one synchronous step of the event loop
  (swap.py). The versions they replace are retired in that same step (they take no new request)
  and released once their admitted requests have finished.
- load: bring a model to what its files and version policy say: build what changed, activate it,
  retire the rest. A push (files given with a load, or a synced release: `load_release`) is
  staged, built and installed first, and the load then activates the versions it built.
- withdraw: a rolled-back version stays on disk and does not serve (rollback.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from google.protobuf import json_format, text_format

from edge_agent._proto import model_config_pb2 as mc
from edge_agent.common.layout import CONFIG_FILE, MODEL_FILE
from edge_agent.errors import (
    EdgeAgentError,
    InvalidArgument,
    ModelLoadError,
    NotFound,
    Unavailable,
)
from edge_agent.observability.logging import get_logger
from edge_agent.repository import config as cfg
from edge_agent.repository import staging
from edge_agent.repository.ensemble import ensemble_names, ensembles_using, is_ensemble
from edge_agent.repository.poll import RepositoryPoller
from edge_agent.repository.push import Pusher
from edge_agent.repository.registry import (
    READY,
    UNAVAILABLE,
    ModelEntry,
    ModelRegistry,
    VersionState,
)
from edge_agent.repository.rollback import Rollbacks
from edge_agent.repository.scan import ModelFiles, model_dirs, scan_model, scan_repository
from edge_agent.repository.swap import Prebuilt, Swapper, plan_swap
from edge_agent.repository.version import ModelVersion, Source
from edge_agent.settings import SWAP_POLICIES, Settings

log = get_logger(__name__)

ROLLBACK_PARAMETER = "rollback"


@dataclasses.dataclass(frozen=True)
class LoadRequest:
    """What a RepositoryModelLoad asks, parsed (by api/dataplane.py load_request, whatever the
    transport)."""

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
    """Every change to which versions of a model serve (see the module doc)."""

    def __init__(self, settings: Settings, registry: ModelRegistry) -> None:
        self._settings = settings
        self._repository = settings.model_repository
        self._registry = registry
        self._locks: dict[str, asyncio.Lock] = {}
        self._listeners: list[Callable[[], Awaitable[None]]] = []
        self._operations: set[asyncio.Future[None]] = set()  # detached operations
        self._overrides: dict[str, Source] = {}  # in-memory config parameters, by model
        self._swaps = Swapper(settings, self._changed, registry)
        # Ensembles that did not load because a step model did not serve: loaded again once
        # one of their step models loads.
        self._waiting_ensembles: set[str] = set()
        self._rechecking: set[str] = set()  # models whose ensembles are being checked again
        self._pusher = Pusher(self._repository, registry, self._swaps)
        self._rollbacks = Rollbacks(
            settings.state_dir, self._repository, registry, self._swaps, self._load
        )
        self._poller = RepositoryPoller(
            self._repository,
            registry,
            lambda: self._settings.repository_poll_secs,
            self._reload,
            self._drop_if_gone,
        )

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

    # -- start and stop -------------------------------------------------------------------------

    async def start(self) -> None:
        """The loads at start, by mode; then polling in poll mode."""
        if not self._swaps.priority.enabled:
            reason = self._swaps.priority.disabled_reason
            log.warning("lifecycle.loader_priority_unchanged", reason=reason)
        staging.clean_staging(self._repository)
        first_scan = await asyncio.to_thread(scan_repository, self._repository)
        names = sorted(first_scan)
        if self.mode == "explicit":
            wanted = set(self._settings.load_model)
            names = names if "*" in wanted else sorted(wanted)
        # Ensembles after the models they run (their check reads what serves).
        ensembles = set(await asyncio.to_thread(ensemble_names, self._repository))
        names.sort(key=lambda name: name in ensembles)
        for name in names:
            try:
                await self.load(name, LoadRequest(), at_start=True)
            except NotFound as exc:
                log.error("model.load_failed", model=name, reason=str(exc))
            except EdgeAgentError:
                pass  # recorded and logged; the other models go on
        if self.mode == "poll":
            self._poller.start(first_scan)

    async def stop(self) -> None:
        """Stop polling (a load in progress finishes on its thread, unused)."""
        await self._poller.stop()
        self._swaps.shutdown()

    # -- the operations -------------------------------------------------------------------------

    async def _detached(self, operation: Awaitable[None]) -> None:
        """Run an operation to its end even if the caller goes away (an RPC deadline or a
        cancelled client must not leave a swap half done), and wait for it."""
        task = asyncio.ensure_future(operation)
        self._operations.add(task)
        task.add_done_callback(self._operations.discard)
        await asyncio.shield(task)

    async def load(self, name: str, request: LoadRequest, at_start: bool = False) -> None:
        """Load or reload `name` from the repository (or from pushed files, or roll it back:
        the newest version older than the one serving serves, and that one is withdrawn until an
        explicit load). Raises the reason when the model or a version it should serve failed."""
        await self._detached(self._load_request(name, request, at_start))

    async def _load_request(self, name: str, request: LoadRequest, at_start: bool) -> None:
        staging.check_model_name(name)
        if request.rollback:
            if request.files or request.config_json:
                raise InvalidArgument("'rollback' cannot be combined with 'config' or files")
            async with self._lock(name):
                await self._rollbacks.roll_back(name)
            return
        if self.mode != "explicit" and not at_start:
            raise Unavailable(
                f"explicit model load / unload is not allowed in model control mode "
                f"'{self.mode}' (start the agent with --model-control-mode explicit)"
            )
        override: Source | None = None
        config_text = None
        if request.config_json is not None:
            config, batch_given, config_text = config_from_json(request.config_json, name)
            override = (config, batch_given)
        async with self._lock(name):
            self._rollbacks.undo(name)
            prebuilt: dict[int, Prebuilt] = {}
            if request.files:
                prebuilt = await self._push_files(name, request.files, config_text)
                override = None  # the config is config.pbtxt now
            if override is None:
                self._overrides.pop(name, None)
            else:
                self._overrides[name] = override
            if not (self._repository / name).is_dir():
                self._registry.remove(name)
                await self._close_unused(name, prebuilt)
                raise NotFound(f"no model '{name}' in the repository")
            await self._load_prebuilt(name, prebuilt)

    async def _push_files(
        self, name: str, files: Mapping[int, Mapping[str, bytes]], config_text: str | None
    ) -> dict[int, Prebuilt]:
        """A load's inline files (and its config, as config.pbtxt) staged, built, installed."""
        return await self._pusher.push(
            name,
            lambda: staging.stage(self._repository, name, files, config_text),
            sorted(files),
            [CONFIG_FILE] if config_text is not None else [],
            sum(len(content) for each in files.values() for content in each.values()),
        )

    async def unload(self, name: str, dependents: bool = False) -> None:
        """Unload `name`; with `dependents` (Triton's unload_dependents), also the ensembles
        that run it."""
        await self._detached(self._unload_request(name))
        if dependents:
            using = await asyncio.to_thread(ensembles_using, self._repository, name)
            for ensemble in using:
                await self._detached(self._unload_request(ensemble))
        await self._recheck_ensembles(name)

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
            self._waiting_ensembles.discard(name)
            await self._swaps.unload(entry, "unloaded")

    async def load_release(self, name: str, version: int, directory: Path) -> None:
        """Serve `directory` (a release's verified files, assembled by the sync, which gives
        them up) as `version` of `name`: staged, built, warmed and checked there, installed,
        then loaded. Allowed in every model control mode."""
        await self._detached(self._load_release(name, version, directory))

    async def _load_release(self, name: str, version: int, directory: Path) -> None:
        staging.check_model_name(name)
        async with self._lock(name):
            # A release that carries the model's config.pbtxt / warmup/ installs them too.
            prebuilt = await self._pusher.push(
                name,
                lambda: staging.stage_directory(self._repository, name, version, directory),
                [version],
                staging.model_files_of(directory),
                staging.tree_size(directory),
            )
            self._registry.ensure(name).withdrawn.discard(version)
            await self._load_prebuilt(name, prebuilt)
            self._rollbacks.save()

    async def adopt(self, name: str, version: int) -> None:
        """Serve `version`, already in the repository with the files its installer checked (an
        install cut off between the rename and its record), as `load_release` would have: its
        own config.pbtxt / warmup/, not withdrawn, loaded by the model's version policy."""
        staging.check_model_name(name)
        await self._detached(self._locked(name, self._rollbacks.adopt(name, version)))

    async def serve_only_up_to(self, name: str, version: int) -> None:
        """Serve `version` (on disk already) as the newest: newer versions on disk are withdrawn
        (a rollback, persisted), this one and older ones are not. Allowed in every mode."""
        staging.check_model_name(name)
        await self._detached(self._locked(name, self._rollbacks.serve_only_up_to(name, version)))

    async def _locked(self, name: str, operation: Awaitable[None]) -> None:
        async with self._lock(name):
            await operation

    async def reconfigure(self, settings: Settings, rebuild: bool) -> None:
        """New settings (a SIGHUP reload): reload every model on disk through the hot-swap path,
        unload models no longer on disk (in explicit mode only the loaded models are reloaded).
        Versions whose files and config did not change are kept unless `rebuild` (settings that
        builds read changed)."""
        self._settings = settings
        self._swaps.settings = settings
        on_disk = await asyncio.to_thread(model_dirs, self._repository)
        loaded = {e.name for e in self._registry.entries() if e.ready_versions()}
        names = loaded if self.mode == "explicit" else set(on_disk) | loaded
        for name in sorted(names):
            if name in on_disk:
                await self._reload(name, force=rebuild)
            else:
                async with self._lock(name):
                    await self._drop(name)
        await self._changed()

    def activity(self) -> tuple[int, int]:
        """(requests queued or running, requests finished so far), every model together."""
        return self._registry.activity()

    def versions(self) -> list[ModelVersion]:
        """Every loaded version (any thread: the registry's table is locked)."""
        return self._registry.versions()

    def serving_version(self, name: str) -> int:
        """The newest version of `name` serving now (0: none)."""
        entry = self._registry.find(name)
        ready = entry.ready_versions() if entry is not None else []
        return ready[-1].version if ready else 0

    # -- loading --------------------------------------------------------------------------------

    async def _reload(self, name: str, force: bool = False) -> None:
        """Load the model again; a failure is recorded and logged, and the other models go on."""
        async with self._lock(name):
            with contextlib.suppress(EdgeAgentError):
                await self._load(name, force=force)

    async def _drop_if_gone(self, name: str) -> None:
        async with self._lock(name):
            if name not in model_dirs(self._repository):
                await self._drop(name)

    async def _drop(self, name: str) -> None:
        """The model's directory is gone: unload it and forget it (caller holds its lock)."""
        entry = self._registry.find(name)
        if entry is not None:
            await self._swaps.unload(entry, "unloaded: removed from the repository")
            self._registry.remove(name)
            await self._changed()
            await self._recheck_ensembles(name)

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
        entry = self._registry.ensure(name)
        entry.withdrawn |= self._rollbacks.take_persisted(name)
        files = await asyncio.to_thread(scan_model, self._repository / name)
        try:
            source, policy, chosen, absent = self._select(entry, files)
        except ModelLoadError as exc:
            entry.error, entry.applied = str(exc), files
            self._swaps.failed(entry, None, str(exc))
            await self._changed()
            raise
        entry.error = ""
        entry.applied = files
        plan = plan_swap(entry, source, files, chosen, prebuilt or {}, force)
        await self._swaps.swap(entry, plan, policy)
        self._mark_unserved(entry, absent)
        await self._changed()
        failures = [
            f"version {v}: {entry.versions[v].reason}"
            for v in [*plan.rebuild, *absent]
            if entry.versions[v].state != READY or entry.versions[v].reason
        ]
        if is_ensemble(source[0]):
            if failures:
                self._waiting_ensembles.add(name)
                served = entry.ready_versions()
                if served:  # checked again after a step changed: the old build may not serve
                    await self._swaps.unload(entry, _unserved(entry.versions[served[-1].version]))
            else:
                self._waiting_ensembles.discard(name)
        if entry.ready_versions():
            await self._recheck_ensembles(name)
        if failures:
            raise ModelLoadError(f"failed to load '{name}': " + "; ".join(failures))

    async def _recheck_ensembles(self, step: str) -> None:
        """`step` changed (loaded, swapped, unloaded): the ensembles that run it and were loaded
        or waiting for it are checked again against what serves now, each under its own lock
        (a waiting one loads; a loaded one whose step went away or changed its tensors stops
        serving, with the reason). Locks go from a step to its ensembles only."""
        if not self._waiting_ensembles and not any(
            is_ensemble(v.config) for v in self._registry.versions()
        ):
            return  # no ensemble to check: no need to read every config.pbtxt on each load
        using = await asyncio.to_thread(ensembles_using, self._repository, step)
        self._rechecking.add(step)
        try:
            for name in using:
                entry = self._registry.find(name)
                known = name in self._waiting_ensembles or bool(entry and entry.ready_versions())
                if known and name not in self._rechecking:
                    await self._reload(name, force=True)
        finally:
            self._rechecking.discard(step)

    def _select(
        self, entry: ModelEntry, files: ModelFiles
    ) -> tuple[Source, str, list[int], list[int]]:
        """(the config, the swap policy, the versions the version policy chooses among those
        on disk and not withdrawn, those it names that have no directory); raises
        ModelLoadError."""
        if entry.name in self._overrides:
            source = self._overrides[entry.name]
        else:
            source = cfg.read_config(self._repository / entry.name)
        config = source[0]
        policy = self._swap_policy(config)
        available = [v for v in files.versions if v not in entry.withdrawn]
        chosen, absent = cfg.select_versions(config, available)
        if not chosen and not absent:
            inside = "" if is_ensemble(config) else config.default_model_filename or MODEL_FILE
            raise ModelLoadError(
                f"no version directories (expected {entry.name}/<number>/{inside})"
            )
        return source, policy, chosen, absent

    def _mark_unserved(self, entry: ModelEntry, absent: list[int]) -> None:
        """Say why the withdrawn versions and the missing ones named by the policy do not
        serve."""
        for version in entry.withdrawn & set(entry.versions):
            if entry.versions[version].state == UNAVAILABLE:
                entry.versions[version].reason = "rolled back"
        for version in absent:
            reason = "version_policy names this version; its directory is missing"
            entry.versions[version] = VersionState(version, UNAVAILABLE, reason)
            self._swaps.failed(entry, version, reason)

    def _swap_policy(self, config: mc.ModelConfig) -> str:
        value = self._settings.swap_policy
        if "swap_policy" in config.parameters:
            value = config.parameters["swap_policy"].string_value.strip()
        if value not in SWAP_POLICIES:
            raise ModelLoadError(f"config.pbtxt parameters: swap_policy {value!r}: {SWAP_POLICIES}")
        return value


def _unserved(state: VersionState) -> str:
    """Why an ensemble's build that served stops: its check failed against the steps now."""
    return "unloaded: " + state.reason.removeprefix("reload failed, the previous build serves: ")
