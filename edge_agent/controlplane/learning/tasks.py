"""A learning task's life: started (its base release, participants and global weights fixed),
read (status, and each device's assignment in its desired state), stopped.

A task's devices (fleet, group or canary cohort) are fixed at start, and its `buffer` is clamped
to their number: a buffer no set of devices can fill would wait for ever.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent._proto import fleet_pb2 as pb
from edge_agent.controlplane.learning.aggregation import due
from edge_agent.controlplane.learning.gate import validation_accuracy
from edge_agent.controlplane.learning.spec import (
    SCOPES,
    check_spec,
    one_per_device,
    spec_defaults,
)
from edge_agent.controlplane.learning.store import LearningStore
from edge_agent.controlplane.registry import RUNNING, STOPPED, LearningTaskRow, Registry, UpdateRow
from edge_agent.controlplane.shared import Db
from edge_agent.errors import FailedPrecondition, InvalidArgument, NotFound
from edge_agent.learn import delta, privacy
from edge_agent.learn.onnxinfo import trainable_names, training_output
from edge_agent.observability.logging import get_logger

log = get_logger(__name__)

ACTIVE_S = 600.0  # "active": sent an update within this long


def progress(
    task: LearningTaskRow, spec: pb.LearningSpec, waiting: list[UpdateRow], active: int, now: float
) -> str:
    """Why a task is (not) advancing, in words (learn status)."""
    if task.state != RUNNING:
        if task.counters.get("dp_exhausted"):
            return f"stopped: the privacy budget (epsilon {spec.dp_max_epsilon:g}) is spent"
        return task.state
    activity = f"{active} of {len(task.devices)} device(s) active in the last 10 minutes"
    taken, _ = due(spec, waiting, now, task.global_version)
    if taken:
        return f"aggregating {len(taken)} update(s); {activity}"
    fresh = [r for r in waiting if task.global_version - r.base_global <= spec.max_staleness]
    counted = len({r.device_id for r in fresh}) if one_per_device(spec) else len(fresh)
    text = f"waiting for {spec.buffer - counted} more update(s); {activity}"
    needed = spec.min_updates or spec.buffer
    if fresh and spec.max_wait > 0:
        if counted >= needed:
            left = max(0.0, spec.max_wait - (now - min(r.at for r in fresh)))
            text += f"; aggregating the {counted} waiting in {left:.0f} s (max wait)"
        else:
            text += f"; max wait needs {needed - counted} more"
    return text


def clamp_buffer(spec: pb.LearningSpec, devices: int) -> str:
    """Clamp the stored spec's buffer (and min_updates) to what `devices` can fill; returns the
    notice of what changed ("" when nothing did)."""
    notice = ""
    if spec.buffer > devices:
        # At most one update per device counts towards a buffer (DP: exactly so).
        notice = f"buffer {spec.buffer} clamped to {devices}: only {devices} device(s) take part"
        spec.buffer = devices
    spec.min_updates = min(spec.min_updates, spec.buffer)
    return notice


@dataclasses.dataclass(frozen=True)
class Base:
    """What a new task starts from: its base release's model, its trainable tensors' values,
    and the validation set with the base's accuracy on it."""

    version: int
    model: Any
    extras: dict[str, bytes]
    weights: dict[str, np.ndarray]
    validation: bytes
    accuracy: float


class Tasks:
    def __init__(
        self,
        registry: Registry,
        db: Db,
        store: LearningStore,
        notify: Callable[[], None],
        learning_key: Path | None,
    ) -> None:
        self._registry = registry
        self._db = db
        self._store = store
        self._notify = notify
        self._key = learning_key

    async def start(self, spec: pb.LearningSpec) -> tuple[int, str]:
        """Start a task; returns its id and a notice of what was changed (a clamped buffer)."""
        if self._key is None:
            raise FailedPrecondition(
                "this control plane has no learning key (control-plane serve --learning-key "
                "KEY): learned releases could not be signed, so learning tasks are refused"
            )
        spec = spec_defaults(spec)
        # Off the loop: the first spec with differential privacy imports the accountant
        # (seconds), which would stall every other call meanwhile.
        await asyncio.to_thread(check_spec, spec)
        task_id, notice = await self._db(self._add, spec)
        self._notify()
        return int(task_id), str(notice)

    def _add(self, spec: pb.LearningSpec) -> tuple[int, str]:
        """Read the base, fix the participants, store the task (on the registry thread)."""
        base = self._base(spec)
        global_blob = self._store.put_blob(delta.encode(base.weights))
        devices = self._registry.reach(
            SCOPES[spec.scope], spec.group, spec.canary_percent, spec.model, base.version
        )
        if not devices:
            raise FailedPrecondition("no enrolled device would take part in this task")
        stored = pb.LearningSpec()
        stored.CopyFrom(spec)
        stored.base_version = base.version
        notice = clamp_buffer(stored, len(devices))
        task_id = self._registry.add_task(
            spec.model,
            base.version,
            stored.SerializeToString(),
            base.validation,
            {n: list(v.shape) for n, v in base.weights.items()},
            devices,
            base.accuracy,
            global_blob.digest,
        )
        self._store.keep_base(task_id, (base.model, base.extras))
        log.info(
            "learn.task_started",
            task=task_id,
            model=spec.model,
            base_version=base.version,
            devices=len(devices),
            buffer=stored.buffer,
            server_optimizer=stored.server_optimizer,
            trainable=sorted(base.weights),
            base_accuracy=round(base.accuracy, 4),
            notice=notice,
        )
        return task_id, notice

    def _base(self, spec: pb.LearningSpec) -> Base:
        """The release the task learns from, its trainable tensors, and its validation score."""
        from onnx import numpy_helper

        version = spec.base_version or self._registry.newest_version(spec.model)
        if not version:
            raise NotFound(f"no release of model {spec.model!r} to learn from")
        model, extras = self._store.release_model(spec.model, version)
        output, _ = training_output(model)
        names, _ = trainable_names(model, output, spec.trainable)
        values = {t.name: t for t in model.graph.initializer}
        weights = {n: numpy_helper.to_array(values[n]).astype(np.float32) for n in names}
        if self._registry.blob(spec.validation_blob) is None:
            raise InvalidArgument(
                f"validation blob {spec.validation_blob!r} was not uploaded (UploadBlob)"
            )
        validation = self._store.read_blob(spec.validation_blob)
        score = validation_accuracy(model, validation)
        return Base(version, model, extras, weights, validation, score)

    async def stop(self, task_id: int) -> None:
        await self._exists(task_id)
        await self._db(self._registry.set_task_state, task_id, STOPPED)
        self._store.forget_base(task_id)  # a stopped task aggregates no more
        log.info("learn.task_stopped", task=task_id)
        self._notify()

    async def _exists(self, task_id: int) -> None:
        if not await self._db(self._registry.tasks, task_id, False):
            raise NotFound(f"no learning task {task_id}")

    def assignments(self, device: str) -> list[pb.LearningAssignment]:
        """The learning part of a device's desired state (called on the registry thread)."""
        out = []
        for task in self._registry.device_tasks(device):
            spec = pb.LearningSpec.FromString(task.spec)
            info = self._registry.blob(task.global_digest)
            if info is None:
                continue
            out.append(
                pb.LearningAssignment(
                    task_id=task.id, model=task.model, base_version=task.base_version,
                    global_version=task.global_version,
                    global_weights=pb.BlobRef(
                        digest=info.digest, size=info.size, chunk_size=info.chunk_size,
                        chunk_digests=list(info.chunk_digests),
                    ),
                    trainable=spec.trainable, epochs=spec.epochs, batch_size=spec.batch_size,
                    lr=spec.lr, optimizer=spec.optimizer, int8_threshold=spec.int8_threshold,
                    min_examples=spec.min_examples, train_seconds=spec.train_seconds,
                    round=task.round, proximal_mu=spec.proximal_mu,
                    min_interval=spec.min_interval,
                )
            )  # fmt: skip
        return out

    async def status(self, task_id: int = 0) -> list[pb.LearningTask]:
        """One task (NOT_FOUND if there is none), or every task with 0."""
        if task_id:
            await self._exists(task_id)

        def read() -> list[pb.LearningTask]:
            now = time.time()
            return [
                self._status(task, now) for task in self._registry.tasks(task_id, validation=False)
            ]

        return list(await self._db(read))

    def _status(self, task: LearningTaskRow, now: float) -> pb.LearningTask:
        """A task as learn status shows it (on the registry thread)."""
        c = task.counters
        spec = pb.LearningSpec.FromString(task.spec)
        buffered = self._registry.buffered(task.id)
        versions = self._registry.versions(task.id)
        active = self._registry.active_devices(task.id, now - ACTIVE_S)
        message = pb.LearningTask(
            id=task.id, spec=spec, state=task.state,
            global_version=task.global_version, base_accuracy=task.base_accuracy,
            updates_received=c.get("received", 0), updates_applied=c.get("applied", 0),
            dropped_stale=c.get("dropped_stale", 0), clipped=c.get("clipped", 0),
            refused=c.get("refused", 0), duplicates=c.get("duplicates", 0),
            bytes_up=c.get("bytes_up", 0), fp32_bytes_up=c.get("fp32_bytes_up", 0),
            devices=len(task.devices), buffered=len(buffered), active_devices=active,
            train_seconds=c.get("train_ms", 0) / 1000,
            paused_seconds=c.get("paused_ms", 0) / 1000,
            best_accuracy=max(v.accuracy for v in versions if v.accepted),
            progress=progress(task, spec, buffered, active, now),
        )  # fmt: skip
        if spec.dp_noise_multiplier > 0:
            try:
                message.dp_epsilon = privacy.epsilon(
                    spec.dp_noise_multiplier, len(versions) - 1, spec.dp_delta
                )
            except FailedPrecondition as exc:  # this replica lacks the accountant
                message.progress += f"; epsilon unknown here: {exc}"
        for v in versions:
            message.versions.append(
                pb.GlobalVersion(
                    version=v.version, accuracy=v.accuracy, accepted=v.accepted,
                    released_version=v.released, updates=v.updates, at=v.at,
                )
            )  # fmt: skip
        return message
