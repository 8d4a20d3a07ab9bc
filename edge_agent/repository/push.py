"""Pushed files, a RepositoryModelLoad's inline files or a synced release: staged, built from the
staging directory (every version must load, warm and pass its golden check there), and only then
installed into the repository. A push that fails at any step leaves the repository as it was, and
its staging directory is removed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from pathlib import Path

from edge_agent.common import failpoints
from edge_agent.errors import DiskFull, EdgeAgentError, FailedPrecondition, ModelLoadError
from edge_agent.observability.logging import get_logger
from edge_agent.repository import config as cfg
from edge_agent.repository import staging
from edge_agent.repository.registry import ModelEntry, ModelRegistry
from edge_agent.repository.scan import scan_model
from edge_agent.repository.swap import Prebuilt, Swapper
from edge_agent.repository.version import ModelVersion

log = get_logger(__name__)


class Pusher:
    def __init__(self, repository: Path, registry: ModelRegistry, swaps: Swapper) -> None:
        self._repository = repository
        self._registry = registry
        self._swaps = swaps

    async def push(
        self,
        name: str,
        stage: Callable[[], Path],
        versions: list[int],
        model_files: list[str],
        size: int,
    ) -> dict[int, Prebuilt]:
        """Stage the files (`stage` writes them, `size` bytes, to a staging model directory),
        build every staged version from there, then install them and the model-level files
        named in `model_files` into the repository. Returns the built versions, which serve as
        they are when the load that follows selects them."""
        staged = await self._stage(name, stage, size)
        try:
            built = await self._build_staged(name, staged, versions)
            await self._install(name, staged, versions, model_files, size, built)
        finally:
            await asyncio.to_thread(staging.discard, staged)
        log.info("model.files_installed", model=name, versions=versions)
        return built

    async def _stage(self, name: str, stage: Callable[[], Path], size: int) -> Path:
        try:
            return await self._swaps.in_loader(stage)
        except OSError as exc:
            raise _repository_error(
                exc,
                self._repository,
                size,
                f"staging '{name}'",
                "cannot write to the model repository",
            ) from exc

    async def _build_staged(
        self, name: str, staged: Path, versions: list[int]
    ) -> dict[int, Prebuilt]:
        """Every version built, or none: one that fails closes the others and raises."""
        config, batch_given = await asyncio.to_thread(cfg.read_config, staged)
        trial = self._registry.find(name) or ModelEntry(name)
        # Built apart from the serving entry (its table does not change), counted with it.
        probe = ModelEntry(name, lifecycle=trial.lifecycle)
        results = await self._swaps.build(probe, (config, batch_given), versions, staged)
        staged_files = await asyncio.to_thread(scan_model, staged)
        built = {
            v: (r, staged_files.version(v), (config, batch_given))
            for v, r in results.items()
            if isinstance(r, ModelVersion)
        }
        failed = {v: r for v, r in results.items() if isinstance(r, str)}
        if failed:
            await _close(built.values())
            for version, reason in failed.items():
                self._swaps.failed(trial, version, reason)
            raise ModelLoadError(
                f"failed to load '{name}' from the pushed files: "
                + "; ".join(f"version {v}: {r}" for v, r in sorted(failed.items()))
            )
        return built

    async def _install(
        self,
        name: str,
        staged: Path,
        versions: list[int],
        model_files: list[str],
        size: int,
        built: dict[int, Prebuilt],
    ) -> None:
        try:
            await self._swaps.in_loader(failpoints.reach, "install.staged")
            await self._swaps.in_loader(
                staging.install, staged, self._repository, versions, model_files
            )
            await self._swaps.in_loader(failpoints.reach, "install.renamed")
        except OSError as exc:
            await _close(built.values())
            raise _repository_error(
                exc,
                self._repository,
                size,
                f"installing '{name}'",
                "cannot install into the model repository",
            ) from exc


def _repository_error(
    exc: OSError, repository: Path, size: int, doing: str, refusal: str
) -> EdgeAgentError:
    """A failed write into the repository: DiskFull when the disk is full, else `refusal` with
    the reason."""
    if DiskFull.caused(exc):
        return DiskFull(repository, size, doing)
    return FailedPrecondition(f"{refusal}: {exc}")


async def _close(built: Iterable[Prebuilt]) -> None:
    for model, _, _ in built:
        await model.close()
