"""The agent's side of learning on the fleet: a thread of its own, off the inference path.

The sync's long-poll brings the learning tasks this device takes part in (LearningAssignment).
A device keeps training while a task runs (FedBuff's clients): once it holds `min_examples`
examples of the model it trains, uploads, and trains again as soon as the task's global
weights or its examples change, or `min_interval` seconds after its last run otherwise. A run:
fetch the task's global weights (a blob, chunk-verified, resumable, as the sync fetches
release blobs), train in the worker process (learn/worker.py: nice 19, one thread, a time
budget, kept alive across runs so PyTorch is imported once) from the model serving here with
the global values of its trainable tensors, encode the deltas (int8 above the task's
threshold), and upload them (UploadUpdate) with an id chosen once, so a retry after a cut
connection is applied once. A failed run is logged, counted and tried again after a pause;
serving never waits on any of it.

Serving first (`train_when = "idle"`): while a run trains, this thread samples the agent's
activity every few milliseconds (busy: requests queued or running, or one finished within
`train_quiet_ms`) and tells the worker through a shared file (learn/worker.py's Channel) that
serving is busy; the worker then waits between mini-batches, down to its minimum share of time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from edge_agent._proto import fleet_pb2 as pb
from edge_agent._proto import fleet_pb2_grpc as pb_grpc
from edge_agent.common.device_blobs import BandwidthLimit, DeviceBlobs
from edge_agent.errors import EdgeAgentError
from edge_agent.fleet.connect import FailoverStub
from edge_agent.fleet.release import CHUNK_SIZE
from edge_agent.learn import cgroup
from edge_agent.learn.defaults import TASK_DEFAULTS, min_interval
from edge_agent.learn.delta import encode
from edge_agent.learn.examples import ExampleStore
from edge_agent.learn.process import WORKER_EXIT_S, Cancelled, Pacing, Worker
from edge_agent.learn.worker import PAUSED_NS, PAUSES
from edge_agent.observability.logging import get_logger
from edge_agent.repository.version import read_variant

log = get_logger(__name__)

RETRY_AFTER_S = 60.0  # after a failed local run
UPLOAD_TRIES = 3


@dataclasses.dataclass
class LearningStats:
    """Read by the metrics collector."""

    runs: dict[str, int] = dataclasses.field(default_factory=dict)  # result -> count
    updates_sent: int = 0
    bytes_up: int = 0
    last_run_seconds: float = 0.0
    paused_seconds: float = 0.0  # training time spent waiting for serving
    pauses: int = 0
    worker_starts: int = 0


@dataclasses.dataclass(frozen=True)
class RunMark:
    """What a task's last run on this device started from."""

    global_version: int
    examples: int  # the example store's revision
    finished: float  # time.monotonic()


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


class Participant:
    def __init__(
        self,
        stub: pb_grpc.FleetServiceStub | FailoverStub,
        metadata: Sequence[tuple[str, str]],
        blobs: DeviceBlobs,
        examples: ExampleStore,
        repository: Path,
        serving: Callable[[str], int],
        work_dir: Path,
        activity: Callable[[], tuple[int, int]] | None = None,
        pacing: Pacing | None = None,
    ) -> None:
        self._stub = stub
        self._meta = metadata
        self._blobs = blobs
        self._examples = examples
        self._repository = repository
        self._serving = serving
        self._work = work_dir
        # Each run's examples and update; what a cut left is removed now.
        self._scratch = work_dir / "learning-scratch"
        shutil.rmtree(self._scratch, ignore_errors=True)
        self._scratch.mkdir(parents=True)
        self._globals: dict[int, str] = {}  # task -> the global weights' blob kept for it
        self._activity = activity
        self._pacing = pacing or Pacing()
        self._assignments: dict[int, pb.LearningAssignment] = {}
        self._last: dict[int, RunMark] = {}
        self._failed_at: dict[int, float] = {}
        self._worker: Worker | None = None
        # Now, before the agent says READY: the agent's own threads move to a leaf cgroup.
        self._cgroup, reason = cgroup.prepare_learning()
        if self._cgroup is None:
            log.info("learn.cgroup_unavailable", reason=reason)
        else:
            log.info("learn.cgroup", path=str(self._cgroup), setting=reason)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="learner", daemon=True)
        self.stats = LearningStats()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=WORKER_EXIT_S + 5)

    def assign(self, assignments: Sequence[pb.LearningAssignment]) -> None:
        """The tasks of the latest desired state (from the sync thread)."""
        self._assignments = {a.task_id: a for a in assignments}
        self._wake.set()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._wake.wait(timeout=self._next_wait())
                self._wake.clear()
                tasks = list(self._assignments.values())
                if not tasks:
                    self._end_worker()  # no task runs here: the worker and PyTorch go
                for task in tasks:
                    if self._stop.is_set():
                        return
                    if self._due(task):
                        self._train_once_guarded(task)
        finally:
            self._end_worker()

    def _train_once_guarded(self, task: pb.LearningAssignment) -> None:
        """A run whatever goes wrong in it: an unexpected error (a garbled answer, a broken
        deltas file) costs this run and the worker, never the learner thread."""
        try:
            self._train_once(task)
        except Exception as exc:
            self._failed_at[task.task_id] = time.monotonic()
            self._count("failed")
            log.exception("learn.run_failed", task=task.task_id, error=repr(exc)[:500])
            if self._worker is not None:
                self._worker.kill()
                self._worker = None

    def _end_worker(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def _next_wait(self) -> float:
        """Until the next run falls due by its minimum interval (a change wakes us anyway)."""
        now = time.monotonic()
        waits = [5.0]
        for task in self._assignments.values():
            mark = self._last.get(task.task_id)
            if mark is not None:
                waits.append(mark.finished + min_interval(task) - now)
        return max(0.05, min(waits))

    def _due(self, task: pb.LearningAssignment) -> bool:
        if time.monotonic() - self._failed_at.get(task.task_id, -RETRY_AFTER_S) < RETRY_AFTER_S:
            return False
        if self._examples.rows(task.model) < max(1, task.min_examples):
            return False
        mark = self._last.get(task.task_id)
        if mark is None:
            return True
        if mark.global_version != task.global_version:
            return True  # a newer global to train from
        if mark.examples != self._examples.revision(task.model):
            return True  # new examples
        return time.monotonic() - mark.finished >= min_interval(task)

    def _count(self, result: str) -> None:
        self.stats.runs[result] = self.stats.runs.get(result, 0) + 1

    def _train_once(self, task: pb.LearningAssignment) -> None:
        started = time.monotonic()
        revision = self._examples.revision(task.model)
        log.info("learn.run_started", task=task.task_id, global_version=task.global_version)
        try:
            with (
                self._blobs.hold(task.global_weights.digest),
                tempfile.TemporaryDirectory(dir=self._scratch) as scratch,
            ):
                deltas, result = self._local_run(task, Path(scratch))
                payload = encode(deltas, task.int8_threshold or None)
            self._upload(task, payload, result)
        except Cancelled:
            self._count("cancelled")
            log.info("learn.run_cancelled", task=task.task_id, reason="the agent is stopping")
            return
        except (EdgeAgentError, OSError, subprocess.SubprocessError, grpc.RpcError) as exc:
            if self._stop.is_set():  # the stop cut it short (a closed channel, a killed worker)
                self._count("cancelled")
                log.info("learn.run_cancelled", task=task.task_id, reason="the agent is stopping")
                return
            self._failed_at[task.task_id] = time.monotonic()
            self._count("failed")
            detail = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
            log.warning(
                "learn.run_failed", task=task.task_id, error=str(detail)[:500] or type(exc).__name__
            )
            return
        finally:
            self._last[task.task_id] = RunMark(task.global_version, revision, time.monotonic())
        self._count("ok")
        self.stats.last_run_seconds = time.monotonic() - started
        log.info(
            "learn.update_sent",
            task=task.task_id,
            global_version=task.global_version,
            round=task.round,
            examples=result["examples"],
            loss_before=round(float(result["loss_before"]), 5),
            loss_after=round(float(result["loss_after"]), 5),
            bytes=len(payload),
            seconds=round(self.stats.last_run_seconds, 3),
            epochs=result.get("epochs"),
            paused_seconds=round(float(result.get("paused_seconds", 0.0)), 3),
        )

    def _local_run(self, task: pb.LearningAssignment, scratch: Path) -> tuple[Any, dict[str, Any]]:
        import numpy as np

        version = self._serving(task.model)
        version_dir = self._repository / task.model / str(version)
        if not version or read_variant(version_dir) not in ("", "fp32"):
            raise EdgeAgentError(
                f"learning needs the fp32 model of '{task.model}' serving here "
                f"(serving version {version}, variant {read_variant(version_dir) or '-'})"
            )
        ref = task.global_weights
        global_file = self._blobs.download(
            ref.digest,
            ref.size,
            ref.chunk_size,
            list(ref.chunk_digests),
            self._fetch,
            lambda n: None,
            BandwidthLimit(0),
        )
        # The device keeps one global per task: the one before this is no longer needed.
        previous = self._globals.get(task.task_id)
        if previous not in (None, ref.digest):
            self._blobs.discard([previous])
        self._globals[task.task_id] = ref.digest
        examples = scratch / "examples.npz"
        self._examples.export(task.model, examples)
        budget = task.train_seconds or float(TASK_DEFAULTS["train_seconds"])  # type: ignore[arg-type]
        job = {
            "model_dir": str(version_dir),
            "examples": str(examples),
            "global": str(global_file),
            "spec": {
                # An older control plane leaves fields unset: the same defaults as a new one.
                **{
                    key: getattr(task, key) or TASK_DEFAULTS[key]
                    for key in ("trainable", "epochs", "batch_size", "lr", "optimizer")
                },
                "seconds": budget,
                "proximal_mu": task.proximal_mu,
                # A new shuffle each run: a device training again on the same global and
                # examples must not send the same update twice.
                "seed": secrets.randbits(31),
            },
            "out": str(scratch / "out"),
            "threads": 1,
            "min_share": self._pacing.min_share,
        }
        if self._worker is None or not self._worker.alive():
            if self._worker is not None:
                self._worker.close()
            self._worker = Worker(self._work / "worker", self._cgroup)
            self.stats.worker_starts += 1
        worker = self._worker
        # The channel's counters grow for the worker's life; the stats follow them live.
        seen = [worker.channel.get(PAUSED_NS), worker.channel.get(PAUSES)]

        def follow() -> None:
            paused_ns, pauses = worker.channel.get(PAUSED_NS), worker.channel.get(PAUSES)
            self.stats.paused_seconds += (paused_ns - seen[0]) / 1e9
            self.stats.pauses += pauses - seen[1]
            seen[:] = [paused_ns, pauses]

        try:
            # The budget counts training time; paused time is on top, up to 1/min_share of it.
            timeout = budget / self._pacing.min_share + 120
            answer = worker.run(job, timeout, self._stop, self._pacing, self._activity, follow)
            follow()
        except (Cancelled, EdgeAgentError):
            worker.kill()
            self._worker = None
            raise
        if not answer.get("ok"):
            raise EdgeAgentError(f"local training failed: {answer.get('error') or 'no reason'}")
        with np.load(scratch / "out" / "deltas.npz", allow_pickle=False) as data:
            deltas = {k: data[k] for k in data.files}
        shutil.rmtree(scratch / "out", ignore_errors=True)
        return deltas, answer

    def _fetch(self, digest: str, offset: int) -> Iterator[bytes]:
        call = self._stub.GetBlob(
            pb.GetBlobRequest(digest=digest, offset=offset), metadata=self._meta, timeout=600
        )
        for chunk in call:
            yield chunk.data

    def _upload(self, task: pb.LearningAssignment, payload: bytes, result: dict[str, Any]) -> None:
        update_id = uuid.uuid4().hex  # chosen once: every retry carries it, applied once
        digest = hashlib.sha256(payload).hexdigest()

        def chunks() -> Iterator[pb.UpdateChunk]:
            yield pb.UpdateChunk(
                task_id=task.task_id,
                update_id=update_id,
                base_global_version=task.global_version,
                examples=int(result["examples"]),
                size=len(payload),
                train_seconds=float(result.get("seconds", 0.0)),
                paused_seconds=float(result.get("paused_seconds", 0.0)),
                sha256=digest,
                data=payload[:CHUNK_SIZE],
            )
            for start in range(CHUNK_SIZE, len(payload), CHUNK_SIZE):
                yield pb.UpdateChunk(data=payload[start : start + CHUNK_SIZE])

        for attempt in range(UPLOAD_TRIES):
            try:
                self._stub.UploadUpdate(chunks(), metadata=self._meta, timeout=120)
                break
            except grpc.RpcError as exc:
                retryable = exc.code() in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                )
                if not retryable or attempt == UPLOAD_TRIES - 1:
                    raise  # given up cleanly: the next round trains again
                self._stop.wait(2.0 * (attempt + 1))
        self.stats.updates_sent += 1
        self.stats.bytes_up += len(payload)
