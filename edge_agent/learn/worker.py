"""Local training runs, in a process of its own that the agent keeps while a task runs:

    python -m edge_agent.learn.worker --serve CHANNEL   (jobs on stdin, one JSON line each)

The agent starts it (learn/participant.py); it puts itself at the lowest CPU priority (nice 19,
SCHED_IDLE) with one PyTorch thread unless the job says otherwise, and a time budget; a crash
or a hang here costs the run, never the daemon. PyTorch is imported once, not once per run.
A job:

    {"model_dir": ..., "model_file": "model.onnx", "examples": X.npz, "global": G.npz | null,
     "spec": {TrainSpec fields}, "out": DIR, "threads": 1, "min_share": 0.1}

writes OUT/deltas.npz (float32, one array per trained tensor: trained minus the global values)
and answers a stdout line {"ok": true, losses, epochs, examples, seconds, paused_seconds} or
{"ok": false, "error": "one line"}.

Serving first: low priority alone does not keep serving's latency on a 2-core device (measured:
SCHED_IDLE at nice 19 still took p99 up 1.6-5.6x), so before every mini-batch the worker reads
the channel, a small file the agent maps too (`Channel`): while the agent says it is busy the
worker sleeps instead of computing, except that it trains whenever its share of the run's time
has fallen below `min_share`, so a run still ends on a device that is never quiet. The worker
writes its own counters (batches, pauses, time paused) into the same file.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import signal
import struct
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

# The channel: 8 little-endian uint64. Written by the agent: [0] busy (0/1). Written by the
# worker: [1] mini-batches run, [2] pauses (times it stopped for serving), [3] ns paused,
# [4] 1 while paused now.
CHANNEL_BYTES = 64
BUSY, BATCHES, PAUSES, PAUSED_NS, PAUSED_NOW = range(5)
POLL_S = 0.002  # how often a paused worker looks again
PR_SET_PDEATHSIG = 1  # prctl(2)


class Channel:
    """The shared counters between the agent and its worker (a mapped file: no system call to
    read or write a counter)."""

    def __init__(self, path: Path, create: bool = False) -> None:
        if create:  # a new file, renamed in: a worker left from before keeps its own inode
            fresh = path.with_name(path.name + ".new")
            fresh.write_bytes(bytes(CHANNEL_BYTES))
            os.replace(fresh, path)
        self._file = open(path, "r+b")  # noqa: SIM115 - mapped for the channel's lifetime
        self._map = mmap.mmap(self._file.fileno(), CHANNEL_BYTES)

    def get(self, slot: int) -> int:
        return int(struct.unpack_from("<Q", self._map, 8 * slot)[0])

    def set(self, slot: int, value: int) -> None:
        struct.pack_into("<Q", self._map, 8 * slot, value)

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self._map.close()
        self._file.close()


class Pacer:
    """Called before each mini-batch: waits while serving is busy, within the minimum share."""

    def __init__(self, channel: Channel | None, min_share: float) -> None:
        self._channel = channel
        self._min_share = min_share
        self.started = 0.0  # the first mini-batch: setup (conversion, features) is not a share
        self.trained = 0.0  # seconds spent in mini-batches
        self.paused = 0.0
        self._last: float | None = None

    def __call__(self) -> float:
        """Wait while serving is busy; returns the seconds waited (the run's budget counts
        training time, not this)."""
        now = time.monotonic()
        if self._last is None:
            self.started = now
        else:
            self.trained += now - self._last
        waited = 0.0
        channel = self._channel
        if channel is not None and channel.get(BUSY):
            paused_at = now
            while channel.get(BUSY) and self.trained >= self._min_share * (now - self.started):
                if now == paused_at:
                    channel.set(PAUSES, channel.get(PAUSES) + 1)
                    channel.set(PAUSED_NOW, 1)
                time.sleep(POLL_S)
                now = time.monotonic()
            if now > paused_at:
                waited = now - paused_at
                self.paused += waited
                channel.set(PAUSED_NS, channel.get(PAUSED_NS) + int((now - paused_at) * 1e9))
                channel.set(PAUSED_NOW, 0)
        if channel is not None:
            channel.set(BATCHES, channel.get(BATCHES) + 1)
        self._last = time.monotonic()
        return waited


def lower_priority() -> None:
    try:
        os.nice(19)
        # SCHED_IDLE (Linux): the CPU only when nothing else wants it, below any nice value.
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError) as exc:  # said once, on stderr (the agent's worker.log)
        print(f"worker: could not lower its priority: {exc}", file=sys.stderr)


def die_with_parent() -> None:
    """Linux: the kernel ends this process when the agent dies (SIGKILL, OOM), so no orphan
    trains on with the agent's counters."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the agent died before the call above
        raise SystemExit(0)


def run_job(job: dict[str, Any], channel: Channel | None) -> dict[str, Any]:
    import onnx
    import torch

    from edge_agent.common.layout import MODEL_FILE
    from edge_agent.learn.delta import decode
    from edge_agent.learn.onnxinfo import apply
    from edge_agent.learn.train import TrainSpec, train

    torch.set_num_threads(int(job.get("threads", 1)))
    model_dir = Path(job["model_dir"])
    model = onnx.load(str(model_dir / job.get("model_file", MODEL_FILE)))  # + external data
    if job.get("global"):
        model = apply(model, decode(Path(job["global"]).read_bytes()), add=False)
    with np.load(job["examples"], allow_pickle=False) as data:
        labels = data["labels"]
        feeds = {k: data[k] for k in data.files if k != "labels"}
    pacer = Pacer(channel, float(job.get("min_share", 0.1)))
    result = train(model, feeds, labels, TrainSpec(**job["spec"]), before_batch=pacer)
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "deltas.npz", **result.deltas)  # type: ignore[arg-type]
    return {
        "ok": True,
        "loss_before": result.loss_before,
        "loss_after": result.loss_after,
        "epochs": result.epochs,
        "examples": result.examples,
        "seconds": result.seconds,
        "paused_seconds": pacer.paused,
        "check_error": result.check_error,
    }


def answer(job: dict[str, Any], channel: Channel | None) -> dict[str, Any]:
    try:
        return run_job(job, channel)
    except Exception as exc:  # one line for the agent's log; the run is retried later
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}


def serve(channel_path: str) -> int:
    """Jobs from stdin until it closes (the agent ends the worker by closing it). Answers go to
    the original stdout alone: anything else printing (a library's warning) lands on stderr."""
    die_with_parent()
    lower_priority()
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr
    channel = Channel(Path(channel_path))
    try:
        for line in sys.stdin:
            if line.strip():
                answers.write(json.dumps(answer(json.loads(line), channel)) + "\n")
                answers.flush()
    finally:
        channel.close()
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["--serve"] or len(sys.argv) != 3:
        raise SystemExit("usage: python -m edge_agent.learn.worker --serve CHANNEL")
    raise SystemExit(serve(sys.argv[2]))
