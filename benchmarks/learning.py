"""Learning on the fleet, measured (BENCHMARKS.md "Learning"):

    .venv/bin/python benchmarks/learning.py [--quick]

1. Federated vs central on two tasks, each over 8 simulated devices with label skew (80% of a
   device's rows from 2-3 classes of its own), 2 of them 3x slower, from a deliberately weak
   base; local training is plain SGD (the task default's optimizer), 2 epochs of batch 16:
   - digits: scikit-learn's digits (the shipped model's 1,437 training rows; the shipped MLP
     re-initialised and trained on 40 rows), held out: the shipped 360;
   - shapes: a synthetic image set made here (1x12x12 bars, crosses, squares, a ring and a
     checkerboard at random places, sizes, strokes and contrast, in noise; fixed seeds; 2,000
     rows to train, 1,000 held out) and a small CNN (Conv-Relu-MaxPool twice, Gemm) built with
     the onnx helper API, trained from a random start on 60 rows.
   Runs: central (every row in one place, the same total local work), synchronous rounds
   (FedAvgM: every device trains from the global, the server waits for the slowest; and plain
   FedAvg), and FedBuff (a device finishes, uploads and at once trains again from the newest
   global; K = 4, staleness weight (1+tau)^-0.5, max_staleness 10) with each server optimizer:
   on digits an lr grid, on shapes each optimizer at the lr digits chose plus digits' best
   three; the best three over both tasks again under a second arrival schedule; FedProx and
   the median on the recommended one; central DP on digits (8 devices, and a simulated fleet
   of 100). Every federated run does the same number of local runs (320). Local training is
   the real engine (learn/train.py) and the server the real arithmetic (learn/delta.py); the
   clock is simulated: a device's local run costs the CPU time per row measured here times its
   rows (times 3 on the slow ones, times a fixed per-run jitter), so every configuration of a
   task sees the same arrival schedule and differs only in what the server does with it.
   Reported per run: best and final held-out accuracy, the mean and the lowest over the last
   quarter of steps, simulated seconds to 0.95 x central, and oscillation (best overall minus
   the lowest of the last quarter, in points).
2. Uplink: bytes of an update (int8 deltas above 256 elements, the default) vs fp32.
3. Serving while training, for real: a control plane with a learning key and one agent with
   --learn (the test suite's LearningFleet); p50/p99 of a closed-loop tritonclient gRPC client
   on digits at rest, while the device trains with --train-when always and with --train-when
   idle (the worker's channel counters confirm it trains), and how long one training run of
   fixed work takes with no client and with a client busy half the time.
4. Pruning 50% + fine-tuning, and distillation to a 4x smaller student.
Writes benchmarks/learning_results.json, and docs/images/learning_accuracy.png and
learning_dp.png (the charts of docs/performance.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import math
import os
import platform
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from edge_agent.learn import delta, privacy  # noqa: E402
from edge_agent.learn.defaults import SERVER_LR_DEFAULTS, TASK_DEFAULTS  # noqa: E402
from edge_agent.learn.onnxinfo import accuracy, apply  # noqa: E402
from edge_agent.learn.train import TrainSpec, train  # noqa: E402

DEVICES, SLOW, SLOWNESS = 8, 2, 3.0
JITTER = 0.1  # a local run's duration varies by exp(N(0, JITTER)), the same draw for every run
BUFFER = 4  # FedBuff's K
TARGET_SHARE = 0.95  # "seconds to target": to 0.95 x central's accuracy
DP_EPSILON, DP_DELTA = 8.0, 1e-5
RESULTS = ROOT / "benchmarks" / "learning_results.json"
PLOT = ROOT / "docs" / "images" / "learning_accuracy.png"
DP_PLOT = ROOT / "docs" / "images" / "learning_dp.png"

Curve = list[tuple[float, float]]  # (simulated seconds, held-out accuracy) after each step


# -- the tasks ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Task:
    """A model, its data split over the devices, and how a device trains it."""

    name: str
    title: str
    base: onnx.ModelProto
    x: np.ndarray
    y: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    shares: list[np.ndarray]
    local: TrainSpec
    run_seconds: list[float] = dataclasses.field(default_factory=list)  # per device

    def values(self) -> dict[str, np.ndarray]:
        return {
            t.name: numpy_helper.to_array(t).astype(np.float32) for t in self.base.graph.initializer
        }

    def model(self, values: dict[str, np.ndarray]) -> onnx.ModelProto:
        return apply(self.base, values, add=False)

    def score(self, values: dict[str, np.ndarray]) -> float:
        return accuracy(self.model(values), {"input": self.x_val}, self.y_val)

    def train(
        self, values: dict[str, np.ndarray], device: int, proximal_mu: float = 0.0, seed: int = 0
    ) -> dict[str, np.ndarray]:
        rows = self.shares[device]
        spec = dataclasses.replace(self.local, proximal_mu=proximal_mu, seed=seed)
        return train(self.model(values), {"input": self.x[rows]}, self.y[rows], spec).deltas

    def calibrate(self) -> None:
        """A local run's simulated seconds per device: the CPU time per row measured on every
        device's share (the median over devices of the median of 3 runs), times its rows and
        its slowness. Only the scale depends on this machine: the order in which updates
        arrive, and so every accuracy below, does not."""
        values = self.values()
        per_row = []
        for d, rows in enumerate(self.shares):
            times = []
            for _ in range(3):
                started = time.process_time()
                self.train(values, d)
                times.append(time.process_time() - started)
            per_row.append(float(np.median(times)) / len(rows))
        cost = float(np.median(per_row))
        self.run_seconds = [
            cost * len(rows) * (SLOWNESS if d < SLOW else 1.0) for d, rows in enumerate(self.shares)
        ]


def skewed(y: np.ndarray, rng: np.random.Generator, devices: int = DEVICES) -> list[np.ndarray]:
    """Row indices per device: 80% from 2-3 classes of its own, 20% from the rest."""
    classes = int(y.max()) + 1
    by_class = {c: list(rng.permutation(np.flatnonzero(y == c))) for c in range(classes)}
    per_device = len(y) // devices
    shares = []
    for d in range(devices):
        own = [(d + k) % classes for k in range(2 + d % 2)]
        rows: list[int] = []
        for c in own:
            rows += [
                by_class[c].pop() for _ in range(int(0.8 * per_device / len(own))) if by_class[c]
            ]
        others = [c for c in range(classes) if c not in own]
        turn = 0
        while len(rows) < per_device and any(by_class[c] for c in others):
            c = others[turn % len(others)]
            turn += 1
            if by_class[c]:
                rows.append(by_class[c].pop())
        shares.append(np.array(rows))
    return shares


def digits_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x, y = digits.data.astype(np.float32), digits.target.astype(np.int64)
    x_train, x_val, y_train, y_val = train_test_split(
        x, y, test_size=0.2, random_state=0, stratify=y
    )
    return x_train, y_train, x_val, y_val


def digits_task() -> Task:
    x, y, x_val, y_val = digits_data()
    model = onnx.load(str(ROOT / "models" / "digits" / "1" / "model.onnx"))
    rng = np.random.default_rng(1)
    for init in model.graph.initializer:
        shape = numpy_helper.to_array(init).shape
        value = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        init.CopyFrom(numpy_helper.from_array(value, init.name))
    small = rng.choice(len(y), 40, replace=False)
    result = train(
        model, {"input": x[small]}, y[small], TrainSpec(epochs=20, lr=0.003, optimizer="adam")
    )
    return Task(
        "digits",
        "digits (MLP 64-64-10, 8 devices, label skew)",
        apply(model, result.deltas),
        x,
        y,
        x_val,
        y_val,
        skewed(y, np.random.default_rng(0)),
        TrainSpec(epochs=2, lr=0.03, optimizer="sgd", batch_size=16),
    )


SHAPES = (
    "horizontal bar", "vertical bar", "diagonal \\", "diagonal /", "plus", "cross x",
    "hollow square", "filled square", "ring", "checkerboard",
)  # fmt: skip
SIDE = 12


def shape_image(label: int, rng: np.random.Generator) -> np.ndarray:
    """One 12x12 image of class `label`: the shape at a random place, size, thickness and
    contrast, on a noisy background."""
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32)
    cy, cx = rng.uniform(3.5, SIDE - 4.5, size=2)
    half = rng.uniform(3.0, 4.5)  # half the extent of the shape
    width = rng.uniform(0.6, 1.3)  # half the stroke
    dy, dx = yy - cy, xx - cx
    inside = (np.abs(dy) <= half) & (np.abs(dx) <= half)
    if label == 0:
        mask = (np.abs(dy) <= width) & (np.abs(dx) <= half)
    elif label == 1:
        mask = (np.abs(dx) <= width) & (np.abs(dy) <= half)
    elif label == 2:
        mask = (np.abs(dy - dx) <= 1.2 * width) & inside
    elif label == 3:
        mask = (np.abs(dy + dx) <= 1.2 * width) & inside
    elif label == 4:
        mask = ((np.abs(dy) <= width) | (np.abs(dx) <= width)) & inside
    elif label == 5:
        mask = ((np.abs(dy - dx) <= 1.2 * width) | (np.abs(dy + dx) <= 1.2 * width)) & inside
    elif label == 6:
        edge = np.maximum(np.abs(dy), np.abs(dx))
        mask = (edge <= half) & (edge >= half - 2 * width)
    elif label == 7:
        mask = inside & (np.maximum(np.abs(dy), np.abs(dx)) <= 0.7 * half)
    elif label == 8:
        radius = np.hypot(dy, dx)
        mask = np.abs(radius - 0.8 * half) <= width
    else:
        period = int(rng.integers(2, 4))
        mask = (((yy // period) + (xx // period)) % 2 == 0) & inside
    image = rng.normal(0.0, 0.25, size=(SIDE, SIDE)).astype(np.float32)
    image += mask.astype(np.float32) * rng.uniform(0.7, 1.2)
    return image.reshape(1, SIDE, SIDE)


def shapes_data(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(rows) % len(SHAPES)
    rng.shuffle(labels)
    images = np.stack([shape_image(int(c), rng) for c in labels]).astype(np.float32)
    return images, labels.astype(np.int64)


def small_cnn(seed: int) -> onnx.ModelProto:
    """1x12x12 -> Conv 3x3 (8) -> Relu -> MaxPool 2 -> Conv 3x3 (16) -> Relu -> MaxPool 2 ->
    Flatten -> Gemm (144 -> 10) -> Softmax, plus ArgMax: He-initialised."""
    rng = np.random.default_rng(seed)

    def he(*shape: int) -> np.ndarray:
        fan_in = int(np.prod(shape[1:]))
        return (rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)).astype(np.float32)

    weights = {
        "conv1.w": he(8, 1, 3, 3),
        "conv1.b": np.zeros(8, np.float32),
        "conv2.w": he(16, 8, 3, 3),
        "conv2.b": np.zeros(16, np.float32),
        "fc.w": he(10, 144),
        "fc.b": np.zeros(10, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["input", "conv1.w", "conv1.b"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "conv2.w", "conv2.b"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p2"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        helper.make_node("ArgMax", ["logits"], ["label"], axis=-1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "shapes_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, SIDE, SIDE])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10]),
            helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
        ],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def shapes_task() -> Task:
    x, y = shapes_data(2000, seed=10)
    x_val, y_val = shapes_data(1000, seed=11)
    model = small_cnn(seed=12)
    small = np.random.default_rng(13).choice(len(y), 60, replace=False)
    result = train(
        model, {"input": x[small]}, y[small], TrainSpec(epochs=10, lr=0.003, optimizer="adam")
    )
    return Task(
        "shapes",
        "shapes (CNN on synthetic 1x12x12 images, 8 devices, label skew)",
        apply(model, result.deltas),
        x,
        y,
        x_val,
        y_val,
        skewed(y, np.random.default_rng(0)),
        TrainSpec(epochs=2, lr=0.1, optimizer="sgd", batch_size=16),
    )


# -- the simulation -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    """One federated run."""

    label: str
    mode: str  # sync | fedbuff
    server: delta.ServerOptimizer
    aggregation: delta.Aggregation = dataclasses.field(
        default_factory=lambda: delta.Aggregation(buffer=BUFFER)
    )
    proximal_mu: float = 0.0
    schedule: int = 0  # which draw of per-run jitter and local shuffling seeds

    def again(self, schedule: int) -> Config:
        """The same configuration under another arrival schedule and local seeds."""
        return dataclasses.replace(
            self, label=f"{self.label}, schedule {schedule + 1}", schedule=schedule
        )

    def describe(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "schedule": self.schedule,
            "server": dataclasses.asdict(self.server),
            "aggregation": dataclasses.asdict(self.aggregation),
            "proximal_mu": self.proximal_mu,
        }


@dataclasses.dataclass
class Outcome:
    curve: Curve
    local_runs: int
    aggregations: int
    dropped_stale: int = 0
    clipped: int = 0
    staleness: list[int] = dataclasses.field(default_factory=list)


def jitter(schedule: int, device: int, run: int) -> float:
    """How much longer (or shorter) than usual a device's `run`-th local run takes."""
    rng = np.random.default_rng([7, schedule, device, run])
    return float(np.exp(rng.normal(0.0, JITTER)))


def local_seed(schedule: int, device: int, run: int) -> int:
    """The local run's shuffling seed: one per (schedule, device, run)."""
    return (schedule * 1_000 + device) * 100_000 + run


class Server:
    """The parameter server's state for one run: global values, optimizer state, version."""

    def __init__(self, task: Task, config: Config, seed: int = 0) -> None:
        self.values = task.values()
        self.state: dict[str, np.ndarray] = {}
        self.version = 0
        self.config = config
        self.rng = np.random.default_rng(seed)
        self.clipped = 0

    def step(self, updates: list[delta.Update]) -> None:
        settings = self.config.aggregation
        if settings.clip_norm > 0:
            clipped = []
            for u in updates:
                deltas, was = delta.clip(u.deltas, settings.clip_norm)
                self.clipped += was
                clipped.append(delta.Update(deltas, u.examples, u.staleness))
            updates = clipped
        d = delta.aggregate(updates, settings, self.rng)
        self.values, self.state = self.config.server.apply(self.values, d, self.state)
        self.version += 1


def synchronous(task: Task, config: Config, runs: int) -> Outcome:
    """Rounds: every device trains from the global; the round lasts as long as the slowest."""
    server = Server(task, config)
    curve = [(0.0, task.score(server.values))]
    clock = 0.0
    devices = len(task.shares)
    schedule = config.schedule
    for r in range(runs // devices):
        updates = [
            delta.Update(
                task.train(server.values, d, config.proximal_mu, local_seed(schedule, d, r)),
                len(task.shares[d]),
                0,
            )
            for d in range(devices)
        ]
        clock += max(task.run_seconds[d] * jitter(schedule, d, r) for d in range(devices))
        server.step(updates)
        curve.append((clock, task.score(server.values)))
    return Outcome(curve, runs // devices * devices, server.version, clipped=server.clipped)


@dataclasses.dataclass
class Arrival:
    order: int  # the how-many-th local run to finish
    device: int
    base_version: int
    deltas: dict[str, np.ndarray]
    examples: int


def buffered(task: Task, config: Config, runs: int) -> Outcome:
    """FedBuff: devices train continuously from the newest global; an update is buffered when
    it arrives no more than max_staleness versions old, and K of them are aggregated as the
    control plane's `due` takes them. Stops after `runs` local runs have finished."""
    settings = config.aggregation
    server = Server(task, config)
    curve = [(0.0, task.score(server.values))]
    devices = len(task.shares)
    started = [0] * devices
    events: list[tuple[float, int, int, dict[str, np.ndarray]]] = []

    def launch(device: int, at: float) -> None:
        run = started[device]
        deltas = task.train(
            server.values, device, config.proximal_mu, local_seed(config.schedule, device, run)
        )
        seconds = task.run_seconds[device] * jitter(config.schedule, device, run)
        started[device] += 1
        heapq.heappush(events, (at + seconds, device, server.version, deltas))

    for d in range(devices):
        launch(d, 0.0)
    waiting: list[Arrival] = []
    finished = dropped = 0
    staleness: list[int] = []
    while finished < runs:
        clock, d, base_version, deltas = heapq.heappop(events)
        finished += 1
        if server.version - base_version > settings.max_staleness:
            dropped += 1
        else:
            waiting.append(Arrival(finished, d, base_version, deltas, len(task.shares[d])))
        taken, gone = due(waiting, settings, server.version)
        dropped += gone
        if taken:
            updates = [
                delta.Update(a.deltas, a.examples, server.version - a.base_version) for a in taken
            ]
            staleness += [u.staleness for u in updates]
            server.step(updates)
            curve.append((clock, task.score(server.values)))
        launch(d, clock)
    return Outcome(curve, finished, server.version, dropped, server.clipped, staleness)


def due(
    waiting: list[Arrival], settings: delta.Aggregation, version: int
) -> tuple[list[Arrival], int]:
    """A full buffer out of `waiting` (removed from it) or nothing, and how many were dropped,
    as the control plane's `due` (controlplane/learning/) decides: updates grown older than
    max_staleness while they waited are dropped; with DP or the median one update per device
    counts, its newest, and its older ones are dropped (superseded)."""
    fresh = [a for a in waiting if version - a.base_version <= settings.max_staleness]
    if settings.dp_noise_multiplier > 0 or settings.aggregator == "median" or settings.trim > 0:
        newest: dict[int, Arrival] = {}
        for arrival in fresh:  # in arrival order: the last one of a device is its newest
            newest[arrival.device] = arrival
        fresh = sorted(newest.values(), key=lambda a: a.order)
    gone = len(waiting) - len(fresh)
    waiting[:] = fresh
    if len(fresh) < settings.buffer:
        return [], gone
    taken = fresh[: settings.buffer]
    waiting[:] = fresh[settings.buffer :]
    return taken, gone


def simulate(task: Task, config: Config, runs: int) -> Outcome:
    return (synchronous if config.mode == "sync" else buffered)(task, config, runs)


def central(task: Task, runs: int) -> float:
    """Every row in one place, for as many epochs as the fleet's `runs` local runs add up to."""
    rows = sum(len(task.shares[d % len(task.shares)]) for d in range(runs))
    epochs = max(1, round(rows * task.local.epochs / len(task.y)))
    spec = dataclasses.replace(task.local, epochs=epochs)
    result = train(task.base, {"input": task.x}, task.y, spec)
    return accuracy(apply(task.base, result.deltas), {"input": task.x_val}, task.y_val)


# -- what a run is worth ------------------------------------------------------------------------


def reached(curve: Curve, target: float) -> float | None:
    return next((t for t, a in curve if a >= target), None)


def summary(outcome: Outcome, target: float) -> dict[str, object]:
    """Best, final, the mean of the last quarter of steps, simulated seconds to `target`, and
    oscillation: best overall minus the lowest of the last quarter, in points."""
    accuracies = [a for _, a in outcome.curve]
    steps = accuracies[1:]
    last = steps[-max(1, len(steps) // 4) :]
    return {
        "best": max(accuracies),
        "final": accuracies[-1],
        "last_quarter_mean": float(np.mean(last)),
        "last_quarter_min": min(last),
        "seconds_to_target": reached(outcome.curve, target),
        "oscillation_points": round(100 * (max(accuracies) - min(last)), 2),
        "aggregations": outcome.aggregations,
        "local_runs": outcome.local_runs,
        "simulated_seconds": outcome.curve[-1][0],
        "dropped_stale": outcome.dropped_stale,
        "clipped": outcome.clipped,
        "mean_staleness": float(np.mean(outcome.staleness)) if outcome.staleness else 0.0,
    }


# -- the runs -----------------------------------------------------------------------------------


def fedbuff(label: str, name: str, lr: float, momentum: float = 0.9, **aggregation: Any) -> Config:
    mu = aggregation.pop("proximal_mu", 0.0)
    return Config(
        label,
        "fedbuff",
        delta.ServerOptimizer(name, lr, momentum=momentum),
        delta.Aggregation(**{"buffer": BUFFER, "staleness_exponent": 0.5, **aggregation}),
        mu,
    )


# The lr grid run on digits (Flower's defaults and the shipped task default, momentum lr 1
# beta 0.9, among them): per optimizer, the lr with the highest late floor is the one shapes
# runs with (`federated`).
GRID: dict[str, list[tuple[float, float]]] = {  # optimizer -> [(lr, momentum)]
    "sgd": [(0.5, 0.0), (0.7, 0.0), (1.0, 0.0)],
    "momentum": [(1.0, 0.9), (0.1, 0.9), (0.2, 0.7), (0.3, 0.5)],
    "adam": [(0.001, 0.0), (0.003, 0.0), (0.01, 0.0), (0.1, 0.0)],
    "yogi": [(0.003, 0.0), (0.01, 0.0)],
    "adagrad": [(0.01, 0.0), (0.03, 0.0), (0.1, 0.0)],
}
QUICK_GRID: dict[str, list[tuple[float, float]]] = {
    "sgd": [(0.7, 0.0)],
    "momentum": [(1.0, 0.9)],
    "adam": [(0.003, 0.0)],
}


def label_of(name: str, lr: float, momentum: float) -> str:
    return f"fedbuff {name} lr {lr:g}" + (f" beta {momentum:g}" if name == "momentum" else "")


def sync_configs() -> list[Config]:
    """FedAvgM (Hsu et al. 2019: server lr 1, momentum 0.9) and plain FedAvg for reference."""
    return [
        Config("sync FedAvgM lr 1 beta 0.9", "sync", delta.ServerOptimizer("momentum", 1.0, 0.9)),
        Config("sync FedAvg", "sync", delta.ServerOptimizer("sgd", 1.0)),
    ]


@dataclasses.dataclass
class TaskResult:
    task: Task
    central: float
    runs: dict[str, tuple[Config, Outcome]] = dataclasses.field(default_factory=dict)

    @property
    def target(self) -> float:
        return TARGET_SHARE * self.central

    def run(self, config: Config, runs: int) -> Outcome:
        started = time.monotonic()
        outcome = simulate(self.task, config, runs)
        self.runs[config.label] = (config, outcome)
        s = summary(outcome, self.target)
        print(
            f"  {self.task.name:7s} {config.label:42s} best {s['best']:.3f} final "
            f"{s['final']:.3f} last-quarter mean {s['last_quarter_mean']:.3f} osc "
            f"{s['oscillation_points']:5.2f} to-target {fmt(s['seconds_to_target'])} "
            f"({time.monotonic() - started:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
        return outcome

    def summaries(self) -> dict[str, dict[str, object]]:
        return {
            label: {**summary(outcome, self.target), "config": config.describe()}
            for label, (config, outcome) in self.runs.items()
        }


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def lqm(result: TaskResult, label: str) -> float:
    return float(summary(result.runs[label][1], result.target)["last_quarter_mean"])  # type: ignore[arg-type]


def update_norms(task: Task) -> list[float]:
    values = task.values()
    return [delta.norm(task.train(values, d)) for d in range(len(task.shares))]


def dp_noise_for(aggregations: int, max_epsilon: float = DP_EPSILON) -> float:
    """The smallest noise multiplier (to 0.01) whose epsilon over `aggregations` is within."""
    low, high = 0.1, 100.0
    while high - low > 0.01:
        middle = (low + high) / 2
        if privacy.epsilon(middle, aggregations, DP_DELTA) <= max_epsilon:
            high = middle
        else:
            low = middle
    return round(high + 0.005, 2)


def differential_privacy(
    digits: TaskResult, reference: Config, runs: int, fleet_devices: int, quick: bool
) -> tuple[dict[str, Any], TaskResult]:
    """DP-FedAvg on the chosen FedBuff configuration: updates clipped to C (the median norm of
    the devices' first updates), noise z * C on each buffer's sum, z the smallest that keeps
    epsilon <= 8 at delta 1e-5 over the run's aggregations; against the same run clipped but
    without noise, and without either. Then the same on a larger simulated fleet, where a
    buffer of many devices divides the same noise by more."""
    task = digits.task
    clip = float(np.median(update_norms(task)))
    aggregations = runs // reference.aggregation.buffer
    z = dp_noise_for(aggregations)
    base_agg = reference.aggregation
    clipped = dataclasses.replace(
        reference,
        label=f"{reference.label} clip {clip:.2g}",
        aggregation=dataclasses.replace(base_agg, clip_norm=clip),
    )
    private = dataclasses.replace(
        reference,
        label=f"{reference.label} DP z {z:g}",
        aggregation=dataclasses.replace(base_agg, clip_norm=clip, dp_noise_multiplier=z),
    )
    out: dict[str, object] = {
        "clip_norm": clip,
        "noise_multiplier": z,
        "delta": DP_DELTA,
        "planned_aggregations": aggregations,
        "reference": reference.label,
    }
    for config in (clipped, private):
        digits.run(config, runs)
    done = digits.runs[private.label][1].aggregations
    out["epsilon"] = privacy.epsilon(z, done, DP_DELTA)
    out["aggregations"] = done
    summaries = {
        "non_private": summary(digits.runs[reference.label][1], digits.target),
        "clipped_only": summary(digits.runs[clipped.label][1], digits.target),
        "private": summary(digits.runs[private.label][1], digits.target),
    }
    out["runs"] = summaries
    out["noise_std_per_coordinate_of_the_mean"] = z * clip / base_agg.buffer
    out["larger_fleet"], fleet = larger_fleet(task, reference, fleet_devices, quick)
    return out, fleet


def larger_fleet(
    task: Task, reference: Config, devices: int, quick: bool
) -> tuple[dict[str, object], TaskResult]:
    """The digits rows over `devices` devices (label skew, a quarter of them 3x slower), a
    buffer of half of them; the same number of passes over the data as the 8-device runs."""
    rng = np.random.default_rng(5)
    shares = skewed(task.y, rng, devices)
    fleet = dataclasses.replace(task, name=f"digits x{devices}", shares=shares)
    per_row = task.run_seconds[SLOW] / len(task.shares[SLOW])  # a fast device's
    fleet.run_seconds = [
        per_row * len(s) * (SLOWNESS if d < devices // 4 else 1.0) for d, s in enumerate(shares)
    ]
    rounds = 6 if quick else 40
    runs = devices * rounds
    buffer = devices // 2
    aggregations = runs // buffer
    z = dp_noise_for(aggregations)
    clip = float(np.median(update_norms(fleet)))
    central_accuracy = central(fleet, runs)
    result = TaskResult(fleet, central_accuracy)
    plain = dataclasses.replace(
        reference,
        label=f"{reference.label} K {buffer}",
        aggregation=dataclasses.replace(reference.aggregation, buffer=buffer),
    )
    private = dataclasses.replace(
        plain,
        label=f"{plain.label} DP z {z:g}",
        aggregation=dataclasses.replace(plain.aggregation, clip_norm=clip, dp_noise_multiplier=z),
    )
    for config in (plain, private):
        result.run(config, runs)
    done = result.runs[private.label][1].aggregations
    return {
        "devices": devices,
        "rows_per_device": int(np.median([len(s) for s in shares])),
        "buffer": buffer,
        "local_runs": runs,
        "clip_norm": clip,
        "noise_multiplier": z,
        "aggregations": done,
        "epsilon": privacy.epsilon(z, done, DP_DELTA),
        "noise_std_per_coordinate_of_the_mean": z * clip / buffer,
        "central_accuracy": central_accuracy,
        "runs": result.summaries(),
        "curves": {label: outcome.curve for label, (_, outcome) in result.runs.items()},
    }, result


def plot(
    results: Sequence[TaskResult],
    shown: Sequence[Sequence[str]],
    path: Path,
    notes: dict[str, str] | None = None,
) -> None:
    """Accuracy vs simulated seconds, a column per task: the whole run above, the late part
    enlarged below; central and the target as horizontal lines. `notes`: label -> a remark
    for the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, len(results), figsize=(8 * len(results), 10), squeeze=False)
    colours = plt.get_cmap("tab10").colors + plt.get_cmap("Dark2").colors
    for column, (result, labels) in enumerate(zip(results, shown, strict=True)):
        top, bottom = axes[0][column], axes[1][column]
        for index, label in enumerate(labels):
            curve = result.runs[label][1].curve
            style = "--" if label.startswith("sync") else ":" if label.count(" ") > 5 else "-"
            for axis in (top, bottom):
                axis.plot(
                    [t for t, _ in curve], [a for _, a in curve], style,
                    label=label + (notes or {}).get(label, ""),
                    color=colours[index % len(colours)], linewidth=1.3,
                )  # fmt: skip
        for axis in (top, bottom):
            axis.axhline(result.central, color="black", linestyle=":", label="central")
            axis.axhline(
                result.target, color="grey", linestyle="-.", linewidth=0.8,
                label=f"target: {TARGET_SHARE:g} x central",
            )  # fmt: skip
            axis.set_xlabel("simulated seconds (the devices' measured local CPU time)")
            axis.set_ylabel("held-out accuracy")
            axis.grid(alpha=0.3)
        base = result.runs[labels[0]][1].curve[0][1]
        top.set_ylim(max(0.0, base - 0.05), 1.0)
        top.set_title(f"{result.task.title}\nthe same local work in every run")
        top.legend(fontsize=7, loc="lower right")
        bottom.set_ylim(result.target - 0.02, min(1.0, result.central + 0.02))
        bottom.set_title(f"{result.task.name}: enlarged near central's accuracy")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_dp(digits: TaskResult, labels: Sequence[str], fleet: TaskResult, path: Path) -> None:
    """Digits with central DP: 8 devices (non-private, clipped, private) and the larger fleet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    for result, names, prefix in ((digits, labels, "8 devices: "), (fleet, list(fleet.runs), "")):
        for label in names:
            curve = result.runs[label][1].curve
            style = "-" if "DP" in label else "--"
            name = label if result is digits else f"{fleet.task.name}: {label}"
            axis.plot([t for t, _ in curve], [a for _, a in curve], style, label=prefix + name)
    axis.axhline(digits.central, color="black", linestyle=":", label="central (8 devices' rows)")
    axis.set_xlabel("simulated seconds (the devices' measured local CPU time)")
    axis.set_ylabel("held-out accuracy")
    axis.set_ylim(0.0, 1.0)
    axis.set_title(f"digits with central DP (epsilon <= {DP_EPSILON:g} at delta {DP_DELTA:g})")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# -- serving while training, for real ----------------------------------------------------------


def digits_tensor() -> Any:
    import tritonclient.grpc as grpcclient

    x = np.load(ROOT / "models" / "digits" / "sample.npy").astype(np.float32).reshape(1, 64)
    tensor = grpcclient.InferInput("input", [1, 64], "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def closed_loop(url: str, seconds: float) -> list[float]:
    """Latencies (ms) of one client sending the next request as soon as the last answers."""
    import tritonclient.grpc as grpcclient

    tensor = digits_tensor()
    latencies: list[float] = []
    with grpcclient.InferenceServerClient(url) as client:
        for _ in range(20):  # warm the channel
            client.infer("digits", [tensor])
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.perf_counter()
            client.infer("digits", [tensor])
            latencies.append((time.perf_counter() - started) * 1000)
    return latencies


class HalfBusyClient:
    """A client busy half the time: `on` seconds of closed-loop requests, then `off` idle."""

    def __init__(self, url: str, on: float = 0.5, off: float = 0.5) -> None:
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url, on, off), daemon=True)
        self._thread.start()

    def _run(self, url: str, on: float, off: float) -> None:
        import tritonclient.grpc as grpcclient

        tensor = digits_tensor()
        with grpcclient.InferenceServerClient(url) as client:
            while not self._stop.is_set():
                end = time.monotonic() + on
                while time.monotonic() < end:
                    started = time.perf_counter()
                    client.infer("digits", [tensor])
                    self.latencies.append((time.perf_counter() - started) * 1000)
                self._stop.wait(off)

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.latencies


def percentiles(latencies: list[float]) -> dict[str, float]:
    return {
        "requests": len(latencies),
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
    }


CHANNEL_SLOTS = ("busy", "batches", "pauses", "paused_ns", "paused_now")


def channel(state: Path) -> dict[str, int]:
    """The worker's counters, read from its channel file (a plain read: never mapped here, so
    a file the agent re-creates under us cannot fault this process)."""
    path = state / "sync" / "worker" / "worker.channel"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    if len(data) < 8 * len(CHANNEL_SLOTS):
        return {}
    values = struct.unpack_from(f"<{len(CHANNEL_SLOTS)}Q", data)
    return dict(zip(CHANNEL_SLOTS, values, strict=True))


def counters_since(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    return {
        "batches": after.get("batches", 0) - before.get("batches", 0),
        "pauses": after.get("pauses", 0) - before.get("pauses", 0),
        "paused_seconds": (after.get("paused_ns", 0) - before.get("paused_ns", 0)) / 1e9,
    }


def learning_metrics(agent: Any) -> dict[str, float]:
    text = urllib.request.urlopen(agent.metrics_url, timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("edge_agent_learning_"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def wait(condition: Callable[[], Any], what: str, timeout: float) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


def one_epoch_seconds(x: np.ndarray, y: np.ndarray, spec: TrainSpec) -> float:
    model = onnx.load(str(ROOT / "models" / "digits" / "1" / "model.onnx"))
    train(model, {"input": x}, y, dataclasses.replace(spec, epochs=1))  # warm
    started = time.perf_counter()
    train(model, {"input": x}, y, dataclasses.replace(spec, epochs=5))
    return (time.perf_counter() - started) / 5


def serving_while_training(
    window: float, run_seconds: float, loaded_budget: float
) -> dict[str, object]:
    """One control plane, one device; the agent restarted for each mode on the same state.
    1. --train-when always: p50/p99 at rest (no task), then while a long local run trains.
    2. --train-when idle: p50/p99 while a run trains (a task whose budget is `loaded_budget`
       seconds of training); the client keeps going until the run ends, to see how long a run
       takes, and how much it trains, under a client that never stops.
    3. --train-when idle, a task of fixed work (`run_seconds` unpaced): at rest again, then how
       long one run takes with no client (twice: the first starts the worker), with a client
       busy half the time (0.5 s on, 0.5 s off; then 2 s on, 2 s off), and with none again."""
    import test_learning

    from conftest import Daemon, Daemons

    daemons = Daemons()
    start = daemons.start

    x, y, x_val, y_val = digits_data()
    local = TrainSpec(epochs=1, lr=0.03, optimizer="sgd", batch_size=32)
    epoch = one_epoch_seconds(x, y, local)
    epochs = max(2, round(run_seconds / epoch))
    out: dict[str, object] = {
        "window_seconds": window,
        "examples": len(y),
        "local": dataclasses.asdict(local),
        "epoch_seconds_in_process": epoch,
    }
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        try:
            fleet = test_learning.LearningFleet(tmp, start)
            device = "edge-0"
            state = tmp / f"state-{device}"
            fleet.add_device(device)
            base = test_learning.weak_base(tmp / "base" / "digits" / "1" / "model.onnx")
            fleet.cli(
                "publish", str(base), "--model", "digits", "--version", "1", "--control-plane",
                fleet.address, "--signing-key", str(fleet.key), "--token-file",
                str(fleet.token_file),
            )  # fmt: skip
            validation = fleet.npz("validation", x_val, y_val)
            train_file = fleet.npz("train", x, y)

            def agent(mode: str) -> Daemon:
                a = fleet.learner(device, "--train-when", mode)
                wait(lambda: test_learning._serves_digits(a), "digits serving", 120)
                return a

            def task(epochs: int, seconds: float) -> int:
                started = fleet.learn(
                    "start", "--model", "digits", "--validation", str(validation),
                    "--buffer", "1", "--trainable", "all", "--epochs", str(epochs),
                    "--lr", str(local.lr), "--optimizer", local.optimizer, "--batch-size",
                    str(local.batch_size), "--train-seconds", str(seconds),
                    "--min-examples", "16", "--max-accuracy-drop", "0.5",
                )  # fmt: skip
                return int(started.stdout.strip())

            def stop(a: Daemon) -> None:
                a.stop()
                # The next agent's worker makes a new one: no reading of the old one's counters.
                (state / "sync" / "worker" / "worker.channel").unlink(missing_ok=True)

            def measure(url: str) -> dict[str, float]:
                load = os.getloadavg()[0]
                return {**percentiles(closed_loop(url, window)), "load_average_1min": load}

            def training(a: Daemon) -> dict[str, int]:
                return wait(  # type: ignore[no-any-return]
                    lambda: (c := channel(state)).get("batches", 0) > 0 and c, "training", 180
                )

            # 1. always: at rest, then training (a budget that outlasts the window).
            a = agent("always")
            fleet.cli(
                "examples", "import", "--url", a.control_url, "--model", "digits",
                "--data", str(train_file),
            )  # fmt: skip
            out["at_rest"] = measure(a.url)
            print(f"  at rest: {out['at_rest']}", file=sys.stderr, flush=True)
            always_task = task(1_000_000, 2 * window + 30)
            before = training(a)
            out["always"] = {**measure(a.url), **counters_since(before, channel(state))}
            print(f"  always: {out['always']}", file=sys.stderr, flush=True)
            stop(a)
            fleet.learn("stop", "--task", str(always_task))

            # 2. idle: training under a client that never stops.
            idle_task = task(1_000_000, loaded_budget)
            a = agent("idle")
            before = training(a)
            sent = len(a.named("learn.update_sent"))
            started = time.monotonic()
            load = os.getloadavg()[0]
            latencies = closed_loop(a.url, window)
            during = {
                **percentiles(latencies),
                "load_average_1min": load,
                **counters_since(before, channel(state)),
            }
            # The client goes on until the run's budget (training time, not pauses) ends it;
            # a run trains at least min_train_share (0.1) of the time: <= 10x its budget.
            extra: list[float] = []
            while len(a.named("learn.update_sent")) == sent:
                extra += closed_loop(a.url, 1.0)
                if time.monotonic() - started > 12 * loaded_budget + 30:
                    break
            runs = a.named("learn.update_sent")[sent:]
            out["idle"] = {
                **during,
                "run_under_constant_load": (
                    {k: runs[0][k] for k in ("seconds", "paused_seconds", "loss_after")}
                    if runs
                    else None
                ),
                "train_seconds_budget": loaded_budget,
                "waited_seconds": time.monotonic() - started,
                "p99_ms_until_the_run_ended": percentiles(latencies + extra)["p99_ms"],
                "metrics": learning_metrics(a),
            }
            print(f"  idle: {out['idle']}", file=sys.stderr, flush=True)
            fleet.learn("stop", "--task", str(idle_task))
            stop(a)

            # 3. idle, fixed work: how long a run takes, with no client and half busy.
            a = agent("idle")
            released = max(
                (
                    v.released_version
                    for t in (always_task, idle_task)
                    for v in fleet.task(t).versions
                    if v.version > 0
                ),
                default=0,
            )
            if released:  # let a learned release land before measuring at rest
                wait(
                    lambda: test_learning._serving_version(fleet, device) == released,
                    "the learned release serving", 120,
                )  # fmt: skip
                time.sleep(2)
            out["at_rest_again"] = measure(a.url)
            print(f"  at rest again: {out['at_rest_again']}", file=sys.stderr, flush=True)
            fixed_task = task(epochs, 100 * run_seconds + 600)

            def run_done(count: int) -> dict[str, Any]:
                return wait(  # type: ignore[no-any-return]
                    lambda: (
                        len(events := a.named("learn.update_sent")) >= count and events[count - 1]
                    ),
                    f"local run {count}",
                    60 * run_seconds + 300,
                )

            def brief(event: dict[str, Any]) -> dict[str, Any]:
                return {k: event[k] for k in ("seconds", "paused_seconds", "loss_after")}

            durations: dict[str, object] = {"epochs": epochs}
            durations["first_with_worker_start"] = brief(run_done(1))
            durations["no_client"] = brief(run_done(2))
            for count, (on, off) in enumerate(((0.5, 0.5), (2.0, 2.0)), start=3):
                client = HalfBusyClient(a.url, on, off)
                event = run_done(count)
                durations[f"client_busy_{on:g}s_idle_{off:g}s"] = {
                    **brief(event),
                    "client": percentiles(client.stop()),
                }
            durations["no_client_after"] = brief(run_done(5))
            durations["metrics"] = learning_metrics(a)
            durations["log_lines"] = a.named("learn.update_sent")[:5]
            out["run_duration"] = durations
            print(f"  runs: {out['run_duration']}", file=sys.stderr, flush=True)
            fleet.learn("stop", "--task", str(fixed_task))
            failed = [e for e in a.events if e.get("event") in ("learn.run_failed",)]
            out["run_failures"] = failed[:5]
        finally:
            daemons.stop_all()
    # At rest twice (first and last), the machine being shared: the ratios are to their mean.
    rests = [out["at_rest"], out["at_rest_again"]]
    rest = {k: float(np.mean([r[k] for r in rests])) for k in ("p50_ms", "p99_ms")}  # type: ignore[index]
    out["at_rest_mean"] = rest
    out["ratios"] = {
        f"{mode}_{q}_over_rest": out[mode][f"{q}_ms"] / rest[f"{q}_ms"]  # type: ignore[index]
        for mode in ("idle", "always")
        for q in ("p50", "p99")
    }
    out["ratios"]["idle_p99_over_first_rest"] = out["idle"]["p99_ms"] / out["at_rest"]["p99_ms"]  # type: ignore[index]
    out["target_idle_p99_at_most_1.3x_rest"] = out["ratios"]["idle_p99_over_rest"] <= 1.3
    return out


# -- compression (unchanged) -------------------------------------------------------------------


def compression(tmp: Path, x: np.ndarray, y: np.ndarray) -> dict[str, object]:
    import test_learning

    np.savez(tmp / "train.npz", input=x, labels=y)
    teacher = ROOT / "models" / "digits" / "1" / "model.onnx"
    validation = ROOT / "models" / "digits" / "validation.npz"
    out: dict[str, object] = {}
    for name, args in (
        (
            "prune_only",
            ["optimize", str(teacher), "--mode", "prune", "--validation", str(validation)],
        ),
        (
            "prune_fine_tuned",
            [
                "optimize",
                str(teacher),
                "--mode",
                "prune",
                "--fine-tune",
                str(tmp / "train.npz"),
                "--validation",
                str(validation),
            ],
        ),
        (
            "distilled",
            [
                "distill",
                "--teacher",
                str(teacher),
                "--student",
                str(test_learning.small_student(tmp / "s.onnx")),
                "--data",
                str(tmp / "train.npz"),
                "--validation",
                str(validation),
            ],
        ),
    ):
        report = tmp / f"{name}.json"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "edge_agent",
                *args,
                "--out",
                str(tmp / f"{name}.onnx"),
                "--report",
                str(report),
            ],
            check=True,
            cwd=ROOT,
            capture_output=True,
        )
        r = json.loads(report.read_text())
        out[name] = {
            "accuracy_before": r["validation"]["accuracy_before"],
            "accuracy_after": r["validation"]["accuracy_after"],
            "parameters": r["parameters"],
            "size_bytes": r["size_bytes"],
        }
    return out


# -- putting it together ------------------------------------------------------------------------


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", load average at start {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    return f"{platform.machine()}, {os.cpu_count()} cores, {model}{load}"


def targets(result: TaskResult, fedbuff_label: str, sync_label: str) -> dict[str, object]:
    """The team's targets for one FedBuff run against sync (FedAvgM) and central."""
    fb = summary(result.runs[fedbuff_label][1], result.target)
    sy = summary(result.runs[sync_label][1], result.target)
    to_fb, to_sy = fb["seconds_to_target"], sy["seconds_to_target"]
    speedup = (to_sy / to_fb) if isinstance(to_sy, float) and isinstance(to_fb, float) else None
    near = result.central - 0.01
    best, final = float(fb["best"]), float(fb["final"])  # type: ignore[arg-type]
    return {
        "fedbuff": fedbuff_label,
        "sync": sync_label,
        "final_and_best_at_least_sync": final >= sy["final"] and best >= sy["best"],  # type: ignore[operator]
        "final_and_best_within_1_point_of_central": final >= near and best >= near,
        "speedup_to_target": speedup,
        "at_least_2x_sooner_to_target": speedup is not None and speedup >= 2.0,
        "oscillation_points": fb["oscillation_points"],
        "last_quarter_never_below_best_minus_1_point": fb["oscillation_points"] <= 1.0,  # type: ignore[operator]
    }


def floor(result: TaskResult, label: str) -> float:
    """The lowest accuracy over the last quarter of the run's steps: what a late global can be
    as bad as (accuracy and steadiness in one number)."""
    return float(summary(result.runs[label][1], result.target)["last_quarter_min"])  # type: ignore[arg-type]


def federated(tasks: Sequence[Task], quick: bool) -> tuple[dict[str, Any], list[Path]]:
    """Every run of both tasks; the recommendation; DP. Returns the results and the plots."""
    rounds = 6 if quick else 40
    runs = rounds * DEVICES
    grid = QUICK_GRID if quick else GRID
    results: list[TaskResult] = []
    for task in tasks:
        task.calibrate()
        accuracy_central = central(task, runs)
        print(
            f"{task.name}: base {task.score(task.values()):.3f}, central {accuracy_central:.3f},"
            f" run seconds {[round(s, 3) for s in task.run_seconds]}",
            file=sys.stderr,
            flush=True,
        )
        results.append(TaskResult(task, accuracy_central))
    digits, shapes = results
    syncs = sync_configs()
    configs = {
        label_of(name, lr, momentum): fedbuff(label_of(name, lr, momentum), name, lr, momentum)
        for name, points in grid.items()
        for lr, momentum in points
    }
    # The control plane's default as it stands (learn/defaults.py), run on both tasks.
    default_name = str(TASK_DEFAULTS["server_optimizer"])
    default_point = (
        SERVER_LR_DEFAULTS[default_name],
        float(TASK_DEFAULTS["server_momentum"]) if default_name == "momentum" else 0.0,  # type: ignore[arg-type]
    )
    task_default = label_of(default_name, *default_point)
    configs.setdefault(task_default, fedbuff(task_default, default_name, *default_point))
    # 1. Digits (cheap): sync, and the lr grid of every server optimizer, each under two
    #    arrival schedules; an optimizer's lr is the one with the highest late floor (ties: the
    #    higher last-quarter mean), averaged over the schedules.
    for config in [*syncs, syncs[0].again(1)]:
        digits.run(config, runs)
    for config in configs.values():
        digits.run(config, runs)
        digits.run(config.again(1), runs)

    def rank(label: str, on: Sequence[TaskResult]) -> tuple[float, float]:
        """(late floor, last-quarter mean), each averaged over the schedules run of `label`
        and then over the tasks."""
        floors, means = [], []
        for r in on:
            labels = [x for x in (label, configs[label].again(1).label) if x in r.runs]
            floors.append(np.mean([floor(r, x) for x in labels]))
            means.append(np.mean([lqm(r, x) for x in labels]))
        return float(np.mean(floors)), float(np.mean(means))

    chosen = {
        name: max((label_of(name, *p) for p in points), key=lambda label: rank(label, [digits]))
        for name, points in grid.items()
    }
    keep = 2 if quick else 3
    shortlist = sorted(configs, key=lambda label: rank(label, [digits]), reverse=True)[:keep]
    on_both = list(dict.fromkeys([*chosen.values(), *shortlist, task_default]))
    # 2. Shapes: sync, each optimizer at the lr digits chose, and digits' best three (quick: 2).
    for config in [*syncs, *(configs[label] for label in on_both)]:
        shapes.run(config, runs)
    # 3. The best three (quick: 2) over both tasks again on shapes under the second schedule;
    #    the recommendation: the best late floor over both tasks and both schedules.
    finalists = sorted(on_both, key=lambda label: rank(label, results), reverse=True)[:keep]
    for config in [syncs[0], *(configs[label] for label in finalists)]:
        shapes.run(config.again(1), runs)

    def overall(label: str) -> tuple[float, float]:
        return rank(label, results)

    recommended = max(finalists, key=overall)
    reference = configs[recommended]
    server = reference.server
    # 4. FedProx and the median on the recommended configuration, on both tasks.
    variants = [
        fedbuff(f"{recommended} FedProx mu {mu:g}", server.name, server.lr, server.momentum,
                proximal_mu=mu)
        for mu in ((0.01,) if quick else (0.01, 0.1))
    ] + [
        fedbuff(f"{recommended} median", server.name, server.lr, server.momentum,
                aggregator="median")
    ]  # fmt: skip
    for result in results:
        for config in variants:
            result.run(config, runs)
    # 5. Central DP on digits, on the recommended configuration.
    dp, fleet = differential_privacy(digits, reference, runs, 40 if quick else 100, quick)
    shown = [
        [
            *(c.label for c in syncs),
            *dict.fromkeys([*chosen.values(), recommended, task_default]),
            *(c.label for c in variants),
        ]
        for _ in results
    ]
    plot(
        results,
        shown,
        PLOT,
        {recommended: " (recommended)", task_default: " (the task default now)"},
    )
    dp_labels = [
        recommended,
        *(x for x in digits.runs if x.startswith((f"{recommended} clip", f"{recommended} DP"))),
    ]
    plot_dp(digits, dp_labels, fleet, DP_PLOT)
    sync_label = syncs[0].label
    out = {
        "devices": DEVICES,
        "slow_devices": SLOW,
        "slowness": SLOWNESS,
        "jitter": JITTER,
        "buffer": BUFFER,
        "local_runs_per_federated_run": runs,
        "target_share_of_central": TARGET_SHARE,
        "lr_chosen_on_digits": chosen,
        "digits_shortlist": shortlist,
        "finalists": {
            label: {
                "late_floor_mean": overall(label)[0],
                "last_quarter_mean": overall(label)[1],
                "per_task_and_schedule": {
                    r.task.name: [
                        {"late_floor": floor(r, x), "last_quarter_mean": lqm(r, x)}
                        for x in (label, configs[label].again(1).label)
                    ]
                    for r in results
                },
            }
            for label in finalists
        },
        "recommended": {"label": recommended, **reference.describe()},
        "task_default_as_shipped": task_default,
        "tasks": {
            r.task.name: {
                "title": r.task.title,
                "local": dataclasses.asdict(r.task.local),
                "shares": [len(s) for s in r.task.shares],
                "run_seconds": r.task.run_seconds,
                "base_accuracy": r.runs[sync_label][1].curve[0][1],
                "central_accuracy": r.central,
                "target": r.target,
                "targets": targets(r, recommended, sync_label),
                "targets_second_schedule": targets(
                    r, reference.again(1).label, syncs[0].again(1).label
                ),
                "runs": {
                    label: {
                        **s,
                        "targets": targets(r, label, sync_label)
                        if label.startswith("fedbuff") and ", schedule " not in label
                        else None,
                    }
                    for label, s in r.summaries().items()
                },
                "curves": {label: outcome.curve for label, (_, outcome) in r.runs.items()},
            }
            for r in results
        },
        "differential_privacy": {
            **dp,
            "within_3_points_of_non_private": (
                dp["runs"]["private"]["final"] >= dp["runs"]["non_private"]["final"] - 0.03  # type: ignore[index]
            ),
        },
    }
    return out, [PLOT, DP_PLOT]


def print_summary(results: dict[str, Any]) -> None:
    fed = results["federated"]
    yes = {True: "yes", False: "no"}
    for task in fed["tasks"].values():
        print(
            f"\n{task['title']}: base {task['base_accuracy']:.3f}, central "
            f"{task['central_accuracy']:.3f}, target {task['target']:.3f}"
        )
        print(
            f"  {'run':50s} {'best':>6s} {'final':>6s} {'lq-mean':>7s} {'to-tgt':>7s} "
            f"{'osc':>6s}  >=sync <=1pt-central 2x-sooner osc<=1"
        )
        for label, s in task["runs"].items():
            t = s["targets"]
            flags = (
                f"  {yes[t['final_and_best_at_least_sync']]:>6s} "
                f"{yes[t['final_and_best_within_1_point_of_central']]:>13s} "
                f"{yes[t['at_least_2x_sooner_to_target']]:>9s} "
                f"{yes[t['last_quarter_never_below_best_minus_1_point']]:>6s}"
                if t
                else ""
            )
            print(
                f"  {label:50s} {s['best']:6.3f} {s['final']:6.3f} {s['last_quarter_mean']:7.3f} "
                f"{fmt(s['seconds_to_target']):>7s} {s['oscillation_points']:6.2f}{flags}"
            )
    print(f"\nrecommended: {fed['recommended']['label']} (finalists: {list(fed['finalists'])})")
    dp = fed["differential_privacy"]
    print(
        f"DP: C {dp['clip_norm']:.3g}, z {dp['noise_multiplier']}, epsilon {dp['epsilon']:.2f} "
        f"over {dp['aggregations']} aggregations; final private "
        f"{dp['runs']['private']['final']:.3f} vs non-private "
        f"{dp['runs']['non_private']['final']:.3f}"
        f" (clipped only {dp['runs']['clipped_only']['final']:.3f})"
    )
    big = dp["larger_fleet"]
    print(
        f"DP, {big['devices']} devices, K {big['buffer']}: z {big['noise_multiplier']}, epsilon "
        f"{big['epsilon']:.2f}; "
        + ", ".join(f"{k} final {v['final']:.3f}" for k, v in big["runs"].items())
    )
    serving = results["serving"]

    def pair(name: str) -> str:
        return f"{serving[name]['p50_ms']:.2f}/{serving[name]['p99_ms']:.2f}"

    print(
        f"serving p50/p99 ms: at rest {pair('at_rest')} (again {pair('at_rest_again')}), "
        f"idle {pair('idle')}, always {pair('always')}; ratios {serving['ratios']}"
    )
    runs = serving["run_duration"]
    print(
        f"a run of {runs['epochs']} epochs: no client {runs['no_client']}, client busy half the"
        f" time {runs['client_busy_0.5s_idle_0.5s']}, in 2 s turns {runs['client_busy_2s_idle_2s']}"
    )
    print(f"uplink {results['uplink']}; total {results['seconds']:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of about 2 minutes")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # the simulation's clock is per-device CPU time
    started = time.monotonic()
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "quick": args.quick,
    }
    digits, shapes = digits_task(), shapes_task()
    results["federated"], plots = federated([digits, shapes], args.quick)
    results["plots"] = [str(p.relative_to(ROOT)) for p in plots]
    x, y = digits.x, digits.y
    rows = digits.shares[0]
    trained = train(digits.base, {"input": x[rows]}, y[rows], TrainSpec(epochs=1)).deltas
    uplink = {
        "int8_bytes": len(delta.encode(trained, 256)),
        "fp32_bytes": len(delta.encode(trained)),
    }
    results["uplink"] = {**uplink, "share": uplink["int8_bytes"] / uplink["fp32_bytes"]}
    window, run_seconds, loaded_budget = (3.0, 0.15, 0.5) if args.quick else (20.0, 2.0, 8.0)
    results["serving"] = serving_while_training(window, run_seconds, loaded_budget)
    with tempfile.TemporaryDirectory() as scratch:
        results["compression"] = compression(Path(scratch), x, y)
    results["seconds"] = time.monotonic() - started
    RESULTS.write_text(json.dumps(results, indent=1))
    print_summary(results)


if __name__ == "__main__":
    main()
