"""Devices' updates in, global weights out: each update is checked and buffered; a due buffer
becomes one weighted mean (or trimmed mean, or median) of clipped deltas, fed as a pseudo-gradient
to the task's server optimizer, and the candidate goes through the gate (learning/gate.py).

One aggregation at a time per task (a lock each); one aggregation is one registry transaction
(`advance`), so a restart mid-task loses no accepted update, applies none twice, and continues the
server optimizer exactly where it was. With differential privacy a task stops before an
aggregation would spend more than dp_max_epsilon.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable

import numpy as np

from edge_agent._proto import fleet_pb2 as pb
from edge_agent.controlplane.learning.gate import Gate, Verdict
from edge_agent.controlplane.learning.spec import (
    aggregation,
    one_per_device,
    server_optimizer,
)
from edge_agent.controlplane.learning.store import LearningStore
from edge_agent.controlplane.registry import (
    RUNNING,
    STOPPED,
    LearningTaskRow,
    Registry,
    UpdateRow,
    VersionRow,
)
from edge_agent.controlplane.shared import Db
from edge_agent.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from edge_agent.learn import delta, privacy
from edge_agent.observability.logging import get_logger

log = get_logger(__name__)

ABSURD_NORM = 1e3  # an update with a norm beyond this many times the global's (or 1e3) is refused
MAX_UPDATE_ID_CHARS = 64
MAX_EXAMPLES = 1 << 40
MAX_REPORTED_SECONDS = 1e6


@dataclasses.dataclass
class LearningStats:
    """Read by the metrics collector (controlplane/server.py)."""

    aggregations: int = 0
    gated_out: int = 0
    updates: int = 0
    refused: int = 0


def due(
    spec: pb.LearningSpec, waiting: list[UpdateRow], now: float, global_version: int
) -> tuple[list[UpdateRow], dict[str, str]]:
    """What the next aggregation takes now, and what it drops (update id -> state): a full
    buffer, or after max_wait at least min_updates; nothing taken: not due yet. Updates grown
    older than max_staleness while they waited are dropped ("dropped_stale"); where one update
    per device counts, a device's newest one is taken and its older ones dropped
    ("superseded"), so no backlog builds up."""
    dropped = {
        r.update_id: "dropped_stale"
        for r in waiting
        if global_version - r.base_global > spec.max_staleness
    }
    fresh = [r for r in waiting if r.update_id not in dropped]
    if one_per_device(spec):
        newest: dict[str, UpdateRow] = {}
        for row in fresh:  # oldest first: the last one seen of a device is its newest
            if row.device_id in newest:
                dropped[newest[row.device_id].update_id] = "superseded"
            newest[row.device_id] = row
        fresh = sorted(newest.values(), key=lambda r: r.at)
    if len(fresh) >= spec.buffer:
        taken = fresh[: spec.buffer]
    elif (
        fresh
        and spec.max_wait > 0  # 0: a task from before max_wait, which waited for a full buffer
        and len(fresh) >= (spec.min_updates or spec.buffer)
        and now - fresh[0].at >= spec.max_wait
    ):
        taken = fresh
    else:
        return [], {}
    return taken, dropped


def _decode_update(data: bytes, shapes: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """A device's update as tensors; what numpy refuses to build from the tensor-set header
    (more dimensions than an array may have) is the device's error, as delta.decode's own
    checks are."""
    try:
        return delta.decode(data, shapes)
    except ValueError as exc:
        raise InvalidArgument(f"not a tensor set: {str(exc)[:200]}") from exc


def check_header(header: pb.UpdateChunk) -> None:
    if not 0 < len(header.update_id) <= MAX_UPDATE_ID_CHARS or not header.update_id.isprintable():
        raise InvalidArgument("update_id must be 1-64 printable characters")
    if header.examples < 1 or header.examples > MAX_EXAMPLES:
        raise InvalidArgument(f"examples {header.examples}: not a count of examples")


def reported_seconds(header: pb.UpdateChunk) -> tuple[float, float]:
    """The run's training and paused seconds, as the device reports them: bounded (they are
    for the status only), paused no more than the run."""
    train, paused = (
        max(0.0, min(v, MAX_REPORTED_SECONDS)) if np.isfinite(v) else 0.0
        for v in (header.train_seconds, header.paused_seconds)
    )
    return train, min(paused, train)


class Aggregator:
    def __init__(
        self,
        registry: Registry,
        db: Db,
        store: LearningStore,
        gate: Gate,
        notify: Callable[[], None],
    ) -> None:
        self._registry = registry
        self._db = db
        self._store = store
        self._gate = gate
        self._notify = notify
        self._locks: dict[int, asyncio.Lock] = {}
        self._jobs: set[asyncio.Future[None]] = set()
        self.stats = LearningStats()

    def lock(self, task_id: int) -> asyncio.Lock:
        """Held by an aggregation of the task (and by recovery, which may release)."""
        return self._locks.setdefault(task_id, asyncio.Lock())

    # -- updates --------------------------------------------------------------------------------

    async def receive(self, device: str, header: pb.UpdateChunk, payload: bytes) -> pb.UpdateAck:
        """A device's update, whole and its digest checked by the caller."""
        task = await self._task_taking(device, header)
        known = await self._db(self._registry.update_state, task.id, header.update_id)
        if known is not None:
            await self._db(self._registry.count, task.id, duplicates=1)
            return pb.UpdateAck(state="duplicate", global_version=task.global_version)
        size = await self._sane_norm(task, device, payload)
        spec = pb.LearningSpec.FromString(task.spec)
        staleness = task.global_version - header.base_global_version
        state = "buffered" if staleness <= spec.max_staleness else "dropped_stale"
        info = await self._db(self._store.put_blob, payload)
        row = UpdateRow(
            header.update_id, device, header.base_global_version, int(header.examples), info.digest
        )
        added = await self._db(self._registry.add_update, task.id, row, state, time.time())
        if not added:  # the same id raced in: counted once
            await self._db(self._registry.count, task.id, duplicates=1)
            return pb.UpdateAck(state="duplicate", global_version=task.global_version)
        self.stats.updates += 1
        await self._count_received(task, header, len(payload), state)
        log.info(
            "learn.update_received", task=task.id, device=device, state=state,
            staleness=staleness, bytes=len(payload), norm=round(size, 5),
        )  # fmt: skip
        if state == "buffered":  # the ack does not wait for the aggregation
            job = asyncio.ensure_future(self.aggregate_when_full(task.id))
            self._jobs.add(job)
            job.add_done_callback(self._jobs.discard)
        return pb.UpdateAck(state=state, global_version=task.global_version)

    async def _task_taking(self, device: str, header: pb.UpdateChunk) -> LearningTaskRow:
        """The running task the update is for, refused unless the device takes part and the
        header makes sense."""
        tasks = await self._db(self._registry.tasks, header.task_id, False)
        if not tasks:
            raise NotFound(f"no learning task {header.task_id}")
        task: LearningTaskRow = tasks[0]
        if device not in task.devices:
            await self._db(self._registry.count, task.id, refused=1)
            raise PermissionDenied(f"this device takes no part in learning task {task.id}")
        if task.state != RUNNING:
            raise FailedPrecondition(f"learning task {task.id} is {task.state}")
        check_header(header)
        if header.base_global_version > task.global_version:
            await self._db(self._registry.count, task.id, refused=1)
            raise InvalidArgument(
                f"update from global version {header.base_global_version}, which does not "
                f"exist yet (the task is at {task.global_version})"
            )
        return task

    async def _sane_norm(self, task: LearningTaskRow, device: str, payload: bytes) -> float:
        """The update's norm; a payload that is no tensor set of the task's shapes, or whose
        norm is absurd, is refused (logged and counted)."""
        try:
            deltas = await asyncio.to_thread(_decode_update, payload, task.shapes)
            size = delta.norm(deltas)
            global_norm = await asyncio.to_thread(self._store.global_norm, task.global_digest)
            limit = ABSURD_NORM * max(1.0, global_norm)
            if size > limit:
                raise InvalidArgument(f"update norm {size:.3g} is absurd (over {limit:.3g})")
        except InvalidArgument as exc:
            self.stats.refused += 1
            await self._db(self._registry.count, task.id, refused=1)
            log.warning("learn.update_refused", task=task.id, device=device, error=str(exc)[:300])
            raise
        return size

    async def _count_received(
        self, task: LearningTaskRow, header: pb.UpdateChunk, size: int, state: str
    ) -> None:
        fp32 = 4 * sum(int(np.prod(s)) for s in task.shapes.values())
        train, paused = reported_seconds(header)
        await self._db(
            self._registry.count, task.id, received=1, bytes_up=size, fp32_bytes_up=fp32,
            train_ms=int(train * 1000), paused_ms=int(paused * 1000),
            **({"dropped_stale": 1} if state == "dropped_stale" else {}),
        )  # fmt: skip

    # -- aggregation ----------------------------------------------------------------------------

    async def aggregate_when_full(self, task_id: int) -> None:
        """Aggregate once `buffer` updates wait, or `max_wait` passed with `min_updates` in
        (one aggregation at a time per task)."""
        async with self.lock(task_id):
            try:
                if not await self._aggregate_if_due(task_id):
                    return
            except Aborted as exc:  # another replica took this buffer: decided once
                log.info("learn.aggregated_elsewhere", task=task_id, reason=str(exc))
                return
            except Exception:  # logged; the updates stay buffered and the next one retries
                log.exception("learn.aggregation_failed", task=task_id)
                return
        self._notify()

    async def _aggregate_if_due(self, task_id: int) -> bool:
        """One aggregation, if the task's buffer is due; returns whether the task changed."""
        # Read cheaply first (an upload calls this): the validation set only once due.
        tasks = await self._db(self._registry.tasks, task_id, False)
        if not tasks or tasks[0].state != RUNNING:
            return False
        spec = pb.LearningSpec.FromString(tasks[0].spec)
        waiting = await self._db(self._registry.buffered, task_id)
        taken, dropped = due(spec, waiting, time.time(), tasks[0].global_version)
        if not taken:
            return False
        if spec.dp_max_epsilon > 0 and (
            privacy.epsilon(spec.dp_noise_multiplier, tasks[0].round + 1, spec.dp_delta)
            > spec.dp_max_epsilon
        ):
            await self._db(self._exhaust, tasks[0])
            return False
        (task,) = await self._db(self._registry.tasks, task_id)
        version = await self._db(self._aggregate, task, spec, taken, dropped)
        await self._db(self._gate.release_if_best, task, spec, version)
        return True

    def _exhaust(self, task: LearningTaskRow) -> None:
        """The next aggregation would spend more privacy than the task allows: it stops."""
        spec = pb.LearningSpec.FromString(task.spec)
        self._registry.count(task.id, dp_exhausted=1)  # first: "stopped" is read with its why
        self._registry.set_task_state(task.id, STOPPED)
        self._store.forget_base(task.id)
        log.info(
            "learn.privacy_budget_spent",
            task=task.id,
            epsilon=round(privacy.epsilon(spec.dp_noise_multiplier, task.round, spec.dp_delta), 4),
            max_epsilon=spec.dp_max_epsilon,
            aggregations=task.round,
        )

    def due_tasks(self, now: float) -> list[int]:
        """Running tasks with a buffer due now (read cheaply: specs and waiting rows only; on
        the registry thread)."""
        due_now = []
        for task_id, raw, global_version in self._registry.running_tasks():
            waiting = self._registry.buffered(task_id)
            if due(pb.LearningSpec.FromString(raw), waiting, now, global_version)[0]:
                due_now.append(task_id)
        return due_now

    def _aggregate(
        self,
        task: LearningTaskRow,
        spec: pb.LearningSpec,
        waiting: list[UpdateRow],
        dropped: dict[str, str],
    ) -> VersionRow:
        """Buffer -> candidate -> gate, stored in one transaction (on the registry thread)."""
        updates, clipped = self._clipped_updates(task, spec, waiting)
        pseudo_gradient = delta.aggregate(updates, aggregation(spec))
        current = delta.decode(self._store.read_blob(task.global_digest))
        state_digest = self._registry.optimizer_state(task.id, task.global_version)
        state = (
            delta.decode(self._store.read_blob(state_digest), limit=delta.STATE_MAX_TENSORS)
            if state_digest
            else {}
        )
        candidate, new_state = server_optimizer(spec).apply(current, pseudo_gradient, state)
        verdict = self._gate.judge(task, spec, candidate)
        digest = self._store.put_blob(delta.encode(candidate)).digest
        optimizer_digest = (
            self._store.put_blob(delta.encode(new_state)).digest if verdict.accepted else ""
        )
        number = max(v.version for v in self._registry.versions(task.id)) + 1
        version = VersionRow(
            number, digest, verdict.accuracy, verdict.accepted, 0, len(updates), time.time()
        )
        counters = {"applied": len(updates), "clipped": clipped}
        for state_name in dropped.values():
            counters[state_name] = counters.get(state_name, 0) + 1
        self._registry.advance(
            task.id,
            [u.update_id for u in waiting],
            version,
            counters,
            optimizer_digest,
            dropped,
            task.round,
        )
        self.stats.aggregations += 1
        self.stats.gated_out += not verdict.accepted
        self._log_aggregated(task, spec, number, updates, clipped, verdict)
        return version

    def _clipped_updates(
        self, task: LearningTaskRow, spec: pb.LearningSpec, waiting: list[UpdateRow]
    ) -> tuple[list[delta.Update], int]:
        """The buffered updates, each clipped to clip_norm; and how many were clipped."""
        updates, clipped = [], 0
        for row in waiting:
            deltas = delta.decode(self._store.read_blob(row.digest), task.shapes)
            deltas, was_clipped = delta.clip(deltas, spec.clip_norm)
            clipped += was_clipped
            updates.append(
                delta.Update(deltas, row.examples, task.global_version - row.base_global)
            )
        return updates, clipped

    @staticmethod
    def _log_aggregated(
        task: LearningTaskRow,
        spec: pb.LearningSpec,
        number: int,
        updates: list[delta.Update],
        clipped: int,
        verdict: Verdict,
    ) -> None:
        log.info(
            "learn.aggregated",
            task=task.id,
            candidate=number,
            updates=len(updates),
            clipped=clipped,
            staleness=[u.staleness for u in updates],
            server_optimizer=spec.server_optimizer or "sgd",
        )
        log.log(
            20 if verdict.accepted else 30,
            "learn.gate",
            task=task.id,
            candidate=number,
            accuracy=round(verdict.accuracy, 4),
            best_accuracy=round(verdict.best_accuracy, 4),
            base_accuracy=round(task.base_accuracy, 4),
            max_drop=spec.max_accuracy_drop,
            accepted=verdict.accepted,
        )
