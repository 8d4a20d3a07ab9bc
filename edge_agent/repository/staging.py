"""Pushed model files, RepositoryModelLoad's `file:<version>/<name>` parameters (`stage`) or a
synced release's directory (`stage_directory`): staged, that is written to a staging directory
inside the repository (same filesystem, so installing is a rename), built and checked there
(repository/push.py), and only then installed (`install`).

Layout: REPO/.staging/<random>/<model>/{config.pbtxt, <version>/<files>}. The staged model
directory carries the model's name, so it loads exactly as it will from the repository.

Installing a version directory is one rename. A version that already exists is first moved aside
to REPO/<model>/.replaced/<version>-<ns> and removed once the new one is in (a directory cannot be
renamed over a full one); between the two renames the version is briefly absent from disk, never
half-present. Nothing under .staging/ or .replaced/ is ever served or needed by a rollback (a
rollback serves an older version directory of the repository): both are emptied at start and
after each install, so a power cut at any step leaves at most one transient copy behind.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from edge_agent.common.files import write_atomically
from edge_agent.common.layout import CONFIG_FILE, WARMUP_DIR
from edge_agent.errors import InvalidArgument

STAGING = ".staging"
REPLACED = ".replaced"
FILE_PREFIX = "file:"


def check_model_name(name: str) -> None:
    if (
        not name
        or name.startswith(".")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or len(name) > 255
    ):
        raise InvalidArgument(f"model name {name!r} is not a plain directory name")


def parse_files(parameters: Mapping[str, bytes]) -> dict[int, dict[str, bytes]]:
    """`file:<version>/<relative path>` -> {version: {relative path: content}}.

    A path must stay inside its version directory: relative, no "..", no hidden or empty parts.
    """
    files: dict[int, dict[str, bytes]] = {}
    for key, content in parameters.items():
        spec = key[len(FILE_PREFIX) :]
        version_text, sep, relative = spec.partition("/")
        if not sep or not (version_text.isascii() and version_text.isdigit()) or not relative:
            raise InvalidArgument(
                f"parameter {key!r}: expected file:<version>/<file name>, e.g. file:1/model.onnx"
            )
        path = PurePosixPath(relative)
        if (
            path.is_absolute()
            or "\\" in relative
            or "\0" in relative
            or any(part in ("", ".", "..") or part.startswith(".") for part in relative.split("/"))
        ):
            raise InvalidArgument(
                f"parameter {key!r}: the file must be a plain path inside the version directory"
            )
        files.setdefault(int(version_text), {})[str(path)] = content
    return files


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "xb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())


def stage(
    repository: Path,
    model: str,
    files: Mapping[int, Mapping[str, bytes]],
    config_text: str | None,
) -> Path:
    """Write the files to a fresh staging model directory and return it. The config is the given
    text, else a copy of the repository's config.pbtxt for this model (if any)."""
    check_model_name(model)
    staged = repository / STAGING / uuid.uuid4().hex / model
    staged.mkdir(parents=True)
    try:
        existing = repository / model / CONFIG_FILE
        if config_text is not None:
            _write(staged / CONFIG_FILE, config_text.encode())
        elif existing.is_file():
            _write(staged / CONFIG_FILE, existing.read_bytes())
        if (repository / model / WARMUP_DIR).is_dir():  # for the build only; not installed
            _copy_tree(repository / model / WARMUP_DIR, staged / WARMUP_DIR)
        for version, version_files in files.items():
            for relative, content in version_files.items():
                _write(staged / str(version) / relative, content)
            _fsync_dir(staged / str(version))
        _fsync_dir(staged)
    except BaseException:
        discard(staged)
        raise
    return staged


def _move_file(path: Path, target: Path) -> None:
    """Move one file (its owner gives it up), copying across filesystems; never a hardlink:
    weight files with several links are refused at load (runtime/external_data.py)."""
    try:
        os.rename(path, target)
        with open(target, "rb") as moved:
            os.fsync(moved.fileno())
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    with open(path, "rb") as src, open(target, "xb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
        dst.flush()
        os.fsync(dst.fileno())


def _move_tree(source: Path, target: Path) -> None:
    target.mkdir(exist_ok=True)
    for path in sorted(source.iterdir()):
        if path.is_dir() and not path.is_symlink():
            _move_tree(path, target / path.name)
        else:
            _move_file(path, target / path.name)
    _fsync_dir(target)


def _copy_tree(source: Path, target: Path) -> None:
    shutil.copytree(source, target, symlinks=True)


def stage_directory(repository: Path, model: str, version: int, source: Path) -> Path:
    """Move the files of `source` (a synced release; its owner gives them up) to a fresh staging
    model directory as `version`. The model's config.pbtxt and warmup/ for the build are the
    release's when it carries them (a copy stays in the version directory, so that a rollback
    can restore them: `model_files_of`), else the repository's."""
    check_model_name(model)
    staged = repository / STAGING / uuid.uuid4().hex / model
    target = staged / str(version)
    target.mkdir(parents=True)
    try:
        _move_tree(source, target)
        _stage_model_files(repository / model, target, staged)
        _fsync_dir(staged)
    except BaseException:
        discard(staged)
        raise
    return staged


def _stage_model_files(model_dir: Path, version_dir: Path, staged: Path) -> None:
    """config.pbtxt and warmup/ for a staged model: the version's own copies, else the model's."""
    for name, copy in ((CONFIG_FILE, shutil.copyfile), (WARMUP_DIR, _copy_tree)):
        own = version_dir / name
        source = own if own.exists() else model_dir / name
        if source.exists():
            copy(source, staged / name)


def model_files_of(version_dir: Path) -> list[str]:
    """The model-level files (config.pbtxt, warmup/) a version directory carries copies of."""
    return [name for name in (CONFIG_FILE, WARMUP_DIR) if (version_dir / name).exists()]


def restore_model_files(model_dir: Path, version: int) -> None:
    """Make the model's config.pbtxt and warmup/ the copies that `version`'s directory carries
    (a synced release's), so that a rollback serves the version with the config it was published
    with. A version without copies changes nothing."""
    version_dir = model_dir / str(version)
    own = version_dir / CONFIG_FILE
    current = model_dir / CONFIG_FILE
    if own.is_file() and (not current.is_file() or current.read_bytes() != own.read_bytes()):
        write_atomically(current, own.read_bytes())
    own_warmup = version_dir / WARMUP_DIR
    if own_warmup.is_dir() and _tree(own_warmup) != _tree(model_dir / WARMUP_DIR):
        fresh = model_dir / f".{WARMUP_DIR}-{uuid.uuid4().hex}"  # hidden: never taken for a version
        _copy_tree(own_warmup, fresh)
        _rename_over(fresh, model_dir / WARMUP_DIR, model_dir)
        _fsync_dir(model_dir)
        shutil.rmtree(model_dir / REPLACED, ignore_errors=True)


def _tree(root: Path) -> dict[str, bytes]:
    if not root.is_dir():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def discard(staged: Path) -> None:
    """Remove a staging directory (the <random> level above the model directory)."""
    shutil.rmtree(staged.parent, ignore_errors=True)


def install(
    staged: Path, repository: Path, versions: list[int], model_files: list[str] | None = None
) -> None:
    """Move the staged versions, then the staged model-level files named in `model_files`
    (config.pbtxt, warmup/), into the repository; what they replace is removed."""
    target = repository / staged.name
    target.mkdir(exist_ok=True)
    for version in versions:
        _rename_over(staged / str(version), target / str(version), target)
    for name in model_files or []:
        if name == CONFIG_FILE:
            os.replace(staged / name, target / name)
        else:
            _rename_over(staged / name, target / name, target)
    _fsync_dir(target)
    discard(staged)
    shutil.rmtree(target / REPLACED, ignore_errors=True)


def _rename_over(source: Path, final: Path, model_dir: Path) -> None:
    """Rename a directory to `final`, which may exist: a directory cannot be renamed over a full
    one, so the old one is first set aside to .replaced/ (removed by the caller, or at start)."""
    if final.exists():
        aside = model_dir / REPLACED / f"{final.name}-{time.time_ns()}"
        aside.parent.mkdir(exist_ok=True)
        os.rename(final, aside)
    os.rename(source, final)


def tree_size(root: Path) -> int:
    """Bytes of the files under `root`."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def clean_staging(repository: Path) -> None:
    """Leftovers of an agent that died mid-push or mid-install are never loaded: remove them at
    start (the staging area, each model's .replaced/ and half-made warmup/ copies)."""
    shutil.rmtree(repository / STAGING, ignore_errors=True)
    if not repository.is_dir():
        return
    for model_dir in repository.iterdir():
        if not model_dir.is_dir() or model_dir.name.startswith("."):
            continue
        shutil.rmtree(model_dir / REPLACED, ignore_errors=True)
        for leftover in model_dir.glob(f".{WARMUP_DIR}-*"):
            shutil.rmtree(leftover, ignore_errors=True)
