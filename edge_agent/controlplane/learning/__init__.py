"""The parameter server: learning tasks, devices' updates, buffered asynchronous aggregation,
the validation gate, and each gated improvement shipped as a signed release.

A task (StartLearning) names a model's fp32 release as its base, the devices that take part
(fleet, group or canary cohort, fixed at start), what trains and how the server aggregates. Its
global weights (the trainable tensors) start as the base's and live as a blob; devices learn of
the task through the long-poll they already make (LearningAssignment) and send updates
(UploadUpdate): deltas per trainable tensor, int8 above a size threshold. Each is checked
(task, participant, names, shapes, dtypes, finite values, a sane norm, staleness) and stored
before it counts; an update id seen before is acknowledged and not counted again.

Devices keep training while the task runs (learn/participant.py), so a buffer fills from any
mix of them; `buffer` is clamped at start to the number of devices taking part, and once
`max_wait` seconds have passed since the oldest waiting update, what waits is aggregated if at
least `min_updates` are in: a device offline or revoked never stalls a task. Aggregation
(learn/delta.py): clipped, weighted by examples and staleness (or a trimmed mean, or the
median), fed as a pseudo-gradient to the task's server optimizer (sgd, momentum, adagrad, adam,
yogi), whose state is stored beside the global weights. The candidate is evaluated on the task's
validation set in ONNX Runtime, and:
- accuracy >= the best accepted global's - max_accuracy_drop (the base counts as accepted): it
  becomes the global weights devices train from, so a run of bad buffers cannot walk the model
  down; if it is also at least as good as the best released one it becomes a release (the next
  version of the model), signed with the control plane's learning key and rolled out to the
  task's devices through the ordinary rollout path: what serves is the best accepted global;
- else it is kept out (recorded, logged, counted) and the global weights stay.
With central differential privacy (dp_noise_multiplier z > 0, clip_norm C > 0) every buffer
takes at most one update per device, Gaussian noise of std z * C is added to the sum, and the
privacy spent is accounted (learn/privacy.py); a task stops before an aggregation would spend
more than dp_max_epsilon.
One aggregation is one registry transaction (`advance`): a restart mid-task loses no accepted
update, applies none twice, and continues the server optimizer exactly where it was.
Everything heavy runs on worker threads, never on the event loop.

The parts: learning/spec.py (a task's spec, defaults and refusals), learning/tasks.py (start,
status, assignments, stop), learning/aggregation.py (updates in, buffer to candidate),
learning/gate.py (the validation gate and the release), learning/store.py (the blobs and base
models they share). ParameterServer composes them and keeps the tick that makes max_wait hold.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from edge_agent._proto import fleet_pb2 as pb
from edge_agent.controlplane.blobs import BlobStore
from edge_agent.controlplane.learning.aggregation import (
    ABSURD_NORM,
    Aggregator,
    LearningStats,
    _decode_update,
    due,
)
from edge_agent.controlplane.learning.gate import MAX_VALIDATION_BYTES, Gate, read_validation
from edge_agent.controlplane.learning.spec import (
    OPTIONAL_FIELDS,
    SCOPES,
    aggregation,
    check_spec,
    one_per_device,
    server_optimizer,
    spec_defaults,
)
from edge_agent.controlplane.learning.store import LearningStore
from edge_agent.controlplane.learning.tasks import ACTIVE_S, Tasks, progress
from edge_agent.controlplane.registry import RUNNING, STOPPED, Registry
from edge_agent.controlplane.shared import Db
from edge_agent.observability.logging import get_logger

__all__ = [
    "ABSURD_NORM",
    "ACTIVE_S",
    "MAX_VALIDATION_BYTES",
    "OPTIONAL_FIELDS",
    "RUNNING",
    "SCOPES",
    "STOPPED",
    "TICK_S",
    "LearningStats",
    "ParameterServer",
    "_decode_update",
    "aggregation",
    "check_spec",
    "due",
    "one_per_device",
    "progress",
    "read_validation",
    "server_optimizer",
    "spec_defaults",
]

log = get_logger(__name__)

TICK_S = 2.0  # how often running tasks are looked at for max_wait


class ParameterServer:
    """The learning side of the fleet service: tasks, updates, aggregation, releases."""

    def __init__(
        self,
        registry: Registry,
        blobs: BlobStore,
        db: Db,
        notify: Callable[[], None],
        learning_key: Path | None,
    ) -> None:
        self._registry = registry
        self._db = db
        store = LearningStore(registry, blobs)
        self._gate = Gate(registry, store, learning_key)
        self._tasks = Tasks(registry, db, store, notify, learning_key)
        self._aggregator = Aggregator(registry, db, store, self._gate, notify)
        self.stats = self._aggregator.stats  # read by the metrics collector

    async def start(self, spec: pb.LearningSpec) -> tuple[int, str]:
        """Start a task; returns its id and a notice of what was changed (a clamped buffer)."""
        return await self._tasks.start(spec)

    async def stop(self, task_id: int) -> None:
        await self._tasks.stop(task_id)

    def assignments(self, device: str) -> list[pb.LearningAssignment]:
        """The learning part of a device's desired state (called on the registry thread)."""
        return self._tasks.assignments(device)

    async def status(self, task_id: int = 0) -> list[pb.LearningTask]:
        return await self._tasks.status(task_id)

    async def receive(self, device: str, header: pb.UpdateChunk, payload: bytes) -> pb.UpdateAck:
        """A device's update, whole and its digest checked by the caller."""
        return await self._aggregator.receive(device, header, payload)

    async def aggregate_when_full(self, task_id: int) -> None:
        await self._aggregator.aggregate_when_full(task_id)

    async def run_forever(self) -> None:
        """Recover what a crash left, then look at running tasks every TICK_S: what waits past
        max_wait is aggregated there (an upload triggers the full-buffer case itself). Neither
        a failed recovery nor a failed tick ends the loop: it is what keeps max_wait."""
        recovered = False
        while True:
            try:
                if not recovered:
                    await self.recover()
                    recovered = True
                for task_id in await self._db(self._aggregator.due_tasks, time.time()):
                    await self._aggregator.aggregate_when_full(task_id)
            except Exception:  # the database or blob store is away: the next tick tries again
                log.exception("learn.tick_failed", recovered=recovered)
            await asyncio.sleep(TICK_S)

    async def recover(self) -> None:
        """At start: release an accepted best global that a crash left unreleased; aggregate
        what a crash left buffered. Under each task's lock, as an aggregation is."""
        tasks = await self._db(self._registry.tasks, 0, False)
        for task in tasks:
            if task.state != RUNNING:
                continue
            async with self._aggregator.lock(task.id):
                await self._db(self._gate.release_unreleased, task)
            await self._aggregator.aggregate_when_full(task.id)
