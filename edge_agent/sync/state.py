"""What the sync keeps across a restart (STATE_DIR/sync/state.json), written whole each time."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from edge_agent.common.files import write_atomically
from edge_agent.errors import ConfigError

STATE_FILE = "state.json"


class SyncState:
    """What must survive a restart: per model the versions installed by sync, the rollback floor
    (the newest version ever installed; nothing older is installed again) and the release being
    fetched (its blobs stay on the device across a restart; every other blob is dropped)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self.floor: dict[str, int] = {}
        self.installed: dict[str, list[int]] = {}
        self.pending: dict[str, tuple[int, list[str]]] = {}  # model -> (version, blob digests)
        if path.exists():
            try:
                data = json.loads(path.read_text())
                self.floor = {str(k): int(v) for k, v in data["floor"].items()}
                self.installed = {
                    str(k): sorted(int(v) for v in vs) for k, vs in data["installed"].items()
                }
                self.pending = {
                    str(k): (int(v), [str(d) for d in ds])
                    for k, (v, ds) in data.get("pending", {}).items()
                }
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                # Refuse to guess a floor: an unreadable state file stops the agent's start
                # (exit 78 with this message; move the file aside to start from nothing).
                raise ConfigError(f"sync state {path} is unreadable: {exc}") from exc

    def add(self, model: str, version: int) -> None:
        """`version` is installed: recorded, and the model has nothing pending (one write)."""
        self.installed[model] = sorted({*self.installed.get(model, []), version})
        self.floor[model] = max(self.floor.get(model, 0), version)
        self.pending.pop(model, None)
        self._save()

    def intend(self, model: str, version: int, digests: Iterable[str]) -> None:
        """Written before the first byte of a release is fetched."""
        entry = (version, sorted(set(digests)))
        if self.pending.get(model) != entry:
            self.pending[model] = entry
            self._save()

    def settle(self, model: str) -> None:
        """The model needs nothing more (its desired version is installed, or was refused)."""
        if self.pending.pop(model, None) is not None:
            self._save()

    def needed(self) -> set[str]:
        return {d for _, digests in self.pending.values() for d in digests}

    def _save(self) -> None:
        state = {"floor": self.floor, "installed": self.installed, "pending": self.pending}
        write_atomically(self._path, json.dumps(state).encode())
