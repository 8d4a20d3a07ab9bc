"""The agent's side of learning on the fleet: a thread of its own, off the inference path.

The sync's long-poll brings the learning tasks this device takes part in (LearningAssignment).
For each task, once per aggregation round and once the device holds `min_examples` examples of
the model: fetch the task's global weights (a blob, chunk-verified, resumable, as the sync
fetches release blobs), then train in a worker process (learn/worker.py: nice 19, one thread,
a time budget) from the model serving here with the global values of its trainable tensors,
encode the deltas (int8 above the task's threshold), and upload them (UploadUpdate) with an id
chosen once, so a retry after a cut connection is applied once. A failed run is logged, counted
and tried again after a pause; serving never waits on any of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
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
from edge_agent.errors import EdgeAgentError
from edge_agent.fleet.client import FailoverStub
from edge_agent.fleet.release import CHUNK_SIZE
from edge_agent.learn.delta import encode
from edge_agent.learn.examples import ExampleStore
from edge_agent.observability.logging import get_logger
from edge_agent.repository.version import read_variant
from edge_agent.sync.store import BandwidthLimit, BlobStore

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
        store: BlobStore,
        examples: ExampleStore,
        repository: Path,
        serving: Callable[[str], int],
        work_dir: Path,
    ) -> None:
        self._stub = stub
        self._meta = metadata
        self._blobs = store
        self._examples = examples
        self._repository = repository
        self._serving = serving
        self._work = work_dir
        self._assignments: dict[int, pb.LearningAssignment] = {}
        self._done: dict[int, int] = {}  # task -> the round trained last
        self._failed_at: dict[int, float] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="learner", daemon=True)
        self.stats = LearningStats()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def assign(self, assignments: Sequence[pb.LearningAssignment]) -> None:
        """The tasks of the latest desired state (from the sync thread)."""
        self._assignments = {a.task_id: a for a in assignments}
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=5)
            self._wake.clear()
            for task in list(self._assignments.values()):
                if self._stop.is_set():
                    return
                if self._due(task):
                    self._train_once(task)

    def _due(self, task: pb.LearningAssignment) -> bool:
        if self._done.get(task.task_id) == task.round:
            return False
        if time.monotonic() - self._failed_at.get(task.task_id, -RETRY_AFTER_S) < RETRY_AFTER_S:
            return False
        return self._examples.rows(task.model) >= max(1, task.min_examples)

    def _count(self, result: str) -> None:
        self.stats.runs[result] = self.stats.runs.get(result, 0) + 1

    def _train_once(self, task: pb.LearningAssignment) -> None:
        started = time.monotonic()
        try:
            with tempfile.TemporaryDirectory(dir=self._work) as scratch:
                deltas, result = self._local_run(task, Path(scratch))
                payload = encode(deltas, task.int8_threshold or None)
            self._upload(task, payload, int(result["examples"]))
        except (EdgeAgentError, OSError, subprocess.SubprocessError, grpc.RpcError) as exc:
            self._failed_at[task.task_id] = time.monotonic()
            self._count("failed")
            detail = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
            log.warning("learn.run_failed", task=task.task_id, error=str(detail)[:500])
            return
        self._done[task.task_id] = task.round
        self._count("ok")
        self.stats.last_run_seconds = time.monotonic() - started
        log.info(
            "learn.update_sent",
            task=task.task_id,
            global_version=task.global_version,
            round=task.round,
            examples=result["examples"],
            loss_before=round(result["loss_before"], 5),
            loss_after=round(result["loss_after"], 5),
            bytes=len(payload),
            seconds=round(self.stats.last_run_seconds, 3),
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
        examples = scratch / "examples.npz"
        self._examples.export(task.model, examples)
        job = {
            "model_dir": str(version_dir),
            "examples": str(examples),
            "global": str(global_file),
            "spec": {
                "trainable": task.trainable or "all",
                "epochs": task.epochs or 1,
                "batch_size": task.batch_size or 32,
                "lr": task.lr or 0.01,
                "optimizer": task.optimizer or "sgd",
                "seconds": task.train_seconds or 300.0,
            },
            "out": str(scratch / "out"),
            "threads": 1,
        }
        (scratch / "job.json").write_text(json.dumps(job))
        done = subprocess.run(
            [sys.executable, "-m", "edge_agent.learn.worker", str(scratch / "job.json")],
            capture_output=True,
            text=True,
            timeout=(task.train_seconds or 300.0) + 120,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        if done.returncode != 0:
            raise EdgeAgentError(f"local training failed: {done.stderr.strip()[-500:]}")
        with np.load(scratch / "out" / "deltas.npz", allow_pickle=False) as data:
            deltas = {k: data[k] for k in data.files}
        result = json.loads((scratch / "out" / "result.json").read_text())
        shutil.rmtree(scratch / "out", ignore_errors=True)
        return deltas, result

    def _fetch(self, digest: str, offset: int) -> Iterator[bytes]:
        call = self._stub.GetBlob(
            pb.GetBlobRequest(digest=digest, offset=offset), metadata=self._meta, timeout=600
        )
        for chunk in call:
            yield chunk.data

    def _upload(self, task: pb.LearningAssignment, payload: bytes, examples: int) -> None:
        update_id = uuid.uuid4().hex  # chosen once: every retry carries it, applied once
        digest = hashlib.sha256(payload).hexdigest()

        def chunks() -> Iterator[pb.UpdateChunk]:
            yield pb.UpdateChunk(
                task_id=task.task_id,
                update_id=update_id,
                base_global_version=task.global_version,
                examples=examples,
                size=len(payload),
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
