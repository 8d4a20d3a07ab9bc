"""The training worker as the agent holds it: one process (learn/worker.py) kept across runs,
jobs written to its stdin and answers read back a line each, and the pacing that tells it,
through the shared Channel, when serving is busy.

Kept apart from participant.py so that it imports nothing of the serving side.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from edge_agent.errors import EdgeAgentError
from edge_agent.learn import cgroup
from edge_agent.learn.worker import BUSY, Channel
from edge_agent.observability.logging import get_logger

log = get_logger(__name__)

SAMPLE_S = 0.005  # how often a running job's pacing looks at serving
WORKER_EXIT_S = 5.0  # a worker told to stop gets this long before it is killed


class Cancelled(Exception):
    """The agent is stopping: the run in progress was ended, not failed."""


@dataclasses.dataclass(frozen=True)
class Pacing:
    """How training yields to serving (settings train_when, train_quiet_ms, min_train_share)."""

    when: str = "idle"  # idle | always
    # Serving is busy while requests are queued or running, and this long after the last one
    # finished: a closed-loop client's gaps between requests are not quiet, a pause between
    # bursts is (a 1 s window of "more than 5 requests" kept a half-busy client's device from
    # training 36x longer than needed).
    quiet_s: float = 0.1
    min_share: float = 0.1


class Activity:
    """Serving's activity as the pacing samples it: busy while requests are queued or running
    and for `quiet_s` after one finished (seen as the finished count moving)."""

    def __init__(self) -> None:
        self._finished = -1
        self._changed = float("-inf")

    def busy(self, sample: tuple[int, int], quiet_s: float, now: float | None = None) -> bool:
        in_flight, finished = sample
        now = time.monotonic() if now is None else now
        if finished != self._finished:
            if self._finished >= 0:  # the first sample only sets the baseline
                self._changed = now
            self._finished = finished
        return in_flight > 0 or now - self._changed < quiet_s


class Worker:
    """The training process, kept across runs; jobs go in on stdin, answers come back a line
    each. While a job runs the calling thread paces it (`Pacing`)."""

    def __init__(self, work_dir: Path, learning_cgroup: Path | None) -> None:
        work_dir.mkdir(parents=True, exist_ok=True)
        self._channel_path = work_dir / "worker.channel"
        self.channel = Channel(self._channel_path, create=True)
        self._log = open(work_dir / "worker.log", "w+b")  # noqa: SIM115 - lives with the process
        self.process = subprocess.Popen(
            [sys.executable, "-m", "edge_agent.learn.worker", "--serve", str(self._channel_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        if learning_cgroup is not None:
            try:
                cgroup.enter(learning_cgroup, self.process.pid)
            except OSError as exc:
                log.warning("learn.cgroup_failed", cgroup=str(learning_cgroup), error=str(exc))
        self._buffer = b""

    def alive(self) -> bool:
        return self.process.poll() is None

    def run(
        self,
        job: dict[str, object],
        timeout: float,
        stop: threading.Event,
        pacing: Pacing,
        activity: Callable[[], tuple[int, int]] | None,
        on_sample: Callable[[], None] | None = None,
    ) -> dict[str, object]:
        """The job's answer; `on_sample` runs at every pacing sample (live counters)."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write((json.dumps(job) + "\n").encode())
        self.process.stdin.flush()
        out = self.process.stdout.fileno()
        deadline = time.monotonic() + timeout
        last = Activity()
        try:
            while b"\n" not in self._buffer:
                if stop.is_set():
                    raise Cancelled("the agent is stopping")
                if time.monotonic() > deadline:
                    raise EdgeAgentError(f"local training took over {timeout:.0f} s: ended")
                if pacing.when == "idle" and activity is not None:
                    self.channel.set(BUSY, int(last.busy(activity(), pacing.quiet_s)))
                if on_sample is not None:
                    on_sample()
                ready, _, _ = select.select([out], [], [], SAMPLE_S)
                if ready:
                    chunk = os.read(out, 1 << 16)
                    if not chunk:
                        raise EdgeAgentError(f"the training worker exited: {self.stderr_tail()}")
                    self._buffer += chunk
        finally:
            self.channel.set(BUSY, 0)
        line, _, self._buffer = self._buffer.partition(b"\n")
        answer = json.loads(line)
        if not isinstance(answer, dict):
            raise EdgeAgentError("the training worker answered something other than an object")
        return answer

    def stderr_tail(self) -> str:
        self._log.flush()
        size = self._log.seek(0, os.SEEK_END)
        self._log.seek(max(0, size - 2000))
        return self._log.read().decode(errors="replace").strip()[-500:]

    def close(self) -> None:
        """Close its stdin (it exits between jobs), or kill it when it does not in time."""
        with contextlib.suppress(OSError, ValueError):
            if self.process.stdin is not None:
                self.process.stdin.close()
        try:
            self.process.wait(timeout=WORKER_EXIT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.channel.close()
        self._log.close()

    def kill(self) -> None:
        """End it now (the agent is stopping mid-run)."""
        with contextlib.suppress(OSError):
            self.process.kill()
        self.process.wait()
        self.close()
