"""Model files pushed inline (RepositoryModelLoad's `file:<version>/<name>` parameters): written to
a staging directory inside the repository (same filesystem, so installing is a rename), built and
checked there, and only then installed.

Layout: REPO/.staging/<random>/<model>/{config.pbtxt, <version>/<files>}. The staged model
directory carries the model's name, so it loads exactly as it will from the repository.

Installing a version directory is one rename. A version that already exists is first moved aside
to REPO/<model>/.replaced/<version>-<ns> (kept for the operator, never served); between the two
renames the version is briefly absent from disk, never half-present.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

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
        if not sep or not version_text.isdigit() or not relative:
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


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data` in one rename (a temporary file beside it, fsynced): readers
    and a crash see the old file or the new one, never part of one."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600: keep the usual permissions
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


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
        existing = repository / model / "config.pbtxt"
        if config_text is not None:
            _write(staged / "config.pbtxt", config_text.encode())
        elif existing.is_file():
            _write(staged / "config.pbtxt", existing.read_bytes())
        for version, version_files in files.items():
            for relative, content in version_files.items():
                _write(staged / str(version) / relative, content)
            _fsync_dir(staged / str(version))
        _fsync_dir(staged)
    except BaseException:
        discard(staged)
        raise
    return staged


def stage_directory(repository: Path, model: str, version: int, source: Path) -> Path:
    """Move the files of `source` (flat; its owner gives them up) to a fresh staging model
    directory as `version`, with the repository's config.pbtxt for this model (if any). Across
    filesystems they are copied; never hardlinked: weight files with several links are refused
    at load (runtime/external_data.py)."""
    check_model_name(model)
    staged = repository / STAGING / uuid.uuid4().hex / model
    target = staged / str(version)
    target.mkdir(parents=True)
    try:
        existing = repository / model / "config.pbtxt"
        if existing.is_file():
            _write(staged / "config.pbtxt", existing.read_bytes())
        for path in sorted(source.iterdir()):
            try:
                os.rename(path, target / path.name)
                with open(target / path.name, "rb") as moved:
                    os.fsync(moved.fileno())
                continue
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
            with open(path, "rb") as src, open(target / path.name, "xb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
        _fsync_dir(target)
        _fsync_dir(staged)
    except BaseException:
        discard(staged)
        raise
    return staged


def discard(staged: Path) -> None:
    """Remove a staging directory (the <random> level above the model directory)."""
    shutil.rmtree(staged.parent, ignore_errors=True)


def install(staged: Path, repository: Path, versions: list[int], with_config: bool) -> None:
    """Move the staged versions (and config.pbtxt if it was given) into the repository."""
    target = repository / staged.name
    target.mkdir(exist_ok=True)
    for version in versions:
        final = target / str(version)
        if final.exists():
            aside = target / REPLACED / f"{version}-{time.time_ns()}"
            aside.parent.mkdir(exist_ok=True)
            os.rename(final, aside)
        os.rename(staged / str(version), final)
    if with_config:
        os.replace(staged / "config.pbtxt", target / "config.pbtxt")
    _fsync_dir(target)
    discard(staged)


def clean_staging(repository: Path) -> None:
    """Leftovers of an agent that died mid-push are never loaded: remove them at start."""
    shutil.rmtree(repository / STAGING, ignore_errors=True)
