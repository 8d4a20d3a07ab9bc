"""The parameter server's bytes: global weights, updates, optimizer state and candidates live as
blobs in the control plane's blob store (content-addressed, so a blob already there is kept), and
a task's base model is read from its release once and kept while the task runs.

Every method here blocks (blob store, registry, onnx): call them on the registry thread.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

from edge_agent.common.layout import CONFIG_FILE, MODEL_FILE, WARMUP_DIR
from edge_agent.controlplane.blobs import BlobStore
from edge_agent.controlplane.registry import BlobInfo, LearningTaskRow, Registry
from edge_agent.errors import NotFound
from edge_agent.fleet.release import CHUNK_SIZE, parse_release
from edge_agent.learn import delta

BaseModel = tuple[Any, dict[str, bytes]]  # an onnx.ModelProto; the release's config/warmup files


def graph_inputs(model: Any) -> set[str]:
    """The inputs a caller feeds (initializers listed as inputs are weights, not inputs)."""
    initializers = {t.name for t in model.graph.initializer}
    return {i.name for i in model.graph.input if i.name not in initializers}


class LearningStore:
    def __init__(self, registry: Registry, blobs: BlobStore) -> None:
        self._registry = registry
        self._blobs = blobs
        self._models: dict[int, BaseModel] = {}  # task -> its base model
        self._norms: dict[str, float] = {}  # global weights digest -> L2 norm

    def put_blob(self, data: bytes) -> BlobInfo:
        """Store `data` in the blob store (content-addressed; a blob already there is kept)."""
        digest = hashlib.sha256(data).hexdigest()
        known = self._registry.blob(digest)
        if known is not None and self._blobs.exists(digest):
            return known
        writer = self._blobs.writer(digest, len(data))
        writer.write(data)
        chunks = writer.commit()
        info = BlobInfo(digest, len(data), CHUNK_SIZE, tuple(chunks))
        self._registry.add_blob(info)
        return info

    def read_blob(self, digest: str) -> bytes:
        with self._blobs.open(digest) as f:
            return f.read()

    def base(self, task: LearningTaskRow) -> BaseModel:
        """The task's base model and its config/warmup files, read from the blobs once."""
        base = self._models.get(task.id)
        if base is None:
            base = self._models[task.id] = self.release_model(task.model, task.base_version)
        return base

    def keep_base(self, task_id: int, base: BaseModel) -> None:
        self._models[task_id] = base

    def forget_base(self, task_id: int) -> None:
        """A stopped task aggregates no more: its base model need not stay in memory."""
        self._models.pop(task_id, None)

    def global_norm(self, digest: str) -> float:
        """L2 norm of a global weights blob (for the absurd-norm check), computed once."""
        if digest not in self._norms:
            self._norms[digest] = delta.norm(delta.decode(self.read_blob(digest)))
        return self._norms[digest]

    def release_model(self, name: str, version: int) -> BaseModel:
        """A release's fp32 model (weights inline) and its config/warmup files."""
        import onnx

        stored = self._registry.release(name, version)
        if stored is None:
            raise NotFound(f"no release {name} v{version}")
        release = parse_release(stored.release_json)
        extras: dict[str, bytes] = {}
        with tempfile.TemporaryDirectory() as scratch:
            for entry in release.files:
                (Path(scratch) / entry.path).parent.mkdir(exist_ok=True)
                (Path(scratch) / entry.path).write_bytes(self.read_blob(entry.sha256))
                if entry.path == CONFIG_FILE or entry.path.startswith(WARMUP_DIR + "/"):
                    extras[entry.path] = (Path(scratch) / entry.path).read_bytes()
            model = onnx.load(str(Path(scratch) / MODEL_FILE))
        return model, extras
