"""A learning task's defaults: one definition, read by the control plane (every unset field of a
LearningSpec takes its value here) and by `edge-agent learn start` (its help). The server
optimizer's were chosen by measurement on the learning benchmark
(docs/performance-history.md "Learning"): FedAvgM with lr 0.3 and momentum 0.5 kept the highest
accuracy late in the run on both tasks; momentum 0.9 with lr 1 (FLSim's example) and Flower's
default eta for adam (0.1) diverged, and yogi's (0.01) swung by 7-8 points, under asynchronous
buffers of 4, where staleness already acts as momentum.
"""

from __future__ import annotations

from typing import Any

from edge_agent.learn.privacy import DEFAULT_DELTA

TASK_DEFAULTS: dict[str, object] = {
    "trainable": "all", "epochs": 1, "batch_size": 32, "lr": 0.01, "optimizer": "sgd",
    "buffer": 4, "server_optimizer": "momentum", "server_momentum": 0.5,
    "server_beta1": 0.9, "server_beta2": 0.99, "server_tau": 1e-3,
    "staleness_exponent": 0.5, "max_staleness": 10, "int8_threshold": 256,
    "max_accuracy_drop": 0.01, "min_examples": 16, "train_seconds": 300.0,
    "min_interval": 30.0, "max_wait": 120.0, "min_updates": 1, "aggregator": "mean",
    "dp_delta": DEFAULT_DELTA,
}  # fmt: skip

# The server learning rate when a task sets none, per server optimizer: each the best of its
# small grid on the benchmark's digits task.
SERVER_LR_DEFAULTS: dict[str, float] = {
    "momentum": 0.3, "sgd": 0.5, "adagrad": 0.03, "adam": 0.003, "yogi": 0.003,
}  # fmt: skip


def min_interval(assignment: Any) -> float:
    """A LearningAssignment's seconds between runs when nothing changed: unset (an older
    control plane) is the default; 0 set on purpose is back to back."""
    if assignment.HasField("min_interval"):
        return float(assignment.min_interval)
    return float(TASK_DEFAULTS["min_interval"])  # type: ignore[arg-type]
