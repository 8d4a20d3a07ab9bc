"""Learning on the fleet, measured (BENCHMARKS.md "Learning"):

    .venv/bin/python benchmarks/learning.py [--quick]

1. Federated vs central: scikit-learn's digits (the shipped model's training split, 1,437 rows)
   split across 8 simulated devices with label skew (each device holds mostly 2-3 classes),
   starting from a deliberately weak base (the shipped architecture trained on 40 rows).
   Synchronous rounds (FedAvg: every device trains, the server waits for all) vs buffered
   asynchronous aggregation (FedBuff, K=4, staleness weight (1+tau)^-0.5), with 2 of the 8
   devices 3x slower. Local training is the real engine (learn/train.py); the wall-clock is a
   simulation: each local run's measured compute time, times the device's slowness, on a
   virtual clock (8 devices do not fit on 2 cores). Reports accuracy on the held-out 360 digits
   and the simulated time each reaches the target (central accuracy - 1 point).
2. Uplink: bytes of an update (int8 deltas above 256 elements, the default) vs fp32.
3. Serving p99 while a device trains (the real worker process at nice 19) vs at rest.
4. Pruning 50% + fine-tuning, and distillation to a 4x smaller student.
Writes benchmarks/learning_results.json.
"""

from __future__ import annotations

import argparse
import heapq
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from edge_agent.learn import delta  # noqa: E402
from edge_agent.learn.onnxinfo import accuracy, apply  # noqa: E402
from edge_agent.learn.train import TrainSpec, train  # noqa: E402

DEVICES, SLOW, SLOWNESS = 8, 2, 3.0


def data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x, y = digits.data.astype(np.float32), digits.target.astype(np.int64)
    x_train, x_val, y_train, y_val = train_test_split(
        x, y, test_size=0.2, random_state=0, stratify=y
    )
    return x_train, y_train, x_val, y_val


def skewed(y: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Row indices per device: 80% from 2-3 classes of its own, 20% from the rest."""
    by_class = {c: list(rng.permutation(np.flatnonzero(y == c))) for c in range(10)}
    per_device = len(y) // DEVICES
    shares = []
    for d in range(DEVICES):
        own = [(d + k) % 10 for k in range(2 + d % 2)]
        rows: list[int] = []
        for c in own:
            rows += [
                by_class[c].pop() for _ in range(int(0.8 * per_device / len(own))) if by_class[c]
            ]
        others = [c for c in range(10) if c not in own]
        turn = 0
        while len(rows) < per_device and any(by_class[c] for c in others):
            c = others[turn % len(others)]
            turn += 1
            if by_class[c]:
                rows.append(by_class[c].pop())
        shares.append(np.array(rows))
    return shares


def weak_base(x: np.ndarray, y: np.ndarray) -> onnx.ModelProto:
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
    return apply(model, result.deltas)


def local(
    model: onnx.ModelProto, x: np.ndarray, y: np.ndarray, epochs: int
) -> tuple[dict[str, np.ndarray], float]:
    started = time.process_time()
    result = train(
        model, {"input": x}, y, TrainSpec(epochs=epochs, lr=0.003, optimizer="adam", batch_size=16)
    )
    return result.deltas, time.process_time() - started


def federated(
    base: onnx.ModelProto,
    shares: list[np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    mode: str,
    budget: int,
    epochs: int,
) -> list[tuple[float, float]]:
    """(simulated seconds, held-out accuracy) after each aggregation."""
    speed = [SLOWNESS if d < SLOW else 1.0 for d in range(DEVICES)]
    names = [t.name for t in base.graph.initializer]
    global_values = {
        t.name: numpy_helper.to_array(t).astype(np.float32) for t in base.graph.initializer
    }
    curve = [(0.0, accuracy(base, {"input": x_val}, y_val))]
    clock = 0.0
    if mode == "sync":
        for _ in range(budget):
            model = apply(base, global_values, add=False)
            updates, times = [], []
            for d in range(DEVICES):
                deltas, seconds = local(model, x[shares[d]], y[shares[d]], epochs)
                times.append(seconds * speed[d])
                updates.append(delta.Update(deltas, len(shares[d]), 0))
            clock += max(times)
            step = delta.aggregate(updates, delta.Aggregation(staleness_exponent=0.0))
            global_values = {n: global_values[n] + step[n] for n in names}
            curve.append(
                (clock, accuracy(apply(base, global_values, add=False), {"input": x_val}, y_val))
            )
        return curve
    settings = delta.Aggregation(buffer=4, staleness_exponent=0.5)
    version, buffer = 0, []
    events: list[tuple[float, int, int, dict[str, np.ndarray]]] = []
    for d in range(DEVICES):
        deltas, seconds = local(
            apply(base, global_values, add=False), x[shares[d]], y[shares[d]], epochs
        )
        heapq.heappush(events, (seconds * speed[d], d, version, deltas))
    aggregations = 0
    while aggregations < budget * DEVICES // settings.buffer:
        clock, d, started_from, deltas = heapq.heappop(events)
        buffer.append(delta.Update(deltas, len(shares[d]), version - started_from))
        if len(buffer) >= settings.buffer:
            step = delta.aggregate(buffer, settings)
            global_values = {n: global_values[n] + step[n] for n in names}
            version, buffer = version + 1, []
            aggregations += 1
            curve.append(
                (clock, accuracy(apply(base, global_values, add=False), {"input": x_val}, y_val))
            )
        deltas, seconds = local(
            apply(base, global_values, add=False), x[shares[d]], y[shares[d]], epochs
        )
        heapq.heappush(events, (clock + seconds * speed[d], d, version, deltas))
    return curve


def reached(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, a in curve if a >= target), None)


def serving_p99(agent_url: str, seconds: float) -> float:
    import tritonclient.grpc as grpcclient

    x = np.load(ROOT / "models" / "digits" / "sample.npy").astype(np.float32).reshape(1, 64)
    latencies: list[float] = []
    with grpcclient.InferenceServerClient(agent_url) as client:
        tensor = grpcclient.InferInput("input", [1, 64], "FP32")
        tensor.set_data_from_numpy(x)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.perf_counter()
            client.infer("digits", [tensor])
            latencies.append(time.perf_counter() - started)
    return float(np.percentile(latencies, 99) * 1000)


def serving_while_training(x: np.ndarray, y: np.ndarray, seconds: float) -> dict[str, float]:
    from conftest import Daemon

    agent = Daemon(
        ["--model-repository", str(ROOT / "models"), "--execution-providers", "cpu"]
    ).wait_started()
    try:
        rest = serving_p99(agent.url, seconds)
        with tempfile.TemporaryDirectory() as scratch:
            np.savez(Path(scratch) / "x.npz", input=x, labels=y)
            job = {
                "model_dir": str(ROOT / "models" / "digits" / "1"),
                "examples": str(Path(scratch) / "x.npz"),
                "spec": {"epochs": 10_000, "seconds": seconds + 5},
                "out": str(Path(scratch) / "out"),
            }
            (Path(scratch) / "job.json").write_text(json.dumps(job))
            worker = subprocess.Popen(
                [sys.executable, "-m", "edge_agent.learn.worker", str(Path(scratch) / "job.json")],
                cwd=ROOT,
            )
            time.sleep(2)
            busy = serving_p99(agent.url, seconds)
            worker.kill()
            worker.wait()
    finally:
        agent.stop()
    return {"p99_ms_at_rest": rest, "p99_ms_while_training": busy, "ratio": busy / rest}


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds, epochs, seconds = (3, 1, 3.0) if args.quick else (40, 2, 10.0)
    x, y, x_val, y_val = data()
    rng = np.random.default_rng(0)
    shares = skewed(y, rng)
    base = weak_base(x, y)
    # Central: the same total work (every row, as many epochs as a device trains in all).
    central_model = apply(
        base,
        train(
            base,
            {"input": x},
            y,
            TrainSpec(epochs=rounds * epochs, lr=0.003, optimizer="adam", batch_size=16),
        ).deltas,
    )
    central = accuracy(central_model, {"input": x_val}, y_val)
    sync = federated(base, shares, x, y, x_val, y_val, "sync", rounds, epochs)
    fedbuff = federated(base, shares, x, y, x_val, y_val, "async", rounds, epochs)
    target = central - 0.01
    trained = train(base, {"input": x[shares[0]]}, y[shares[0]], TrainSpec(epochs=1)).deltas
    uplink = {
        "int8_bytes": len(delta.encode(trained, 256)),
        "fp32_bytes": len(delta.encode(trained)),
    }
    with tempfile.TemporaryDirectory() as scratch:
        squeezed = compression(Path(scratch), x, y)
    results = {
        "devices": DEVICES,
        "slow_devices": SLOW,
        "slowness": SLOWNESS,
        "shares": [len(s) for s in shares],
        "base_accuracy": sync[0][1],
        "central_accuracy": central,
        "target": target,
        "sync": {
            "final_accuracy": sync[-1][1],
            "seconds_to_target": reached(sync, target),
            "curve": sync,
        },
        "fedbuff": {
            "final_accuracy": fedbuff[-1][1],
            "seconds_to_target": reached(fedbuff, target),
            "curve": fedbuff,
        },
        "uplink": {**uplink, "share": uplink["int8_bytes"] / uplink["fp32_bytes"]},
        "serving": serving_while_training(x, y, seconds),
        "compression": squeezed,
    }
    s, f = results["sync"]["seconds_to_target"], results["fedbuff"]["seconds_to_target"]
    results["speedup_to_target"] = (s / f) if s and f else None
    # The same comparison at lower bars: how soon each gets within reach.
    results["seconds_to"] = {
        f"{bar:.2f}": {"sync": reached(sync, bar), "fedbuff": reached(fedbuff, bar)}
        for bar in (0.90, 0.93, 0.95)
    }
    (ROOT / "benchmarks" / "learning_results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v for k, v in results.items() if k not in ("sync", "fedbuff")}, indent=1))
    print(
        "sync",
        results["sync"]["final_accuracy"],
        s,
        "fedbuff",
        results["fedbuff"]["final_accuracy"],
        f,
    )


if __name__ == "__main__":
    main()
