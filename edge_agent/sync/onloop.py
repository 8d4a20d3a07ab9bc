"""The model manager as the sync's threads call it: every lifecycle operation runs on the agent's
event loop (repository/lifecycle.py), so each call here runs there and waits for its end."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from edge_agent.repository.lifecycle import ModelManager

T = TypeVar("T")


class ManagerOnLoop:
    def __init__(self, manager: ModelManager, loop: asyncio.AbstractEventLoop) -> None:
        self._manager = manager
        self._loop = loop

    @property
    def repository(self) -> Path:
        return self._manager.repository

    def serving(self, model: str) -> int:
        """The newest version of `model` serving now (0: none)."""

        async def read() -> int:
            return self._manager.serving_version(model)

        return self._run(read)

    def load_release(self, model: str, version: int, directory: Path) -> None:
        self._run(lambda: self._manager.load_release(model, version, directory))

    def adopt(self, model: str, version: int) -> None:
        self._run(lambda: self._manager.adopt(model, version))

    def serve_only_up_to(self, model: str, version: int) -> None:
        self._run(lambda: self._manager.serve_only_up_to(model, version))

    def _run(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        return asyncio.run_coroutine_threadsafe(make(), self._loop).result()
