"""The model registry: scans the repository (Triton's layout), loads each version off the serving
path, and answers which version serves a request. A model that fails to load is recorded with its
reason and never stops the others."""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent._proto import model_config_pb2 as mc
from edge_agent.api.tensors import NUMPY_DTYPES
from edge_agent.errors import EdgeAgentError, ModelLoadError, NotFound, Unavailable
from edge_agent.observability.logging import get_logger
from edge_agent.repository import config as cfg
from edge_agent.runtime.external_data import validate_external_data
from edge_agent.runtime.session import (
    LoadedSession,
    create_session,
    translate_run_error,
    warmup_feeds,
)
from edge_agent.scheduling.policy import SchedulerPolicy
from edge_agent.scheduling.scheduler import Scheduler
from edge_agent.scheduling.stats import ModelStats
from edge_agent.settings import Settings

log = get_logger(__name__)

READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"

# A model whose largest batch runs within this runs on the event loop (SchedulerPolicy.inline).
INLINE_BUDGET_S = 200e-6


class ModelVersion:
    """One loaded version: its completed config, its sessions, its scheduler and statistics."""

    def __init__(
        self,
        name: str,
        version: int,
        config: mc.ModelConfig,
        sessions: list[LoadedSession],
        policy: SchedulerPolicy,
    ) -> None:
        self.name, self.version, self.config = name, version, config
        self.inputs, self.outputs = cfg.tensor_specs(config)
        self.sessions = sessions
        # On CUDA each instance has its own session (one stream each); on CPU the instances
        # share one session, whose run() is thread-safe. A free instance always finds a session:
        # the scheduler never runs more executions than instances.
        self._free_sessions: queue.SimpleQueue[LoadedSession] = queue.SimpleQueue()
        for i in range(policy.instances):
            self._free_sessions.put(sessions[i % len(sessions)])
        self.stats = ModelStats()
        self.scheduler = Scheduler(f"{name}/{version}", policy, self.run, self.stats)

    @property
    def max_batch_size(self) -> int:
        return int(self.config.max_batch_size)

    @property
    def provider(self) -> str:
        return self.sessions[0].provider

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        """One execution on a free instance's session; ORT's errors become ours."""
        loaded = self._free_sessions.get()
        try:
            result: list[np.ndarray] = loaded.session.run(outputs, feeds)
        except Exception as exc:
            raise translate_run_error(exc, self.name) from exc
        finally:
            self._free_sessions.put(loaded)
        return result

    async def close(self) -> None:
        await self.scheduler.close()


@dataclasses.dataclass
class VersionState:
    version: int
    state: str
    reason: str = ""
    model: ModelVersion | None = None


@dataclasses.dataclass
class ModelEntry:
    name: str
    versions: dict[int, VersionState] = dataclasses.field(default_factory=dict)
    error: str = ""  # a model-level failure (bad config.pbtxt, no versions)

    def ready_versions(self) -> list[ModelVersion]:
        return [
            s.model
            for _, s in sorted(self.versions.items())
            if s.state == READY and s.model is not None
        ]


def scan_versions(model_dir: Path) -> list[int]:
    """Version directories: names that are non-negative integers."""
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


class ModelRegistry:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._repository = settings.model_repository
        self._models: dict[str, ModelEntry] = {}
        self._lock = threading.Lock()

    # -- loading --------------------------------------------------------------------------------

    def load_all(self) -> None:
        """Load every model of the repository; failures are recorded, never raised."""
        for model_dir in sorted(p for p in self._repository.iterdir() if p.is_dir()):
            if model_dir.name.startswith("."):
                continue
            self._load_model(model_dir)

    def _load_model(self, model_dir: Path) -> None:
        entry = ModelEntry(model_dir.name)
        with self._lock:
            self._models[entry.name] = entry
        try:
            config, batch_given = cfg.read_config(model_dir)
            available = scan_versions(model_dir)
            chosen, absent = cfg.select_versions(config, available)
            if not chosen and not absent:
                raise ModelLoadError(
                    f"no version directories (expected {model_dir.name}/<number>/"
                    f"{config.default_model_filename or cfg.DEFAULT_MODEL_FILENAME})"
                )
        except ModelLoadError as exc:
            entry.error = str(exc)
            log.error("model.load_failed", model=entry.name, reason=entry.error)
            return
        for version in absent:
            entry.versions[version] = VersionState(
                version, UNAVAILABLE, "version_policy names this version; its directory is missing"
            )
            log.error(
                "model.load_failed",
                model=entry.name,
                version=version,
                reason=entry.versions[version].reason,
            )
        for version in chosen:
            state = entry.versions[version] = VersionState(version, LOADING)
            started = time.monotonic()
            try:
                state.model = self._load_version(model_dir, version, config, batch_given)
            except ModelLoadError as exc:
                state.state, state.reason = UNAVAILABLE, str(exc)
                log.error("model.load_failed", model=entry.name, version=version, reason=str(exc))
                continue
            except Exception as exc:  # a bug or an ORT surprise must not stop the other models
                state.state, state.reason = UNAVAILABLE, f"unexpected error: {exc!r}"
                log.exception("model.load_failed", model=entry.name, version=version)
                continue
            state.state = READY
            log.info(
                "model.loaded",
                model=entry.name,
                version=version,
                provider=state.model.provider,
                max_batch_size=state.model.max_batch_size,
                instances=cfg.instance_count(state.model.config),
                inline=state.model.scheduler.policy.inline,
                seconds=round(time.monotonic() - started, 3),
            )

    def _load_version(
        self, model_dir: Path, version: int, config: mc.ModelConfig, batch_given: bool
    ) -> ModelVersion:
        filename = config.default_model_filename or cfg.DEFAULT_MODEL_FILENAME
        path = model_dir / str(version) / filename
        if not path.is_file():
            raise ModelLoadError(f"{version}/{filename} is missing")
        validate_external_data(path)
        options = cfg.runtime_options(self._settings, config)
        loaded = create_session(path, options)
        if loaded.fallback_reason:
            log.warning(
                "runtime.provider_fallback",
                model=model_dir.name,
                version=version,
                requested=list(options.providers),
                active=loaded.provider,
                reason=loaded.fallback_reason,
            )
        session = loaded.session
        complete = cfg.complete_config(
            config,
            [cfg.OrtTensor(a.name, a.type, _shape(a.shape)) for a in session.get_inputs()],
            [cfg.OrtTensor(a.name, a.type, _shape(a.shape)) for a in session.get_outputs()],
            self._settings.default_max_batch_size,
            batch_given,
        )
        policy = cfg.scheduler_policy(complete, self._settings)
        sessions = [loaded]
        if loaded.provider == "cuda":
            sessions += [create_session(path, options) for _ in range(policy.instances - 1)]
        inputs, _ = cfg.tensor_specs(complete)
        largest = 0.0
        for extra in sessions:
            largest = self._warm(extra.session, complete, inputs)
        inline = cfg.inline_execution(complete)
        if inline is None:
            inline = largest <= INLINE_BUDGET_S
        policy = dataclasses.replace(policy, inline=inline)
        return ModelVersion(model_dir.name, version, complete, sessions, policy)

    @staticmethod
    def _warm(session: Any, config: mc.ModelConfig, inputs: dict[str, cfg.TensorSpec]) -> float:
        """Inferences at batch 1 and at max_batch_size before READY, so no client pays for lazy
        initialisation; returns the best time of the largest batch, seconds."""
        sizes = [1, config.max_batch_size] if config.max_batch_size > 1 else [1]
        batch = [-1] if config.max_batch_size > 0 else []
        best = float("inf")
        for size in sizes:
            feeds = warmup_feeds(
                {
                    name: (str(NUMPY_DTYPES[spec.datatype]), [*batch, *spec.dims])
                    for name, spec in inputs.items()
                    if not spec.optional
                },
                batch=size,
            )
            best = float("inf")
            for _ in range(3):
                started = time.perf_counter()
                try:
                    session.run(None, feeds)
                except Exception as exc:
                    raise ModelLoadError(f"warmup inference failed: {exc}") from exc
                best = min(best, time.perf_counter() - started)
        return best

    # -- serving --------------------------------------------------------------------------------

    def get(self, name: str, version: str = "") -> ModelVersion:
        """The version to serve: the one named, or the newest ready one."""
        entry = self._models.get(name)
        if entry is None:
            raise NotFound(f"unknown model '{name}'")
        if entry.error:
            raise Unavailable(f"model '{name}' failed to load: {entry.error}")
        if version:
            if not version.isdigit() or int(version) not in entry.versions:
                raise NotFound(f"model '{name}' has no version '{version}'")
            state = entry.versions[int(version)]
            if state.model is None or state.state != READY:
                raise Unavailable(
                    f"model '{name}' version {version} is {state.state}: {state.reason}"
                )
            return state.model
        ready = entry.ready_versions()
        if not ready:
            reasons = entry.error or "; ".join(
                f"version {v}: {s.reason}" for v, s in sorted(entry.versions.items())
            )
            raise Unavailable(f"model '{name}' has no ready version ({reasons})")
        return ready[-1]

    def is_ready(self, name: str, version: str = "") -> bool:
        try:
            self.get(name, version)
        except EdgeAgentError:
            return False
        return True

    def entry(self, name: str) -> ModelEntry:
        entry = self._models.get(name)
        if entry is None:
            raise NotFound(f"unknown model '{name}'")
        return entry

    def entries(self) -> list[ModelEntry]:
        with self._lock:
            return sorted(self._models.values(), key=lambda e: e.name)

    def versions(self) -> list[ModelVersion]:
        """Every loaded version, for statistics and metrics."""
        return [
            s.model
            for entry in self.entries()
            for _, s in sorted(entry.versions.items())
            if s.model is not None
        ]

    async def close(self) -> None:
        """Let every scheduler finish what it admitted, then stop its threads."""
        await asyncio.gather(*(model.close() for model in self.versions()))


def _shape(shape: Any) -> tuple[int | None, ...]:
    # ORT reports symbolic dims as strings and unknown ones as None.
    if not isinstance(shape, list | tuple):
        return ()
    return tuple(d if isinstance(d, int) and d >= 0 else None for d in shape)
