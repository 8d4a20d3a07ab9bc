"""Poll mode: the repository is scanned every `repository_poll_secs`; a model whose files changed
is loaded again once they are stable across two scans (scan.py's StabilityTracker, so a copy in
progress is never loaded half made), and a model whose directory is gone is unloaded. One bad
scan is logged and polling goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from edge_agent.observability.logging import get_logger
from edge_agent.repository.registry import ModelRegistry
from edge_agent.repository.scan import ModelFiles, StabilityTracker, scan_repository

log = get_logger(__name__)


class RepositoryPoller:
    """`reload` loads a model again (its failure recorded, not raised); `drop_if_gone` unloads
    and forgets a model whose directory is gone (ModelManager's, which take the model's lock)."""

    def __init__(
        self,
        repository: Path,
        registry: ModelRegistry,
        interval: Callable[[], float],
        reload: Callable[[str], Awaitable[None]],
        drop_if_gone: Callable[[str], Awaitable[None]],
    ) -> None:
        self._repository = repository
        self._registry = registry
        self._interval = interval  # read before each sleep: a settings reload may change it
        self._reload = reload
        self._drop_if_gone = drop_if_gone
        self._task: asyncio.Task[None] | None = None

    def start(self, first_scan: Mapping[str, ModelFiles]) -> None:
        """Poll from now on; `first_scan` is what the loads at start acted on."""
        self._task = asyncio.create_task(self._poll(first_scan), name="repository-poll")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _poll(self, first_scan: Mapping[str, ModelFiles]) -> None:
        tracker = StabilityTracker(first_scan)
        while True:
            await asyncio.sleep(self._interval())
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
            await self._reload(name)
        for name in decision.unload:
            await self._drop_if_gone(name)
