"""The release format: one model version as a signed directory of content-named files.

    <release>/model.onnx        the graph; every initializer of 1 KiB or more lives outside it
    <release>/<sha256>.bin      one file per large initializer, named by the sha256 of its bytes
    <release>/release.json      model, version, created, expires, graph digest, files, tensors
                                and, optionally, the same for other variants (fp16, int8, ...)
    <release>/config.pbtxt      optional: the model's config (installed as the model's config)
    <release>/golden.npz        optional: the version's golden check (default variant only)
    <release>/warmup/<name>     optional: the model's `model_warmup` input files

Variants of one version (e.g. fp32, fp16, int8) are built into sibling directories
(`variant_dir`), each holding its own files and the one release.json that lists them all, and
each signed separately, so that a device downloads and verifies only the variant it runs.

A version that changes one layer shares every other `.bin` with its predecessor, so a device
downloads only what changed. The signature (fleet/signing.py) covers every file of the directory,
release.json included, so the file list, the expiry and the tensor table are signed too.

Everything here is pure (bytes and paths in, values out) and raises `ReleaseRejected` with a short
machine-readable reason (the `reason` label of edge_agent_sync_failures_total).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import onnx
from onnx import external_data_helper, numpy_helper

from edge_agent.common.layout import GOLDEN_FILE, MODEL_FILE, VARIANT_FILE, WARMUP_DIR
from edge_agent.common.onnxgraph import nested_tensors
from edge_agent.errors import ReleaseRejected

FORMAT = 1
RELEASE_JSON = "release.json"
# Beside the graph and its weights a release may carry CONFIG_FILE, GOLDEN_FILE and WARMUP_DIR
# files (publish --config / --golden / --warmup): the model's configuration travels with its
# weights, signed with them.
EXTERNAL_MIN_BYTES = 1024
CHUNK_SIZE = 1 << 20  # transfer unit: blobs stream in chunks of this size, each with its digest
DEFAULT_VARIANT = "fp32"
DEFAULT_LIFETIME_SECONDS = 365 * 24 * 3600
MAX_VERSION = 2**63 - 1  # versions are stored as signed 64-bit integers
MAX_RELEASE_JSON_BYTES = 1 << 20
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


@dataclasses.dataclass(frozen=True)
class FileEntry:
    path: str
    sha256: str
    size: int


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    name: str
    path: str
    dtype: str
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Variant:
    graph_sha256: str
    files: tuple[FileEntry, ...]  # every file but release.json, the graph included
    tensors: tuple[TensorEntry, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "graph": {"path": MODEL_FILE, "sha256": self.graph_sha256},
            "files": [dataclasses.asdict(f) for f in self.files],
            "tensors": [{**dataclasses.asdict(t), "shape": list(t.shape)} for t in self.tensors],
        }


@dataclasses.dataclass(frozen=True)
class Release:
    """A release; its top-level graph, files and tensors are the default variant (fp32). Other
    variants of the same version (e.g. fp16, int8) sit in `variants`; `select` gives the release
    as seen by a device that runs one of them."""

    model: str
    version: int
    created: float
    expires: float
    graph_sha256: str
    files: tuple[FileEntry, ...]  # every file but release.json, the graph included
    tensors: tuple[TensorEntry, ...]
    variants: Mapping[str, Variant] = dataclasses.field(default_factory=dict)
    variant: str = DEFAULT_VARIANT  # which variant graph/files/tensors describe

    def to_json(self) -> bytes:
        if self.variant != DEFAULT_VARIANT:
            raise ValueError("serialize the release as published, not a selected variant")
        data = {
            "format": FORMAT,
            "model": self.model,
            "version": self.version,
            "created": self.created,
            "expires": self.expires,
            **Variant(self.graph_sha256, self.files, self.tensors).to_dict(),
        }
        if self.variants:
            data["variants"] = {name: v.to_dict() for name, v in sorted(self.variants.items())}
        return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()

    def variant_names(self) -> list[str]:
        return [DEFAULT_VARIANT, *sorted(self.variants)]

    def select(self, name: str) -> Release:
        if name == DEFAULT_VARIANT:
            return self
        v = self.variants[name]
        return dataclasses.replace(
            self, graph_sha256=v.graph_sha256, files=v.files, tensors=v.tensors, variant=name
        )

    def all_files(self) -> list[FileEntry]:
        """The files of every variant (each digest once)."""
        seen: dict[str, FileEntry] = {}
        for name in self.variant_names():
            for entry in self.select(name).files:
                seen.setdefault(entry.sha256, entry)
        return list(seen.values())

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_file_name(name: str) -> None:
    """A release names files inside its own directory only: one plain component, or
    `warmup/<plain name>` for the model's warmup inputs."""
    parts = name.split("/") if isinstance(name, str) else []
    if len(parts) == 2 and parts[0] == WARMUP_DIR:
        parts = parts[1:]
    if len(parts) != 1 or not _SAFE_NAME.match(parts[0]) or name in (RELEASE_JSON, WARMUP_DIR):
        raise ReleaseRejected("path", f"file name {name!r} is not a plain name inside the release")


def check_model_name(name: str) -> None:
    if not isinstance(name, str) or not _SAFE_NAME.match(name):
        raise ReleaseRejected("format", f"model name {name!r} is not a plain directory name")


def _field(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ReleaseRejected("format", f"release.json: {key!r} is missing or not {kind}")
    return value


def parse_release(raw: bytes) -> Release:
    """release.json bytes -> Release; every path and digest checked."""
    if len(raw) > MAX_RELEASE_JSON_BYTES:
        raise ReleaseRejected(
            "format", f"release.json is {len(raw)} bytes, over {MAX_RELEASE_JSON_BYTES}"
        )
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # deep nesting: Recursion
        raise ReleaseRejected("format", f"release.json is not JSON: {str(exc)[:200]}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ReleaseRejected("format", f"release.json: unsupported format {data!r:.80}")
    model = _field(data, "model", str)
    check_model_name(model)
    version = _field(data, "version", int)
    if not 1 <= version <= MAX_VERSION:
        raise ReleaseRejected("format", f"release.json: version {version} is not in 1..2^63-1")
    variants = {}
    extra = data.get("variants", {})
    if not isinstance(extra, dict):
        raise ReleaseRejected("format", "release.json: 'variants' must be an object")
    for name, block in sorted(extra.items()):
        if not _SAFE_NAME.match(name) or name == DEFAULT_VARIANT or not isinstance(block, dict):
            raise ReleaseRejected("format", f"release.json: bad variant {name!r}")
        variants[name] = _parse_variant(block)
    default = _parse_variant(data)
    return Release(
        model=model,
        version=version,
        created=_time(data, "created"),
        expires=_time(data, "expires"),
        graph_sha256=default.graph_sha256,
        files=default.files,
        tensors=default.tensors,
        variants=variants,
    )


def _time(data: Mapping[str, Any], key: str) -> float:
    value = _field(data, key, (int, float))
    try:
        seconds = float(value)
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds):
        raise ReleaseRejected("format", f"release.json: {key!r} is not a finite time")
    return seconds


def _parse_variant(data: Mapping[str, Any]) -> Variant:
    graph = _field(data, "graph", dict)
    if graph.get("path") != MODEL_FILE or not _DIGEST.match(str(graph.get("sha256", ""))):
        raise ReleaseRejected("format", "release.json: 'graph' must name model.onnx and its sha256")
    files = []
    for item in _objects(data, "files", "file"):
        path = _field(item, "path", str)
        check_file_name(path)
        sha = _field(item, "sha256", str)
        size = _field(item, "size", int)
        if not _DIGEST.match(sha) or not 0 <= size <= MAX_VERSION:
            raise ReleaseRejected("format", f"release.json: file {path!r} has a bad digest or size")
        files.append(FileEntry(path, sha, size))
    paths = [f.path for f in files]
    if len(set(paths)) != len(paths):
        raise ReleaseRejected("format", "release.json: a file is listed twice")
    if (
        MODEL_FILE not in paths
        or next(f for f in files if f.path == MODEL_FILE).sha256 != graph["sha256"]
    ):
        raise ReleaseRejected("format", "release.json: the graph is not among the files")
    tensors = []
    for item in _objects(data, "tensors", "tensor"):
        shape = _field(item, "shape", list)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ReleaseRejected("format", "release.json: a tensor shape is not a list of sizes")
        path = _field(item, "path", str)
        if path not in paths:
            raise ReleaseRejected("path", f"release.json: tensor file {path!r} is not listed")
        tensors.append(
            TensorEntry(_field(item, "name", str), path, _field(item, "dtype", str), tuple(shape))
        )
    return Variant(graph["sha256"], tuple(files), tuple(tensors))


def _objects(data: Mapping[str, Any], key: str, what: str) -> Iterator[Mapping[str, Any]]:
    for item in _field(data, key, list):
        if not isinstance(item, dict):
            raise ReleaseRejected("format", f"release.json: a {what} entry is not an object")
        yield item


def check_fresh(release: Release, now: float | None = None) -> None:
    now = time.time() if now is None else now
    if release.expires <= now:
        raise ReleaseRejected(
            "expired", f"release {release.model} v{release.version} expired at {release.expires}"
        )


def _dtype_name(data_type: int) -> str:
    return str(onnx.TensorProto.DataType.Name(data_type))


def variant_dir(out_dir: Path, name: str) -> Path:
    """Where `build_release` writes a variant: the default in `out_dir`, the others beside it
    (each directory is signed on its own: a device receives only the variant it runs)."""
    return out_dir if name == DEFAULT_VARIANT else out_dir.with_name(f"{out_dir.name}-{name}")


def _split(model_path: Path, out_dir: Path, extras: Mapping[str, Path]) -> Variant:
    """Write the graph and one content-named file per large initializer into `out_dir`, and
    copy `extras` (release path -> source file: config, golden, warmup inputs) beside them."""
    try:
        proto = onnx.load(str(model_path))  # external data of the source model included
    except Exception as exc:  # onnx raises DecodeError, OSError, ValueError...
        raise ReleaseRejected(
            "format", f"{model_path} is not a readable ONNX model: {exc}"
        ) from exc
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, FileEntry] = {}
    tensors: list[TensorEntry] = []
    for tensor in proto.graph.initializer:
        data = numpy_helper.to_array(tensor)
        if data.dtype == object or data.nbytes < EXTERNAL_MIN_BYTES:
            continue  # strings and small tensors stay in the graph
        raw = numpy_helper.from_array(data, tensor.name).raw_data
        sha = hashlib.sha256(raw).hexdigest()
        name = f"{sha}.bin"
        if name not in files:
            (out_dir / name).write_bytes(raw)
            files[name] = FileEntry(name, sha, len(raw))
        tensor.CopyFrom(numpy_helper.from_array(data, tensor.name))  # raw_data, typed fields gone
        external_data_helper.set_external_data(tensor, location=name, offset=0, length=len(raw))
        tensor.data_location = onnx.TensorProto.EXTERNAL
        tensor.ClearField("raw_data")
        tensors.append(TensorEntry(tensor.name, name, _dtype_name(tensor.data_type), data.shape))
    graph_bytes = proto.SerializeToString()
    (out_dir / MODEL_FILE).write_bytes(graph_bytes)
    graph_sha = hashlib.sha256(graph_bytes).hexdigest()
    files[MODEL_FILE] = FileEntry(MODEL_FILE, graph_sha, len(graph_bytes))
    for name, source in sorted(extras.items()):
        check_file_name(name)
        if name in files:
            raise ReleaseRejected("path", f"{name} is already a file of the release")
        try:
            content = source.read_bytes()
        except OSError as exc:
            raise ReleaseRejected("format", f"{name}: cannot read {source}: {exc}") from exc
        (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / name).write_bytes(content)
        files[name] = FileEntry(name, hashlib.sha256(content).hexdigest(), len(content))
    return Variant(
        graph_sha,
        tuple(sorted(files.values(), key=lambda f: f.path)),
        tuple(sorted(tensors, key=lambda t: t.name)),
    )


def build_release(
    model_path: Path,
    model: str,
    version: int,
    out_dir: Path,
    lifetime_seconds: float = DEFAULT_LIFETIME_SECONDS,
    now: float | None = None,
    variants: Mapping[str, Path] | None = None,
    extras: Mapping[str, Path] | None = None,
) -> Release:
    """Write the release for `model_path` (the fp32 default) and its other `variants` (name ->
    model file): one directory per variant (`variant_dir`), each with the same release.json.
    `extras` (release path -> file: config.pbtxt, golden.npz, warmup/<name>) go into every
    variant, except the golden check, whose expected outputs are the default variant's."""
    check_model_name(model)
    for name in variants or {}:
        if not _SAFE_NAME.match(name) or name == DEFAULT_VARIANT:
            raise ReleaseRejected("format", f"variant name {name!r}: use a plain name, not fp32")
    extras = dict(extras or {})
    shared = {k: v for k, v in extras.items() if k != GOLDEN_FILE}
    default = _split(model_path, out_dir, extras)
    others = {
        name: _split(path, variant_dir(out_dir, name), shared)
        for name, path in (variants or {}).items()
    }
    created = time.time() if now is None else now
    release = Release(
        model=model,
        version=version,
        created=created,
        expires=created + lifetime_seconds,
        graph_sha256=default.graph_sha256,
        files=default.files,
        tensors=default.tensors,
        variants=others,
    )
    for name in release.variant_names():
        (variant_dir(out_dir, name) / RELEASE_JSON).write_bytes(release.to_json())
    return release


def check_directory(release: Release, directory: Path) -> None:
    """The assembled directory holds exactly the release's files, each with its digest, and
    the graph's external data matches the tensor table in name, dtype, shape and file."""
    present = sorted(
        p.relative_to(directory).as_posix() for p in directory.rglob("*") if not p.is_dir()
    )
    expected = sorted([*(f.path for f in release.files), RELEASE_JSON])
    if present != expected:
        raise ReleaseRejected("contract", f"release files {present} differ from {expected}")
    for entry in release.files:
        if sha256_file(directory / entry.path) != entry.sha256:
            raise ReleaseRejected("digest", f"{entry.path}: content does not match its sha256")
    check_graph_contract(release, directory / MODEL_FILE)


def is_installed_in(release: Release, release_json: bytes, directory: Path) -> bool:
    """`directory` is this release as the agent installs it: these exact release.json bytes
    (signed), the variant's files each with its digest, the variant file, nothing else."""
    try:
        present = sorted(
            p.relative_to(directory).as_posix() for p in directory.rglob("*") if not p.is_dir()
        )
        if present != sorted([*(f.path for f in release.files), RELEASE_JSON, VARIANT_FILE]):
            return False
        if (directory / RELEASE_JSON).read_bytes() != release_json:
            return False
        if (directory / VARIANT_FILE).read_text().strip() != release.variant:
            return False
        return all(sha256_file(directory / f.path) == f.sha256 for f in release.files)
    except (OSError, UnicodeDecodeError):
        return False


def check_graph_contract(release: Release, graph_path: Path) -> None:
    try:
        proto = onnx.load(str(graph_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ValueError...
        raise ReleaseRejected("contract", f"the graph is not a readable ONNX model: {exc}") from exc
    declared = {t.name: t for t in release.tensors}
    sizes = {f.path: f.size for f in release.files}
    seen: set[str] = set()
    for tensor in nested_tensors(proto):  # a release externalizes graph initializers only
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise ReleaseRejected(
                "contract",
                f"tensor {tensor.name!r} keeps external data outside the graph's initializers "
                "(a sparse initializer, a node attribute, a subgraph or a function)",
            )
    for tensor in proto.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {e.key: e.value for e in tensor.external_data}
        want = declared.get(tensor.name)
        if want is None:
            raise ReleaseRejected(
                "contract", f"initializer {tensor.name!r} is not in the release's tensor table"
            )
        actual = (entries.get("location"), _dtype_name(tensor.data_type), tuple(tensor.dims))
        if actual != (want.path, want.dtype, want.shape):
            raise ReleaseRejected(
                "contract",
                f"initializer {tensor.name!r}: graph has (file, dtype, shape) {actual}, the "
                f"release declares {(want.path, want.dtype, want.shape)}",
            )
        offset = int(entries.get("offset", "0"))
        length = int(entries.get("length", str(sizes[want.path] - offset)))
        if offset < 0 or length < 0 or offset + length > sizes[want.path]:
            raise ReleaseRejected("contract", f"initializer {tensor.name!r}: bytes out of range")
        seen.add(tensor.name)
    missing = sorted(set(declared) - seen)
    if missing:
        raise ReleaseRejected("contract", f"tensors {missing} are declared but not in the graph")
