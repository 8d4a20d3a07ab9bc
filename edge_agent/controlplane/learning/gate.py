"""The validation gate and the release of what passes it.

A candidate is scored on the task's validation set in ONNX Runtime. It is accepted (becomes the
global weights devices train from) when its accuracy is at least the best accepted global's minus
max_accuracy_drop, so a run of bad buffers cannot walk the model down; an accepted candidate at
least as good as the best released one becomes the model's next release, signed with the control
plane's learning key and rolled out to the task's devices through the ordinary rollout path.

Every method here blocks: call them on the registry thread.
"""

from __future__ import annotations

import dataclasses
import io
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent._proto import fleet_pb2 as pb
from edge_agent.controlplane.learning.spec import SCOPES
from edge_agent.controlplane.learning.store import LearningStore, graph_inputs
from edge_agent.controlplane.registry import FLEET, LearningTaskRow, Registry, VersionRow
from edge_agent.errors import InvalidArgument
from edge_agent.fleet import signing
from edge_agent.fleet.release import DEFAULT_LIFETIME_SECONDS, build_release
from edge_agent.learn import delta
from edge_agent.learn.onnxinfo import accuracy, apply
from edge_agent.observability.logging import get_logger

log = get_logger(__name__)

MAX_VALIDATION_BYTES = 64 << 20


def read_validation(data: bytes, inputs: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    if len(data) > MAX_VALIDATION_BYTES:
        raise InvalidArgument(f"the validation set is over {MAX_VALIDATION_BYTES} bytes")
    try:
        archive = np.load(io.BytesIO(data), allow_pickle=False)
        arrays = {name: archive[name] for name in archive.files}
    except Exception as exc:  # numpy raises ValueError, BadZipFile, ...
        raise InvalidArgument(f"the validation set is not a readable .npz: {exc}") from exc
    if "labels" not in arrays:
        raise InvalidArgument("the validation set needs a `labels` array (class indices)")
    labels = arrays.pop("labels")
    if sorted(arrays) != sorted(inputs):
        raise InvalidArgument(
            f"the validation set's arrays {sorted(arrays)} are not the model's inputs {inputs}"
        )
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or not len(labels):
        raise InvalidArgument("`labels` must be a non-empty 1-D integer array")
    for name, value in arrays.items():
        if len(value) != len(labels):
            raise InvalidArgument(
                f"validation input {name!r} has {len(value)} rows, not {len(labels)}"
            )
    return arrays, labels


def validation_accuracy(model: Any, validation: bytes) -> float:
    """The model's accuracy on a task's validation set (.npz bytes)."""
    feeds, labels = read_validation(validation, sorted(graph_inputs(model)))
    return accuracy(model, feeds, labels)


@dataclasses.dataclass(frozen=True)
class Verdict:
    accuracy: float
    best_accuracy: float  # of the accepted globals so far (the base counts)
    accepted: bool


class Gate:
    def __init__(self, registry: Registry, store: LearningStore, key: Path | None) -> None:
        self._registry = registry
        self._store = store
        self._key = key

    def judge(
        self, task: LearningTaskRow, spec: pb.LearningSpec, candidate: dict[str, np.ndarray]
    ) -> Verdict:
        """Score the candidate weights on the task's base model against the gate."""
        model = apply(self._store.base(task)[0], candidate, add=False)
        score = validation_accuracy(model, task.validation)
        best = max(v.accuracy for v in self._registry.versions(task.id) if v.accepted)
        return Verdict(score, best, score >= best - spec.max_accuracy_drop)

    def release_if_best(
        self, task: LearningTaskRow, spec: pb.LearningSpec, version: VersionRow
    ) -> None:
        """Release an accepted global at least as good as the best released one."""
        if version.accepted and version.accuracy >= self._best_released(task.id):
            released = self._release(task, spec, version)
            self._registry.set_released(task.id, version.version, released)

    def release_unreleased(self, task: LearningTaskRow) -> None:
        """Release the task's current global if it should have been and a crash cut it short."""
        if self._key is None:
            return
        versions = self._registry.versions(task.id)
        current = next(v for v in versions if v.version == task.global_version)
        if not current.released:
            self.release_if_best(task, pb.LearningSpec.FromString(task.spec), current)

    def _best_released(self, task_id: int) -> float:
        return max(v.accuracy for v in self._registry.versions(task_id) if v.released)

    def _release(self, task: LearningTaskRow, spec: pb.LearningSpec, version: VersionRow) -> int:
        """The accepted candidate as the model's next release, signed with the learning key,
        registered and rolled out to the task's devices. Returns its model version."""
        import onnx

        assert self._key is not None
        candidate = delta.decode(self._store.read_blob(version.digest))
        base, extras = self._store.base(task)
        model = apply(base, candidate, add=False)
        number = self._registry.newest_version(task.model) + 1
        with tempfile.TemporaryDirectory() as scratch:
            root = Path(scratch)
            onnx.save(model, str(root / "learned.onnx"))
            extra_files = {}
            for name, content in extras.items():
                (root / "extras" / name).parent.mkdir(parents=True, exist_ok=True)
                (root / "extras" / name).write_bytes(content)
                extra_files[name] = root / "extras" / name
            out = root / "release"
            release = build_release(
                root / "learned.onnx", task.model, number, out, DEFAULT_LIFETIME_SECONDS,
                extras=extra_files,
            )  # fmt: skip
            signature = signing.sign_directory(out, self._key)
            for entry in release.files:
                self._store.put_blob((out / entry.path).read_bytes())
            release_json = (out / "release.json").read_bytes()
        self._registry.add_release(
            task.model, number, release_json, signature, {f.sha256 for f in release.files}
        )
        rollout = self._registry.set_target(
            task.model, number, SCOPES.get(spec.scope, FLEET), spec.group, spec.canary_percent
        )
        log.info(
            "learn.released",
            task=task.id,
            candidate=version.version,
            model=task.model,
            version=number,
            rollout=rollout.id,
            accuracy=round(version.accuracy, 4),
        )
        return number
