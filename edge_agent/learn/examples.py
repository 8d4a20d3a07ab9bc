"""Labelled examples on the device: STATE_DIR/examples/<model>/<seq>-<rows>.npz, one file per
accepted submission (the inputs by name, plus `labels`), each written atomically (temporary
file, fsync, rename), so a crash leaves whole submissions only. The store keeps at most
`max_bytes` per model: the oldest submissions are dropped first. Pure numpy (no PyTorch)."""

from __future__ import annotations

import dataclasses
import io
import re
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edge_agent.common.files import write_atomically
from edge_agent.errors import DiskFull

_FILE = re.compile(r"^(\d{12})-(\d+)\.npz$")


@dataclasses.dataclass
class ExampleStats:
    """Read by the metrics collector: rows stored now, dropped and refused so far, per model."""

    stored: dict[str, int] = dataclasses.field(default_factory=dict)
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)
    refused: dict[str, int] = dataclasses.field(default_factory=dict)


class ExampleStore:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self.stats = ExampleStats()
        root.mkdir(parents=True, exist_ok=True)
        for model in root.iterdir():
            if model.is_dir():
                self.stats.stored[model.name] = sum(r for _, r, _ in self._files(model.name))
                for leftover in model.glob(".*"):  # a write cut off by a crash
                    leftover.unlink(missing_ok=True)

    def _files(self, model: str) -> list[tuple[int, int, Path]]:
        """(sequence, rows, path) of the model's submissions, oldest first."""
        found = []
        directory = self.root / model
        if directory.is_dir():
            for path in directory.iterdir():
                match = _FILE.match(path.name)
                if match:
                    found.append((int(match.group(1)), int(match.group(2)), path))
        return sorted(found)

    def add(
        self, model: str, inputs: Mapping[str, np.ndarray], labels: np.ndarray
    ) -> tuple[int, int, int]:
        """Store one submission; returns (rows accepted, rows stored now, rows dropped)."""
        buffer = io.BytesIO()
        np.savez(buffer, labels=labels, **inputs)  # type: ignore[arg-type]
        data = buffer.getvalue()
        rows = len(labels)
        with self._lock:
            directory = self.root / model
            directory.mkdir(exist_ok=True)
            files = self._files(model)
            sequence = files[-1][0] + 1 if files else 1
            try:  # a full disk leaves no part of the file (write_atomically removes it)
                write_atomically(directory / f"{sequence:012d}-{rows}.npz", data)
            except OSError as exc:
                if DiskFull.caused(exc):
                    raise DiskFull(directory, len(data), "storing the examples") from exc
                raise
            files.append((sequence, rows, directory / f"{sequence:012d}-{rows}.npz"))
            dropped = 0
            total = sum(p.stat().st_size for _, _, p in files)
            while total > self.max_bytes and len(files) > 1:
                _, old_rows, oldest = files.pop(0)
                total -= oldest.stat().st_size
                oldest.unlink()
                dropped += old_rows
            stored = sum(r for _, r, _ in files)
            self.stats.stored[model] = stored
            self.stats.dropped[model] = self.stats.dropped.get(model, 0) + dropped
        return rows, stored, dropped

    def rows(self, model: str) -> int:
        return self.stats.stored.get(model, 0)

    def revision(self, model: str) -> int:
        """The newest submission's sequence number: it changes whenever examples arrive."""
        with self._lock:
            files = self._files(model)
        return files[-1][0] if files else 0

    def refused(self, model: str) -> None:
        self.stats.refused[model] = self.stats.refused.get(model, 0) + 1

    def export(self, model: str, path: Path) -> int:
        """Every stored example of `model` in one .npz (inputs by name, `labels`); the rows."""
        with self._lock:
            files = self._files(model)
        parts: dict[str, list[np.ndarray]] = {}
        for _, _, file in files:
            with np.load(file, allow_pickle=False) as data:
                for name in data.files:
                    parts.setdefault(name, []).append(data[name])
        arrays = {name: np.concatenate(chunks) for name, chunks in parts.items()}
        np.savez(path, **arrays)  # type: ignore[arg-type]
        return len(arrays.get("labels", []))
