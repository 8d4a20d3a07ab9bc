"""Rollbacks: versions withdrawn from serving, and the state file that keeps them across restarts.

A rolled-back version stays on disk but is withdrawn: no load serves it until an explicit load
of the model, or a sync that installs or adopts it; a newer version put on disk serves as usual.
With --state-dir
the withdrawals are written to STATE_DIR/lifecycle.json after each change and read at start; a
model not loaded yet keeps its persisted withdrawals until its first load takes them.

Serving an older version also makes its config.pbtxt and warmup/ the model's again when its
version directory carries copies (a synced release's: staging.restore_model_files), so it serves
with the config it was published with.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

from edge_agent.common.files import write_atomically
from edge_agent.errors import FailedPrecondition, NotFound
from edge_agent.observability.logging import get_logger
from edge_agent.repository import staging
from edge_agent.repository.registry import READY, ModelRegistry
from edge_agent.repository.scan import scan_model
from edge_agent.repository.swap import Swapper

log = get_logger(__name__)

STATE_FILE = "lifecycle.json"


class Rollbacks:
    """The withdrawn versions and the operations that change them. Each operation's caller holds
    the model's lock; `load` brings a model to what its files say (ModelManager's)."""

    def __init__(
        self,
        state_dir: Path | None,
        repository: Path,
        registry: ModelRegistry,
        swaps: Swapper,
        load: Callable[[str], Awaitable[None]],
    ) -> None:
        self._state_path = state_dir / STATE_FILE if state_dir else None
        self._repository = repository
        self._registry = registry
        self._swaps = swaps
        self._load = load
        self._persisted = self._read()  # withdrawals of models not loaded since the start

    def take_persisted(self, name: str) -> set[int]:
        """The model's withdrawals read at start, for its first load (then empty)."""
        return self._persisted.pop(name, set())

    def undo(self, name: str) -> None:
        """An explicit load of the model: what its rollbacks withdrew may serve again."""
        entry = self._registry.find(name)
        if entry is not None and entry.withdrawn:
            entry.withdrawn.clear()
            self.save()

    async def roll_back(self, name: str) -> None:
        """Serve the newest version older than the one serving now, through the same swap path;
        the version that served is withdrawn (kept when the rollback fails)."""
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
        await self._restore_model_files(name, max(earlier))
        try:
            await self._load(name)
        finally:
            if entry.versions.get(current) and entry.versions[current].state == READY:
                entry.withdrawn.discard(current)  # the rollback failed: it still serves
                await self._restore_model_files(name, current)
        self.save()
        log.info("model.rolled_back", model=name, from_version=current)

    async def adopt(self, name: str, version: int) -> None:
        """Serve `version`, in the repository already with the files its installer checked, as
        if it had just been installed: its own config.pbtxt / warmup/, not withdrawn."""
        if not (self._repository / name / str(version)).is_dir():
            raise NotFound(f"model '{name}' has no version {version} on disk")
        self._registry.ensure(name).withdrawn.discard(version)
        self._persisted.get(name, set()).discard(version)
        await self._serve_from(name, version)

    async def serve_only_up_to(self, name: str, version: int) -> None:
        """Serve `version` (on disk already) as the newest: newer versions on disk are
        withdrawn, this one and older ones are not."""
        on_disk = (await asyncio.to_thread(scan_model, self._repository / name)).versions
        if version not in on_disk:
            raise NotFound(f"model '{name}' has no version {version} on disk")
        self._registry.ensure(name).withdrawn = {v for v in on_disk if v > version}
        self._persisted.pop(name, None)
        await self._serve_from(name, version)

    async def _serve_from(self, name: str, version: int) -> None:
        """Load the model with `version`'s model-level files, and persist what it withdrew."""
        await self._restore_model_files(name, version)
        await self._load(name)
        self.save()

    async def _restore_model_files(self, name: str, version: int) -> None:
        await self._swaps.in_loader(staging.restore_model_files, self._repository / name, version)

    # -- the state file -------------------------------------------------------------------------

    def _read(self) -> dict[str, set[int]]:
        if self._state_path is None or not self._state_path.exists():
            return {}
        try:
            data = json.loads(self._state_path.read_text())
            return {str(k): {int(v) for v in vs} for k, vs in data["withdrawn"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("lifecycle.state_unreadable", path=str(self._state_path), error=str(exc))
            return {}

    def save(self) -> None:
        """Persist the withdrawals; a state directory that cannot be written is logged (the
        rollback itself has happened and serves; it will not survive a restart)."""
        if self._state_path is None:
            return
        withdrawn = {e.name: sorted(e.withdrawn) for e in self._registry.entries() if e.withdrawn}
        withdrawn.update({k: sorted(v) for k, v in self._persisted.items() if v})
        try:
            write_atomically(self._state_path, json.dumps({"withdrawn": withdrawn}).encode())
        except OSError as exc:
            log.error("lifecycle.state_unwritable", path=str(self._state_path), error=str(exc))
