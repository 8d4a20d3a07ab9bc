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
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import math
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from edge_agent._proto import fleet_pb2 as pb
from edge_agent.controlplane.blobs import BlobStore
from edge_agent.controlplane.registry import (
    CANARY,
    FLEET,
    GROUP,
    BlobInfo,
    LearningTaskRow,
    Registry,
    UpdateRow,
    VersionRow,
)
from edge_agent.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from edge_agent.fleet import signing
from edge_agent.fleet.release import (
    CHUNK_SIZE,
    CONFIG,
    DEFAULT_LIFETIME_SECONDS,
    GRAPH,
    MAX_VERSION,
    WARMUP_DIR,
    build_release,
    parse_release,
)
from edge_agent.learn import delta, privacy
from edge_agent.learn.defaults import SERVER_LR_DEFAULTS, TASK_DEFAULTS
from edge_agent.learn.onnxinfo import accuracy, apply, trainable_names, training_output
from edge_agent.observability.logging import get_logger

log = get_logger(__name__)
R = TypeVar("R")
Db = Callable[..., Awaitable[Any]]

SCOPES = {pb.FLEET: FLEET, pb.GROUP: GROUP, pb.CANARY: CANARY}
MAX_VALIDATION_BYTES = 64 << 20
ABSURD_NORM = 1e3  # an update with a norm beyond this many times the global's (or 1e3) is refused
RUNNING, STOPPED = "running", "stopped"
OPTIONAL_FIELDS = {
    f.name for f in pb.LearningSpec.DESCRIPTOR.fields if f.has_presence and f.message_type is None
}  # proto3 `optional`: 0 may be meant
TICK_S = 2.0  # how often running tasks are looked at for max_wait
ACTIVE_S = 600.0  # "active": sent an update within this long


def spec_defaults(spec: pb.LearningSpec) -> pb.LearningSpec:
    """The spec with every unset field at its default (README: Learning on the fleet)."""
    out = pb.LearningSpec()
    out.CopyFrom(spec)
    for key, value in TASK_DEFAULTS.items():
        # An optional field set to 0 is a choice (a strict gate); a plain one at 0 is unset.
        given = out.HasField(key) if key in OPTIONAL_FIELDS else bool(getattr(out, key))
        if not given:
            setattr(out, key, value)
    if not out.server_lr:
        out.server_lr = SERVER_LR_DEFAULTS.get(out.server_optimizer, 1.0)  # bad names: refused
    if out.scope == pb.TARGET_SCOPE_UNSPECIFIED:
        out.scope = pb.FLEET
    return out


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


def server_optimizer(spec: pb.LearningSpec) -> delta.ServerOptimizer:
    """The task's server optimizer (a task stored before server optimizers existed: plain SGD,
    what it ran with)."""
    return delta.ServerOptimizer(
        spec.server_optimizer or "sgd", spec.server_lr or 1.0, spec.server_momentum,
        spec.server_beta1, spec.server_beta2, spec.server_tau or 1e-3,
    )  # fmt: skip


def aggregation(spec: pb.LearningSpec) -> delta.Aggregation:
    return delta.Aggregation(
        buffer=spec.buffer, staleness_exponent=spec.staleness_exponent,
        max_staleness=spec.max_staleness, clip_norm=spec.clip_norm, trim=spec.trim,
        aggregator=spec.aggregator or "mean", dp_noise_multiplier=spec.dp_noise_multiplier,
    )  # fmt: skip


def check_spec(spec: pb.LearningSpec) -> None:
    """Refuse a spec (defaults applied) that cannot run, naming the field."""
    for field in pb.LearningSpec.DESCRIPTOR.fields:
        if field.type == field.TYPE_DOUBLE and not math.isfinite(getattr(spec, field.name)):
            raise InvalidArgument(f"{field.name} must be a finite number")
    if spec.scope not in SCOPES:  # proto3 keeps enum numbers it does not know
        raise InvalidArgument(f"scope {spec.scope}: use FLEET, GROUP or CANARY")
    if spec.base_version > MAX_VERSION:
        raise InvalidArgument(f"base_version {spec.base_version} is not in 0..2^63-1")
    if spec.trainable != "all" and not (
        spec.trainable.startswith("last:")
        and spec.trainable[5:].isascii()
        and spec.trainable[5:].isdigit()
    ):
        raise InvalidArgument(f"trainable {spec.trainable!r}: use all or last:N")
    if spec.optimizer not in ("sgd", "adam"):
        raise InvalidArgument(f"optimizer {spec.optimizer!r}: use sgd or adam")
    if not 0 <= spec.trim < 0.5 or spec.clip_norm < 0 or spec.server_lr <= 0:
        raise InvalidArgument("trim must lie in [0, 0.5), clip_norm >= 0, server_lr > 0")
    server_optimizer(spec)  # raises InvalidArgument naming the bad value
    if spec.aggregator not in ("mean", "median"):
        raise InvalidArgument(f"aggregator {spec.aggregator!r}: use mean or median")
    if spec.aggregator == "median" and spec.trim:
        raise InvalidArgument("aggregator median and trim: choose one")
    if spec.proximal_mu < 0 or spec.min_interval < 0 or spec.max_wait <= 0:
        raise InvalidArgument("proximal_mu and min_interval must be >= 0, max_wait > 0")
    if spec.scope == pb.GROUP and not spec.group:
        raise InvalidArgument("a group task needs a group")
    if spec.scope == pb.CANARY and not 0 < spec.canary_percent <= 100:
        raise InvalidArgument("canary percent must lie in (0, 100]")
    if spec.dp_noise_multiplier < 0 or spec.dp_max_epsilon < 0 or not 0 < spec.dp_delta < 1:
        raise InvalidArgument("dp_noise_multiplier and dp_max_epsilon >= 0, dp_delta in (0, 1)")
    if spec.dp_noise_multiplier > 0:
        if spec.clip_norm <= 0:
            raise InvalidArgument(
                "differential privacy needs clip_norm > 0: the noise is scaled to it"
            )
        if spec.aggregator != "mean" or spec.trim:
            raise InvalidArgument("differential privacy works on the mean (no median or trim)")
        if not privacy.available():
            raise FailedPrecondition(
                "differential privacy needs the accountant on the control plane: "
                "pip install 'edge-agent[privacy]'"
            )
        if spec.dp_max_epsilon and not privacy.aggregations_within(
            spec.dp_noise_multiplier, spec.dp_max_epsilon, spec.dp_delta, limit=1
        ):
            raise InvalidArgument(
                f"dp_max_epsilon {spec.dp_max_epsilon:g} allows no aggregation at noise "
                f"multiplier {spec.dp_noise_multiplier:g} (one costs epsilon "
                f"{privacy.epsilon(spec.dp_noise_multiplier, 1, spec.dp_delta):.3g})"
            )
    elif spec.dp_max_epsilon:
        raise InvalidArgument("dp_max_epsilon needs dp_noise_multiplier > 0")


def one_per_device(spec: pb.LearningSpec) -> bool:
    """Whether an aggregation takes at most one update per device: with differential privacy (a
    device's data moves one sum by at most C) and with the robust aggregators (a device posting
    K updates would otherwise be the whole median)."""
    return spec.dp_noise_multiplier > 0 or spec.aggregator == "median" or spec.trim > 0


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


def _decode_update(data: bytes, shapes: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """A device's update as tensors; what numpy refuses to build from the tensor-set header
    (more dimensions than an array may have) is the device's error, as delta.decode's own
    checks are."""
    try:
        return delta.decode(data, shapes)
    except ValueError as exc:
        raise InvalidArgument(f"not a tensor set: {str(exc)[:200]}") from exc


class ParameterServer:
    def __init__(
        self,
        registry: Registry,
        blobs: BlobStore,
        db: Db,
        notify: Callable[[], None],
        learning_key: Path | None,
    ) -> None:
        self._registry = registry
        self._blobs = blobs
        self._db = db
        self._notify = notify
        self._key = learning_key
        self._locks: dict[int, asyncio.Lock] = {}
        # task -> (its base model, an onnx.ModelProto; the base release's config/warmup files)
        self._models: dict[int, tuple[Any, dict[str, bytes]]] = {}
        self._norms: dict[str, float] = {}  # global weights digest -> L2 norm
        self._jobs: set[asyncio.Future[None]] = set()
        self.aggregations = 0  # read by the metrics collector
        self.gated_out = 0
        self.updates = 0
        self.refused = 0

    # -- blobs ----------------------------------------------------------------------------------

    def _put_blob(self, data: bytes) -> BlobInfo:
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

    def _read_blob(self, digest: str) -> bytes:
        with self._blobs.open(digest) as f:
            return f.read()

    def _base(self, task: LearningTaskRow) -> tuple[Any, dict[str, bytes]]:
        """The task's base model and its config/warmup files, read from the blobs once."""
        base = self._models.get(task.id)
        if base is None:
            base = self._models[task.id] = self._release_model(task.model, task.base_version)
        return base

    def _global_norm(self, digest: str) -> float:
        """L2 norm of a global weights blob (for the absurd-norm check), computed once."""
        if digest not in self._norms:
            self._norms[digest] = delta.norm(delta.decode(self._read_blob(digest)))
        return self._norms[digest]

    def _release_model(self, name: str, version: int) -> tuple[Any, dict[str, bytes]]:
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
                (Path(scratch) / entry.path).write_bytes(self._read_blob(entry.sha256))
                if entry.path == CONFIG or entry.path.startswith(WARMUP_DIR + "/"):
                    extras[entry.path] = (Path(scratch) / entry.path).read_bytes()
            model = onnx.load(str(Path(scratch) / GRAPH))
        return model, extras

    # -- tasks ----------------------------------------------------------------------------------

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

        def prepare() -> tuple[int, str]:
            version = spec.base_version or self._registry.newest_version(spec.model)
            if not version:
                raise NotFound(f"no release of model {spec.model!r} to learn from")
            model, extras = self._release_model(spec.model, version)
            output, _ = training_output(model)
            names, _ = trainable_names(model, output, spec.trainable)
            values = {t.name: t for t in model.graph.initializer}
            from onnx import numpy_helper

            global_values = {n: numpy_helper.to_array(values[n]).astype(np.float32) for n in names}
            if self._registry.blob(spec.validation_blob) is None:
                raise InvalidArgument(
                    f"validation blob {spec.validation_blob!r} was not uploaded (UploadBlob)"
                )
            validation = self._read_blob(spec.validation_blob)
            feeds, labels = read_validation(validation, sorted(self._inputs(model)))
            base_accuracy = accuracy(model, feeds, labels)
            blob = self._put_blob(delta.encode(global_values))
            devices = self._registry.reach(
                SCOPES[spec.scope], spec.group, spec.canary_percent, spec.model, version
            )
            if not devices:
                raise FailedPrecondition("no enrolled device would take part in this task")
            stored = pb.LearningSpec()
            stored.CopyFrom(spec)
            stored.base_version = version
            notice = ""
            if stored.buffer > len(devices):
                # A buffer no set of devices can fill would wait for ever: at most one update
                # per device counts towards it (DP: exactly so).
                notice = (
                    f"buffer {stored.buffer} clamped to {len(devices)}: only {len(devices)} "
                    f"device(s) take part"
                )
                stored.buffer = len(devices)
            stored.min_updates = min(stored.min_updates, stored.buffer)
            task_id = self._registry.add_task(
                spec.model,
                version,
                stored.SerializeToString(),
                validation,
                {n: list(v.shape) for n, v in global_values.items()},
                devices,
                base_accuracy,
                blob.digest,
            )
            self._models[task_id] = (model, extras)
            log.info(
                "learn.task_started",
                task=task_id,
                model=spec.model,
                base_version=version,
                devices=len(devices),
                buffer=stored.buffer,
                server_optimizer=stored.server_optimizer,
                trainable=sorted(names),
                base_accuracy=round(base_accuracy, 4),
                notice=notice,
            )
            return task_id, notice

        task_id, notice = await self._db(prepare)
        self._notify()
        return int(task_id), str(notice)

    async def stop(self, task_id: int) -> None:
        tasks = await self._db(self._registry.tasks, task_id, False)
        if not tasks:
            raise NotFound(f"no learning task {task_id}")
        await self._db(self._registry.set_task_state, task_id, STOPPED)
        self._models.pop(task_id, None)  # a stopped task aggregates no more
        log.info("learn.task_stopped", task=task_id)
        self._notify()

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
        def read() -> list[pb.LearningTask]:
            out = []
            now = time.time()
            for task in self._registry.tasks(task_id, validation=False):
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
                out.append(message)
            return out

        if task_id:
            found = await self._db(self._registry.tasks, task_id, False)
            if not found:
                raise NotFound(f"no learning task {task_id}")
        return list(await self._db(read))

    # -- updates --------------------------------------------------------------------------------

    async def receive(self, device: str, header: pb.UpdateChunk, payload: bytes) -> pb.UpdateAck:
        """A device's update, whole and its digest checked by the caller."""
        tasks = await self._db(self._registry.tasks, header.task_id, False)
        if not tasks:
            raise NotFound(f"no learning task {header.task_id}")
        task = tasks[0]
        if device not in task.devices:
            await self._db(self._registry.count, task.id, refused=1)
            raise PermissionDenied(f"this device takes no part in learning task {task.id}")
        if task.state != RUNNING:
            raise FailedPrecondition(f"learning task {task.id} is {task.state}")
        if not 0 < len(header.update_id) <= 64 or not header.update_id.isprintable():
            raise InvalidArgument("update_id must be 1-64 printable characters")
        if header.examples < 1 or header.examples > 1 << 40:
            raise InvalidArgument(f"examples {header.examples}: not a count of examples")
        spec = pb.LearningSpec.FromString(task.spec)
        if header.base_global_version > task.global_version:
            await self._db(self._registry.count, task.id, refused=1)
            raise InvalidArgument(
                f"update from global version {header.base_global_version}, which does not "
                f"exist yet (the task is at {task.global_version})"
            )
        known = await self._db(self._registry.update_state, task.id, header.update_id)
        if known is not None:
            await self._db(self._registry.count, task.id, duplicates=1)
            return pb.UpdateAck(state="duplicate", global_version=task.global_version)
        try:
            deltas = await asyncio.to_thread(_decode_update, payload, task.shapes)
            size = delta.norm(deltas)
            global_norm = await asyncio.to_thread(self._global_norm, task.global_digest)
            limit = ABSURD_NORM * max(1.0, global_norm)
            if size > limit:
                raise InvalidArgument(f"update norm {size:.3g} is absurd (over {limit:.3g})")
        except InvalidArgument as exc:
            self.refused += 1
            await self._db(self._registry.count, task.id, refused=1)
            log.warning("learn.update_refused", task=task.id, device=device, error=str(exc)[:300])
            raise
        staleness = task.global_version - header.base_global_version
        state = "buffered" if staleness <= spec.max_staleness else "dropped_stale"
        info = await self._db(self._put_blob, payload)
        row = UpdateRow(
            header.update_id, device, header.base_global_version, int(header.examples), info.digest
        )
        added = await self._db(self._registry.add_update, task.id, row, state, time.time())
        if not added:  # the same id raced in: counted once
            await self._db(self._registry.count, task.id, duplicates=1)
            return pb.UpdateAck(state="duplicate", global_version=task.global_version)
        self.updates += 1
        fp32 = 4 * sum(int(np.prod(s)) for s in task.shapes.values())
        seconds = [
            max(0.0, min(v, 1e6)) if np.isfinite(v) else 0.0
            for v in (header.train_seconds, header.paused_seconds)
        ]  # a device's own report: bounded, for the status only
        seconds[1] = min(seconds[1], seconds[0])  # paused is part of the run's time
        await self._db(
            self._registry.count, task.id, received=1, bytes_up=len(payload), fp32_bytes_up=fp32,
            train_ms=int(seconds[0] * 1000), paused_ms=int(seconds[1] * 1000),
            **({"dropped_stale": 1} if state == "dropped_stale" else {}),
        )  # fmt: skip
        log.info(
            "learn.update_received", task=task.id, device=device, state=state,
            staleness=staleness, bytes=len(payload), norm=round(size, 5),
        )  # fmt: skip
        if state == "buffered":  # the ack does not wait for the aggregation
            job = asyncio.ensure_future(self.aggregate_when_full(task.id))
            self._jobs.add(job)
            job.add_done_callback(self._jobs.discard)
        return pb.UpdateAck(state=state, global_version=task.global_version)

    # -- aggregation ----------------------------------------------------------------------------

    async def aggregate_when_full(self, task_id: int) -> None:
        """Aggregate once `buffer` updates wait, or `max_wait` passed with `min_updates` in
        (one aggregation at a time per task)."""
        lock = self._locks.setdefault(task_id, asyncio.Lock())
        async with lock:
            try:
                # Read cheaply first (an upload calls this): the validation set only once due.
                tasks = await self._db(self._registry.tasks, task_id, False)
                if not tasks or tasks[0].state != RUNNING:
                    return
                spec = pb.LearningSpec.FromString(tasks[0].spec)
                waiting = await self._db(self._registry.buffered, task_id)
                taken, dropped = due(spec, waiting, time.time(), tasks[0].global_version)
                if not taken:
                    return
                if spec.dp_max_epsilon > 0 and (
                    privacy.epsilon(spec.dp_noise_multiplier, tasks[0].round + 1, spec.dp_delta)
                    > spec.dp_max_epsilon
                ):
                    await self._db(self._exhaust, tasks[0])
                    return
                (task,) = await self._db(self._registry.tasks, task_id)
                version = await self._db(self._aggregate, task, spec, taken, dropped)
                if version.accepted and version.accuracy >= await self._db(
                    self._best_released, task_id
                ):
                    released = await self._db(self._release, task, spec, version)
                    await self._db(self._registry.set_released, task_id, version.version, released)
            except Aborted as exc:  # another replica took this buffer: decided once
                log.info("learn.aggregated_elsewhere", task=task_id, reason=str(exc))
                return
            except Exception:  # logged; the updates stay buffered and the next one retries
                log.exception("learn.aggregation_failed", task=task_id)
                return
        self._notify()

    def _exhaust(self, task: LearningTaskRow) -> None:
        """The next aggregation would spend more privacy than the task allows: it stops."""
        spec = pb.LearningSpec.FromString(task.spec)
        self._registry.count(task.id, dp_exhausted=1)  # first: "stopped" is read with its why
        self._registry.set_task_state(task.id, STOPPED)
        self._models.pop(task.id, None)
        log.info(
            "learn.privacy_budget_spent",
            task=task.id,
            epsilon=round(privacy.epsilon(spec.dp_noise_multiplier, task.round, spec.dp_delta), 4),
            max_epsilon=spec.dp_max_epsilon,
            aggregations=task.round,
        )

    def _best_released(self, task_id: int) -> float:
        return max(v.accuracy for v in self._registry.versions(task_id) if v.released)

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
                for task_id in await self._db(self._due_tasks, time.time()):
                    await self.aggregate_when_full(task_id)
            except Exception:  # the database or blob store is away: the next tick tries again
                log.exception("learn.tick_failed", recovered=recovered)
            await asyncio.sleep(TICK_S)

    def _due_tasks(self, now: float) -> list[int]:
        """Running tasks with a buffer due now (read cheaply: specs and waiting rows only)."""
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
        settings = aggregation(spec)
        updates, clipped = [], 0
        for row in waiting:
            deltas = delta.decode(self._read_blob(row.digest), task.shapes)
            deltas, was_clipped = delta.clip(deltas, spec.clip_norm)
            clipped += was_clipped
            updates.append(
                delta.Update(deltas, row.examples, task.global_version - row.base_global)
            )
        pseudo_gradient = delta.aggregate(updates, settings)
        current = delta.decode(self._read_blob(task.global_digest))
        state_digest = self._registry.optimizer_state(task.id, task.global_version)
        state = (
            delta.decode(self._read_blob(state_digest), limit=delta.STATE_MAX_TENSORS)
            if state_digest
            else {}
        )
        candidate, new_state = server_optimizer(spec).apply(current, pseudo_gradient, state)
        model = apply(self._base(task)[0], candidate, add=False)
        feeds, labels = read_validation(task.validation, sorted(self._inputs(model)))
        score = accuracy(model, feeds, labels)
        versions = self._registry.versions(task.id)
        best = max(v.accuracy for v in versions if v.accepted)
        accepted = score >= best - spec.max_accuracy_drop
        digest = self._put_blob(delta.encode(candidate)).digest
        optimizer_digest = self._put_blob(delta.encode(new_state)).digest if accepted else ""
        number = max(v.version for v in versions) + 1
        version = VersionRow(number, digest, score, accepted, 0, len(updates), time.time())
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
        self.aggregations += 1
        self.gated_out += not accepted
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
            20 if accepted else 30,
            "learn.gate",
            task=task.id,
            candidate=number,
            accuracy=round(score, 4),
            best_accuracy=round(best, 4),
            base_accuracy=round(task.base_accuracy, 4),
            max_drop=spec.max_accuracy_drop,
            accepted=accepted,
        )
        return version

    @staticmethod
    def _inputs(model: Any) -> set[str]:
        initializers = {t.name for t in model.graph.initializer}
        return {i.name for i in model.graph.input if i.name not in initializers}

    def _release(self, task: LearningTaskRow, spec: pb.LearningSpec, version: VersionRow) -> int:
        """The accepted candidate as the model's next release, signed with the learning key,
        registered and rolled out to the task's devices. Returns its model version."""
        import onnx

        assert self._key is not None
        candidate = delta.decode(self._read_blob(version.digest))
        base, extras = self._base(task)
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
                self._put_blob((out / entry.path).read_bytes())
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

    async def recover(self) -> None:
        """At start: release an accepted best global that a crash left unreleased; aggregate
        what a crash left buffered. Under each task's lock, as an aggregation is."""
        tasks = await self._db(self._registry.tasks, 0, False)
        for task in tasks:
            if task.state != RUNNING:
                continue
            async with self._locks.setdefault(task.id, asyncio.Lock()):
                versions = await self._db(self._registry.versions, task.id)
                current = next(v for v in versions if v.version == task.global_version)
                if (
                    current.accepted
                    and not current.released
                    and current.accuracy >= await self._db(self._best_released, task.id)
                    and self._key is not None
                ):
                    spec = pb.LearningSpec.FromString(task.spec)
                    released = await self._db(self._release, task, spec, current)
                    await self._db(self._registry.set_released, task.id, current.version, released)
            await self.aggregate_when_full(task.id)
