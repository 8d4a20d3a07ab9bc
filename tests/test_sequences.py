"""The sequence batcher with implicit state (Triton's sequence_batching) through the real daemon
with tritonclient: each sequence sees its own state, start resets it, end frees it, an idle one
expires, misuse gets Triton's errors, the caps hold, sequences batch with each other, and a
third party's stateful model (Silero VAD, from its wheel) answers as ONNX Runtime does with the
state carried by hand."""

from __future__ import annotations

import importlib.resources
import queue
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

import modelgen
from conftest import Daemon, metric, triton_failure, wait_for
from edge_agent.common.failpoints import ENVIRONMENT, REQUEST_EXECUTING

WIDTH = 4


def build(repo: Path) -> Path:
    modelgen.accumulator(repo / "acc" / "1" / "model.onnx")
    (repo / "acc" / "config.pbtxt").write_text(
        modelgen.ACCUMULATOR_CONFIG.format(idle_us=60_000_000, parameters="")
    )
    # Expires fast.
    modelgen.accumulator(repo / "brief" / "1" / "model.onnx")
    (repo / "brief" / "config.pbtxt").write_text(
        modelgen.ACCUMULATOR_CONFIG.format(idle_us=300_000, parameters="")
    )
    # Holds at most three sequences.
    modelgen.accumulator(repo / "capped" / "1" / "model.onnx")
    (repo / "capped" / "config.pbtxt").write_text(
        modelgen.ACCUMULATOR_CONFIG.format(
            idle_us=600_000_000,
            parameters='parameters { key: "max_sequences" value { string_value: "3" } }\n',
        )
    )
    modelgen.recurrent(repo / "rnn" / "1" / "model.onnx", width=16, hidden=64)
    (repo / "rnn" / "config.pbtxt").write_text(modelgen.RECURRENT_CONFIG)
    # A state the model does not have: refused at load, with the reason.
    modelgen.accumulator(repo / "nostate" / "1" / "model.onnx")
    (repo / "nostate" / "config.pbtxt").write_text(
        modelgen.ACCUMULATOR_CONFIG.format(idle_us=1_000_000, parameters="").replace(
            'input_name: "acc"', 'input_name: "ghost"'
        )
    )
    return repo


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("sequences"))


@pytest.fixture(scope="module")
def agent(repo: Path) -> Iterator[Daemon]:
    daemon = Daemon(
        ["--model-repository", str(repo), "--execution-providers", "cpu",
         "--http-address", "127.0.0.1:0"]
    ).wait_started()  # fmt: skip
    yield daemon
    daemon.stop()


def http_url(agent: Daemon) -> str:
    return f"127.0.0.1:{agent.named('agent.started')[0]['http_port']}"


def step(
    url: str,
    sequence: int | str,
    x: np.ndarray,
    start: bool = False,
    end: bool = False,
    model: str = "acc",
    http: bool = False,
) -> dict[str, np.ndarray]:
    """One request of a sequence; its outputs."""
    if http:
        import tritonclient.http as client_module
    else:
        import tritonclient.grpc as client_module  # type: ignore[no-redef]
    client = client_module.InferenceServerClient(url)
    try:
        name = "x"
        tensor = client_module.InferInput(name, list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer(
            model, [tensor], sequence_id=sequence, sequence_start=start, sequence_end=end
        )
        outputs = ("y",) if model == "rnn" else ("total", "started", "corrid")
        return {n: result.as_numpy(n) for n in outputs}
    finally:
        client.close()


def row(value: float) -> np.ndarray:
    return np.full((1, WIDTH), value, np.float32)


def test_interleaved_sequences_each_see_their_own_state(agent: Daemon) -> None:
    sequences = [11, 12, 13, 14]
    totals = {s: np.zeros((1, WIDTH), np.float32) for s in sequences}
    rng = np.random.default_rng(0)
    for i in range(6):
        for n, sequence in enumerate(sequences):
            x = rng.standard_normal((1, WIDTH)).astype(np.float32)
            got = step(
                agent.url if n % 2 else http_url(agent),
                sequence,
                x,
                start=i == 0,
                end=i == 5,
                http=not n % 2,
            )
            totals[sequence] = totals[sequence] + x
            np.testing.assert_allclose(got["total"], totals[sequence], rtol=1e-6)
            assert int(got["started"][0, 0]) == (1 if i == 0 else 0)
            assert int(got["corrid"][0, 0]) == sequence


def test_start_resets_and_end_frees(agent: Daemon) -> None:
    live = 'edge_agent_sequences_live{model="acc",version="1"}'
    before = metric(agent, live)
    step(agent.url, 21, row(1), start=True)
    step(agent.url, 21, row(2))
    assert metric(agent, live) == before + 1
    assert step(agent.url, 21, row(3), end=True)["total"][0, 0] == 6
    assert metric(agent, live) == before
    # Ended: a continuation is refused; a new start begins from zero.
    status, message = triton_failure(lambda: step(agent.url, 21, row(1)))
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert "sequence 21 is not started (or has ended)" in message
    assert step(agent.url, 21, row(5), start=True)["total"][0, 0] == 5
    step(agent.url, 21, row(0), end=True)


def test_misuse_gets_clear_errors(agent: Daemon) -> None:
    status, message = triton_failure(lambda: step(agent.url, 31, row(1)))
    assert status == "StatusCode.INVALID_ARGUMENT" and "must set sequence_start" in message
    # A start for a live sequence ends it early and starts it again from zero (Triton's rule).
    assert step(agent.url, 32, row(1), start=True)["total"][0, 0] == 1
    assert step(agent.url, 32, row(1))["total"][0, 0] == 2
    assert step(agent.url, 32, row(5), start=True)["total"][0, 0] == 5
    assert step(agent.url, 32, row(1), end=True)["total"][0, 0] == 6
    status, message = triton_failure(lambda: step(agent.url, 0, row(1)))
    assert status == "StatusCode.INVALID_ARGUMENT" and "needs a sequence_id" in message
    status, message = triton_failure(lambda: step(agent.url, 33, np.ones((2, WIDTH), np.float32)))
    assert status == "StatusCode.INVALID_ARGUMENT" and "one row" in message
    status, _ = triton_failure(lambda: step(http_url(agent), 31, row(1), http=True))
    assert status == "400"
    # Its CORRID control input is a number: a string id cannot start a sequence of it.
    live = metric(agent, 'edge_agent_sequences_live{model="acc",version="1"}')
    status, message = triton_failure(lambda: step(agent.url, "camera-3", row(1), start=True))
    assert status == "StatusCode.INVALID_ARGUMENT" and "takes a number" in message
    assert metric(agent, 'edge_agent_sequences_live{model="acc",version="1"}') == live
    refusals = metric(
        agent, 'edge_agent_sequence_refusals_total{cause="unknown",model="acc",version="1"}'
    )
    assert refusals >= 2


def test_an_idle_sequence_expires(agent: Daemon) -> None:
    step(agent.url, 41, row(1), model="brief", start=True)
    expired = 'edge_agent_sequences_total{model="brief",outcome="expired",version="1"}'
    wait_for(lambda: metric(agent, expired) >= 1, "the idle sequence to expire")
    status, message = triton_failure(lambda: step(agent.url, 41, row(1), model="brief"))
    assert status == "StatusCode.INVALID_ARGUMENT" and "expired after 0.3 s idle" in message


def test_the_cap_on_live_sequences_holds(agent: Daemon) -> None:
    # Three live sequences at most; a fourth start is UNAVAILABLE until one ends.
    for sequence in (51, 52, 53):
        step(agent.url, sequence, row(1), model="capped", start=True)
    status, message = triton_failure(
        lambda: step(agent.url, 54, row(1), model="capped", start=True)
    )
    assert status == "StatusCode.UNAVAILABLE" and "3 live sequences" in message
    step(agent.url, 51, row(1), model="capped", end=True)
    assert step(agent.url, 54, row(7), model="capped", start=True)["total"][0, 0] == 7
    too_many = 'edge_agent_sequence_refusals_total{cause="too_many",model="capped",version="1"}'
    assert metric(agent, too_many) == 1


def test_the_state_tensors_are_not_the_clients(agent: Daemon) -> None:
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(agent.url) as client:
        metadata = client.get_model_metadata("acc")
        assert [t.name for t in metadata.inputs] == ["x"]
        assert sorted(t.name for t in metadata.outputs) == ["corrid", "started", "total"]
        config = client.get_model_config("acc").config
        assert config.sequence_batching.state[0].input_name == "acc"
        assert not client.is_model_ready("nostate")
        index = {m.name: m for m in client.get_model_repository_index().models}
        assert "the model has no input 'ghost'" in index["nostate"].reason
        # A client that sends the state itself is told it is not an input.
        tensors = [grpcclient.InferInput(n, [1, WIDTH], "FP32") for n in ("x", "acc")]
        for tensor in tensors:
            tensor.set_data_from_numpy(row(1))
        status, message = triton_failure(
            lambda: client.infer("acc", tensors, sequence_id=61, sequence_start=True)
        )
        assert status == "StatusCode.INVALID_ARGUMENT" and "unknown input 'acc'" in message


class Recurrent:
    """The recurrent cell with its state carried by hand."""

    def __init__(self, repo: Path) -> None:
        self._session = ort.InferenceSession(str(repo / "rnn" / "1" / "model.onnx"))

    def run(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        h = np.zeros((1, 64), np.float32)
        answers = []
        for x in xs:
            y, h = self._session.run(["y", "h_out"], {"x": x, "h_in": h})
            answers.append(y)
        return answers


def test_concurrent_streams_batch_across_sequences(
    repo: Path, tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    """16 streams at once, each seeing its own state; while the first run is held (a failpoint),
    the other first requests queue, then run together: one batch of several sequences."""
    reference = Recurrent(repo)
    errors: queue.Queue[str] = queue.Queue()
    flag = tmp_path / "hold"
    flag.touch()
    agent = start_daemon(
        "--model-repository", str(repo), "--execution-providers", "cpu",
        env={ENVIRONMENT: f"{REQUEST_EXECUTING}:pause:{flag}"},
    ).wait_started()  # fmt: skip

    def stream(sequence: int) -> None:
        import tritonclient.grpc as grpcclient

        rng = np.random.default_rng(sequence)
        xs = [rng.standard_normal((1, 16)).astype(np.float32) for _ in range(12)]
        want = reference.run(xs)
        with grpcclient.InferenceServerClient(agent.url) as client:
            for i, x in enumerate(xs):
                tensor = grpcclient.InferInput("x", [1, 16], "FP32")
                tensor.set_data_from_numpy(x)
                try:
                    result = client.infer(
                        "rnn", [tensor], sequence_id=sequence,
                        sequence_start=i == 0, sequence_end=i == 11,
                    )  # fmt: skip
                except Exception as exc:
                    errors.put(repr(exc))
                    return
                check(sequence, i, result.as_numpy("y"), want[i])

    def check(sequence: int, i: int, got: Any, want: np.ndarray) -> None:
        if not np.allclose(got, want, rtol=1e-5, atol=1e-6):
            errors.put(f"sequence {sequence} step {i}: another sequence's state")

    threads = [threading.Thread(target=stream, args=(100 + n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    # A sequence begins as its first request is queued (nothing waits in between).
    live = 'edge_agent_sequences_live{model="rnn",version="1"}'
    wait_for(lambda: metric(agent, live) == 16, "16 first requests queued, the first run held")
    flag.unlink()
    for thread in threads:
        thread.join()
    assert errors.empty(), list(errors.queue)
    sizes = 'edge_agent_batch_size_bucket{le="4",model="rnn",version="1"}'
    executions = 'edge_agent_batch_size_count{model="rnn",version="1"}'
    # The 16 first requests ran in two executions at most (the held one, then all the others
    # at once): one of them took at least 8 sequences' rows.
    assert metric(agent, executions) - metric(agent, sizes) >= 1
    assert metric(agent, executions) < 16 * 12


def test_a_stream_is_a_natural_client(agent: Daemon) -> None:
    import tritonclient.grpc as grpcclient

    answers: queue.Queue[Any] = queue.Queue()
    with grpcclient.InferenceServerClient(agent.url) as client:
        client.start_stream(callback=lambda result, error: answers.put(error or result))
        for i in range(5):
            tensor = grpcclient.InferInput("x", [1, WIDTH], "FP32")
            tensor.set_data_from_numpy(row(i + 1))
            client.async_stream_infer(
                "acc", [tensor], sequence_id=71, sequence_start=i == 0, sequence_end=i == 4
            )
        got = [answers.get(timeout=30) for _ in range(5)]
        client.stop_stream()
    assert [float(g.as_numpy("total")[0, 0]) for g in got] == [1, 3, 6, 10, 15]


def test_sequences_on_the_sync_front_end(repo: Path, start_daemon: Callable[..., Daemon]) -> None:
    agent = start_daemon(
        "--model-repository", str(repo), "--execution-providers", "cpu", "--front-end", "sync"
    ).wait_started()  # fmt: skip
    totals = [step(agent.url, 81, row(2), start=i == 0, end=i == 3) for i in range(4)]
    assert [float(t["total"][0, 0]) for t in totals] == [2, 4, 6, 8]
    status, _ = triton_failure(lambda: step(agent.url, 81, row(1)))
    assert status == "StatusCode.INVALID_ARGUMENT"


SILERO_CONFIG = """max_batch_size: 0
sequence_batching {
  max_sequence_idle_microseconds: 10000000
  state [ { input_name: "state" output_name: "stateN" data_type: TYPE_FP32 dims: [ 2, 1, 128 ] } ]
}
"""


def test_silero_vad_streams_through_implicit_state(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    """Silero's voice-activity detector (its wheel's ONNX file, nobody on the team made it):
    a state input/output pair carried between 32 ms chunks of 16 kHz audio."""
    import tritonclient.grpc as grpcclient

    source = importlib.resources.files("silero_vad.data") / "silero_vad_16k_op15.onnx"
    repo = tmp_path / "repo"
    (repo / "vad" / "1").mkdir(parents=True)
    with importlib.resources.as_file(source) as path:
        shutil.copy(path, repo / "vad" / "1" / "model.onnx")
    (repo / "vad" / "config.pbtxt").write_text(SILERO_CONFIG)
    agent = start_daemon(
        "--model-repository", str(repo), "--execution-providers", "cpu"
    ).wait_started()  # fmt: skip
    # Half a second of silence, then a voiced tone with harmonics, then silence: 512 samples
    # a chunk.
    rate, chunk = 16000, 512
    t = np.arange(rate * 2) / rate
    voice = sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate((180, 360, 540, 720), 1))
    audio = np.where((t > 0.5) & (t < 1.5), 0.3 * voice, 0.001 * np.sin(2 * np.pi * 50 * t))
    chunks = [audio[i : i + chunk].astype(np.float32)[None, :] for i in range(0, len(t), chunk)]
    chunks = [c for c in chunks if c.shape[1] == chunk]
    session = ort.InferenceSession(str(repo / "vad" / "1" / "model.onnx"))
    state = np.zeros((2, 1, 128), np.float32)
    sr = np.array(rate, np.int64)
    expected = []
    for x in chunks:
        probability, state = session.run(
            ["output", "stateN"], {"input": x, "state": state, "sr": sr}
        )
        expected.append(probability)
    got = []
    with grpcclient.InferenceServerClient(agent.url) as client:
        assert [t.name for t in client.get_model_metadata("vad").inputs] == ["input", "sr"]
        for i, x in enumerate(chunks):
            audio_in = grpcclient.InferInput("input", list(x.shape), "FP32")
            audio_in.set_data_from_numpy(x)
            rate_in = grpcclient.InferInput("sr", [], "INT64")
            rate_in.set_data_from_numpy(sr)
            result = client.infer(
                "vad", [audio_in, rate_in], sequence_id="mic-1",
                sequence_start=i == 0, sequence_end=i == len(chunks) - 1,
            )  # fmt: skip
            got.append(result.as_numpy("output"))
    np.testing.assert_allclose(np.concatenate(got), np.concatenate(expected), rtol=1e-4, atol=1e-8)
    # The state mattered: run statelessly, the detector answers differently.
    fresh = [
        session.run(["output"], {"input": x, "state": np.zeros((2, 1, 128), np.float32), "sr": sr})[
            0
        ]
        for x in chunks
    ]
    assert not np.allclose(np.concatenate(fresh), np.concatenate(expected), rtol=1e-2, atol=0)
