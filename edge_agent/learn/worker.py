"""One local training run, in a process of its own: `python -m edge_agent.learn.worker JOB.json`.

The agent starts it (learn/participant.py); it puts itself at the lowest CPU priority (nice 19,
SCHED_IDLE) with one PyTorch thread unless the job says otherwise, and a time budget, so that
serving never waits on training; a crash or a hang here costs the run, never the daemon. JOB.json:

    {"model_dir": ..., "model_file": "model.onnx", "examples": X.npz, "global": G.npz | null,
     "spec": {TrainSpec fields}, "out": DIR, "threads": 1}

Writes OUT/deltas.npz (float32, one array per trained tensor: trained minus the global values)
and OUT/result.json (losses, epochs, examples, seconds), or exits non-zero with one line on
stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import numpy as np


def main(job_file: str) -> int:
    job = json.loads(Path(job_file).read_text())
    with contextlib.suppress(OSError):  # already at the lowest priority
        os.nice(19)
    # SCHED_IDLE (Linux): the CPU only when nothing else wants it, below any nice value; serving
    # keeps its latency while a device trains.
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    import onnx
    import torch

    from edge_agent.learn.delta import decode
    from edge_agent.learn.onnxinfo import apply
    from edge_agent.learn.train import TrainSpec, train

    torch.set_num_threads(int(job.get("threads", 1)))
    model_dir = Path(job["model_dir"])
    model = onnx.load(str(model_dir / job.get("model_file", "model.onnx")))  # + external data
    if job.get("global"):
        model = apply(model, decode(Path(job["global"]).read_bytes()), add=False)
    with np.load(job["examples"], allow_pickle=False) as data:
        labels = data["labels"]
        feeds = {k: data[k] for k in data.files if k != "labels"}
    result = train(model, feeds, labels, TrainSpec(**job["spec"]))
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "deltas.npz", **result.deltas)  # type: ignore[arg-type]
    (out / "result.json").write_text(
        json.dumps(
            {
                "loss_before": result.loss_before,
                "loss_after": result.loss_after,
                "epochs": result.epochs,
                "examples": result.examples,
                "seconds": result.seconds,
                "check_error": result.check_error,
            }
        )
    )
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main(sys.argv[1]))
    except SystemExit:
        raise
    except Exception as exc:  # one line for the agent's log; the run is retried later
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
