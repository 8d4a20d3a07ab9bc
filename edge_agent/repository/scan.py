"""What is on disk in the model repository, as plain data, and the rule that keeps poll mode from
loading a file that is still being written.

The rule (poll mode): a model's files are acted on only once they are *stable across two
consecutive scans*: the same names, sizes and modification times (nanoseconds) both times. A copy
in progress changes between scans, so it is left alone until it stops; a version directory moved
in by an atomic rename is stable at once and is picked up one scan later. This needs nothing from
whoever writes the files (no marker, no rename discipline). A file whose writer stalled for longer
than a poll interval looks stable and is tried: it then fails to load (or its golden check fails),
the serving version stays, and the next change to the files triggers a new try.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

from edge_agent.common.layout import CONFIG_FILE

# (path relative to the model directory, size, mtime_ns) of every file, sorted.
FileList = tuple[tuple[str, int, int], ...]


@dataclasses.dataclass(frozen=True)
class ModelFiles:
    """The state of one model directory: its config file and each version directory."""

    config: FileList
    versions: Mapping[int, FileList]

    def version(self, version: int) -> FileList:
        return self.versions.get(version, ())


def model_dirs(repository: Path) -> dict[str, Path]:
    """The model directories: every visible subdirectory (".staging" and the like are ours)."""
    try:
        entries = list(repository.iterdir())
    except OSError:
        return {}
    return {p.name: p for p in entries if not p.name.startswith(".") and p.is_dir()}


def version_dirs(model_dir: Path) -> list[int]:
    """Version directories: names that are non-negative integers."""
    try:
        entries = list(model_dir.iterdir())
    except OSError:
        return []
    return sorted(int(p.name) for p in entries if p.name.isdigit() and p.is_dir())


def _files(root: Path, prefix: str = "") -> FileList:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for filename in sorted(filenames):
            path = Path(dirpath) / filename
            try:
                st = path.lstat()
            except OSError:  # removed while we looked: the next scan sees the change
                continue
            found.append((prefix + str(path.relative_to(root)), st.st_size, st.st_mtime_ns))
    return tuple(found)


def scan_model(model_dir: Path) -> ModelFiles:
    config = model_dir / CONFIG_FILE
    try:
        st = config.lstat()
        config_files: FileList = ((CONFIG_FILE, st.st_size, st.st_mtime_ns),)
    except OSError:
        config_files = ()
    return ModelFiles(
        config=config_files,
        versions={v: _files(model_dir / str(v)) for v in version_dirs(model_dir)},
    )


def scan_repository(repository: Path) -> dict[str, ModelFiles]:
    return {name: scan_model(path) for name, path in model_dirs(repository).items()}


@dataclasses.dataclass(frozen=True)
class PollDecision:
    load: list[str]  # changed, and stable across two scans
    unload: list[str]  # gone from the repository, and still gone on the next scan
    pending: list[str]  # changed since the last scan: wait for it to settle


class StabilityTracker:
    """Decides, scan after scan, which models poll mode may act on (see the module doc)."""

    def __init__(self, first_scan: Mapping[str, ModelFiles]) -> None:
        # The scan the agent started from: a change must be seen twice after it.
        self._previous = dict(first_scan)

    def decide(
        self, scan: Mapping[str, ModelFiles], applied: Mapping[str, ModelFiles | None]
    ) -> PollDecision:
        """`applied`: per known model, the files its last load acted on (None: never loaded)."""
        previous = self._previous
        load: list[str] = []
        unload: list[str] = []
        pending: list[str] = []
        for name, files in sorted(scan.items()):
            if name in applied and applied[name] == files:
                continue
            if previous.get(name) == files:
                load.append(name)
            else:
                pending.append(name)
        for name in sorted(applied):
            if name not in scan:
                (unload if name not in previous else pending).append(name)
        self._previous = dict(scan)
        return PollDecision(load, unload, pending)
