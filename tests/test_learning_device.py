"""The device's side of learning without a control plane: FedProx's term in the local loss, the
training worker as the agent keeps it (one process across runs, paused while serving is busy),
and the parameter server's pure decisions (when a buffer is due, what `learn status` says)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from conftest import ROOT, wait_for
from edge_agent._proto import fleet_pb2 as pb
from edge_agent.controlplane.learning import check_spec, due, progress, spec_defaults
from edge_agent.controlplane.registry import LearningTaskRow, UpdateRow
from edge_agent.errors import EdgeAgentError
from edge_agent.learn import delta
from edge_agent.learn.defaults import min_interval
from edge_agent.learn.process import Activity, Cancelled, Pacing, Worker
from edge_agent.learn.worker import BATCHES, PAUSED_NOW, PAUSES

pytest.importorskip("torch", reason="the learn extra (PyTorch) is part of the test install")

DIGITS = ROOT / "models" / "digits"


def _digits() -> tuple[np.ndarray, np.ndarray]:
    data = np.load(DIGITS / "validation.npz")
    return data["input"][:96].astype(np.float32), data["labels"][:96].astype(np.int64)


def test_fedprox_changes_the_update_as_its_formula_says() -> None:
    """Full-batch SGD: step 1 is the same with or without the term (w = w_global there); step 2
    adds mu * (w1 - w0) to the gradient, so delta_prox(2) = delta(2) - lr * mu * delta(1)."""
    from edge_agent.learn.train import TrainSpec, train

    model = onnx.load(str(DIGITS / "1" / "model.onnx"))
    x, y = _digits()
    lr, mu, rows = 0.05, 3.0, len(y)

    def run(epochs: int, proximal_mu: float) -> dict[str, np.ndarray]:
        spec = TrainSpec(epochs=epochs, batch_size=rows, lr=lr, proximal_mu=proximal_mu)
        return train(model, {"input": x}, y, spec).deltas

    one, two, prox = run(1, 0.0), run(2, 0.0), run(2, mu)
    for name in one:
        expected = two[name] - lr * mu * one[name]
        assert np.allclose(prox[name], expected, atol=1e-6), name
        assert not np.allclose(prox[name], two[name], atol=1e-6)  # the term did something
    with pytest.raises(Exception, match="proximal_mu"):
        TrainSpec(proximal_mu=-1)


class Serving:
    """The agent's activity as the worker's pacing sees it, set by the test."""

    def __init__(self) -> None:
        self.in_flight = 0

    def __call__(self) -> tuple[int, int]:
        return self.in_flight, 0


def _job(tmp: Path, epochs: int, name: str) -> dict[str, Any]:
    x, y = _digits()
    np.savez(tmp / f"{name}.npz", input=x, labels=y)
    return {
        "model_dir": str(DIGITS / "1"),
        "examples": str(tmp / f"{name}.npz"),
        "global": None,
        "spec": {"epochs": epochs, "batch_size": 8, "seconds": 300.0},
        "out": str(tmp / name),
        "min_share": 1e-6,  # a paused run stays paused: the test reads counters, not clocks
    }


def test_the_worker_pauses_while_serving_is_busy_and_resumes_after(tmp_path: Path) -> None:
    worker = Worker(tmp_path / "w", None)
    serving, stop = Serving(), threading.Event()
    answers: list[dict[str, object]] = []
    try:
        # A first short run: the process (and PyTorch) starts once and stays for the next.
        first = worker.run(_job(tmp_path, 1, "first"), 120, stop, Pacing(), serving)
        assert first["ok"] and (tmp_path / "first" / "deltas.npz").is_file()
        pid = worker.process.pid

        def long_run() -> None:
            try:
                answers.append(
                    worker.run(_job(tmp_path, 400, "long"), 300, stop, Pacing(), serving)
                )
            except Cancelled:
                answers.append({"cancelled": True})

        runner = threading.Thread(target=long_run)
        runner.start()
        wait_for(lambda: worker.channel.get(BATCHES) > 20, "the long run training")
        serving.in_flight = 1  # a request in flight: the worker stops between mini-batches
        wait_for(lambda: worker.channel.get(PAUSED_NOW) == 1, "the worker paused")
        paused_at = worker.channel.get(BATCHES)
        assert worker.channel.get(PAUSES) >= 1
        time.sleep(0.3)
        assert worker.channel.get(BATCHES) == paused_at  # no mini-batch while paused
        serving.in_flight = 0  # quiet again: it resumes
        wait_for(lambda: worker.channel.get(BATCHES) > paused_at + 5, "the worker resumed")
        assert worker.channel.get(PAUSED_NOW) == 0
        stop.set()  # the agent stopping mid-run: the run is cancelled, not failed
        runner.join(timeout=30)
        assert answers == [{"cancelled": True}]
        assert worker.process.pid == pid  # one process served both runs
    finally:
        stop.set()
        worker.kill()
    assert worker.process.poll() is not None


def test_a_cancelled_run_raises_cancelled(tmp_path: Path) -> None:
    worker = Worker(tmp_path / "w", None)
    stop = threading.Event()
    stop.set()
    try:
        with pytest.raises(Cancelled):
            worker.run(_job(tmp_path, 1, "x"), 60, stop, Pacing(), None)
    finally:
        worker.kill()


def test_always_mode_never_pauses(tmp_path: Path) -> None:
    worker = Worker(tmp_path / "w", None)
    busy = Serving()
    busy.in_flight = 5
    try:
        answer = worker.run(
            _job(tmp_path, 3, "a"), 120, threading.Event(), Pacing(when="always"), busy
        )
        assert answer["ok"] and answer["paused_seconds"] == 0
        assert worker.channel.get(PAUSES) == 0 and worker.channel.get(BATCHES) == 3 * 12
    finally:
        worker.close()


def _task(spec: pb.LearningSpec, devices: int = 3) -> LearningTaskRow:
    return LearningTaskRow(
        1, "m", 1, spec.SerializeToString(), b"", {}, "running", 0, "", 0, 0.5, {},
        tuple(f"d{i}" for i in range(devices)),
    )  # fmt: skip


def _rows(*devices_and_times: tuple[str, float], base: int = 0) -> list[UpdateRow]:
    return [UpdateRow(f"u{i}", d, base, 10, "x", at) for i, (d, at) in enumerate(devices_and_times)]


def _ids(rows: list[UpdateRow]) -> list[str]:
    return [r.update_id for r in rows]


def test_when_a_buffer_is_due_and_what_status_says() -> None:
    spec = pb.LearningSpec(buffer=3, min_updates=2, max_wait=60.0, max_staleness=10)
    rows = _rows(("d0", 100.0), ("d1", 110.0))
    assert due(spec, rows, 150.0, 0) == ([], {})  # 2 of 3, and only 50 s waited
    assert due(spec, rows, 160.0, 0) == (rows, {})  # max wait passed with min_updates in
    assert due(spec, rows[:1], 1000.0, 0) == ([], {})  # fewer than min_updates wait for ever
    full = _rows(("d0", 1.0), ("d0", 2.0), ("d1", 3.0), ("d2", 4.0))
    taken, dropped = due(spec, full, 5.0, 0)
    assert _ids(taken) == ["u0", "u1", "u2"] and not dropped  # the mean: a fast device twice
    # Updates that grew too stale while waiting are dropped with the aggregation.
    taken, dropped = due(spec, full, 5.0, 11)
    assert not taken and not dropped
    old_and_new = [*_rows(("d0", 1.0), base=0), UpdateRow("n1", "d1", 9, 10, "x", 2.0)]
    assert due(spec, old_and_new, 500.0, 11) == ([], {})  # only one fresh: min_updates is 2
    spec_one = pb.LearningSpec(buffer=3, min_updates=1, max_wait=60.0, max_staleness=10)
    assert due(spec_one, old_and_new, 500.0, 11) == (old_and_new[1:], {"u0": "dropped_stale"})
    # With DP or a robust aggregator a buffer takes one update per device (its newest), and
    # the device's older ones go with the aggregation.
    for private in (
        pb.LearningSpec(buffer=3, min_updates=1, max_wait=60.0, dp_noise_multiplier=1.0),
        pb.LearningSpec(buffer=3, min_updates=1, max_wait=60.0, aggregator="median"),
        pb.LearningSpec(buffer=3, min_updates=1, max_wait=60.0, trim=0.2),
    ):
        private.max_staleness = 10
        taken, dropped = due(private, full, 5.0, 0)
        assert _ids(taken) == ["u1", "u2", "u3"] and dropped == {"u0": "superseded"}
    # A task stored before max_wait existed (0): it waits for a full buffer, as it always did.
    legacy = pb.LearningSpec(buffer=4, max_staleness=10)
    assert due(legacy, rows, 1e9, 0) == ([], {})
    text = progress(_task(spec), spec, rows, 1, 150.0)
    assert text.startswith("waiting for 1 more update(s); 1 of 3 device(s) active")
    assert "in 10 s (max wait)" in text
    assert "needs 1 more" in progress(_task(spec), spec, rows[:1], 1, 150.0)
    stopped = LearningTaskRow(**{**_task(spec).__dict__, "state": "stopped"})
    assert progress(stopped, spec, [], 0, 0.0) == "stopped"


def test_an_update_stays_a_tensor_set_of_the_trained_names() -> None:
    """What the worker writes is what the agent encodes and the control plane decodes."""
    from edge_agent.learn.train import TrainSpec, train

    model = onnx.load(str(DIGITS / "1" / "model.onnx"))
    x, y = _digits()
    result = train(model, {"input": x}, y, TrainSpec(trainable="last:1", proximal_mu=0.1))
    shapes = {k: list(v.shape) for k, v in result.deltas.items()}
    back = delta.decode(delta.encode(result.deltas, 256), shapes)
    assert sorted(back) == ["b2", "w2"]


def test_an_older_control_planes_assignment_keeps_the_default_interval() -> None:
    assert min_interval(pb.LearningAssignment()) == 30.0  # unset: not back to back
    assert min_interval(pb.LearningAssignment(min_interval=0.0)) == 0.0  # chosen
    assert min_interval(pb.LearningAssignment(min_interval=5.0)) == 5.0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"aggregator": "mode"}, "aggregator 'mode'"),
        ({"aggregator": "median", "trim": 0.1}, "choose one"),
        ({"server_optimizer": "lamb"}, "server optimizer 'lamb'"),
        ({"server_momentum": 1.0}, "momentum"),
        ({"dp_noise_multiplier": 1.0}, "needs clip_norm > 0"),
        ({"dp_noise_multiplier": 1.0, "clip_norm": 1.0, "aggregator": "median"}, "on the mean"),
        ({"dp_max_epsilon": 3.0}, "needs dp_noise_multiplier"),
        ({"dp_noise_multiplier": 0.3, "clip_norm": 1.0, "dp_max_epsilon": 0.5}, "allows no"),
        ({"max_wait": float("nan")}, "max_wait must be a finite number"),
        ({"proximal_mu": -1.0}, "proximal_mu"),
    ],
)
def test_a_spec_that_cannot_run_is_refused_naming_the_field(
    fields: dict[str, Any], message: str
) -> None:
    spec = spec_defaults(pb.LearningSpec(model="m", **fields))
    with pytest.raises(EdgeAgentError, match=message):
        check_spec(spec)


def test_zero_is_a_choice_where_it_means_something() -> None:
    spec = spec_defaults(pb.LearningSpec(max_accuracy_drop=0.0, server_momentum=0.0))
    assert spec.max_accuracy_drop == 0.0 and spec.server_momentum == 0.0  # kept
    unset = spec_defaults(pb.LearningSpec())
    assert unset.max_accuracy_drop == 0.01 and unset.server_momentum == 0.5
    assert unset.server_optimizer == "momentum" and unset.server_lr == 0.3  # as measured
    assert spec_defaults(pb.LearningSpec(server_optimizer="adam")).server_lr == 0.003
    assert unset.min_interval == 30.0 and unset.max_wait == 120.0
    check_spec(unset)  # the defaults run


def test_serving_is_busy_while_requests_run_and_a_quiet_window_after() -> None:
    activity = Activity()
    assert not activity.busy((0, 10), 0.1, now=0.0)  # the first sample sets the baseline
    assert activity.busy((1, 10), 0.1, now=0.01)  # one in flight
    assert activity.busy((0, 11), 0.1, now=0.02)  # it finished just now
    assert activity.busy((0, 11), 0.1, now=0.11)  # 90 ms later: still within the window
    assert not activity.busy((0, 11), 0.1, now=0.125)  # quiet for 105 ms: train
    assert activity.busy((0, 12), 0.1, now=0.5)  # the next burst
