"""Triton ensembles (platform "ensemble", ensemble_scheduling) through the real daemon, with
tritonclient over gRPC and HTTP: answers equal to chaining ONNX Runtime sessions here, load-time
faults named per ensemble, a step's error status kept, statistics per ensemble and per step,
shared memory, the sync front end, streams, and a step model hot-swapped under ensemble traffic."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

import modelgen
from conftest import Daemon, triton_failure, wait_for

WIDTH = 4
STEP_CONFIG = "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 200 }\n"
Maps = Mapping[str, str]
Step = tuple[str, Maps, Maps]


def step_text(model: str, inputs: Maps, outputs: Maps, version: int = -1) -> str:
    maps = "".join(f' input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items())
    maps += "".join(f' output_map {{ key: "{k}" value: "{v}" }}' for k, v in outputs.items())
    return f'{{ model_name: "{model}" model_version: {version}{maps} }}'


def tensors_text(kind: str, tensors: Mapping[str, str], dims: str) -> str:
    body = ", ".join(f'{{ name: "{n}" data_type: {t} dims: {dims} }}' for n, t in tensors.items())
    return f"{kind} [ {body} ]\n"


def write_ensemble(
    repo: Path,
    name: str,
    steps: Sequence[Step],
    inputs: Mapping[str, str] | None = None,
    outputs: Mapping[str, str] | None = None,
    dims: str = f"[{WIDTH}]",
) -> None:
    (repo / name / "1").mkdir(parents=True)  # an ensemble's version directory is empty
    text = f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: 8\n'
    text += tensors_text("input", inputs or {"IN": "TYPE_FP32"}, dims)
    text += tensors_text("output", outputs or {"OUT": "TYPE_FP32"}, f"[{WIDTH}]")
    text += "ensemble_scheduling { step [ " + ", ".join(step_text(*s) for s in steps) + " ] }\n"
    (repo / name / "config.pbtxt").write_text(text)


def write_step(repo: Path, name: str, make: Callable[[Path], Path]) -> None:
    make(repo / name / "1" / "model.onnx")
    (repo / name / "config.pbtxt").write_text(STEP_CONFIG)


XY = ("x", "y")
CHAIN: list[Step] = [
    ("pre", {"x": "IN"}, {"y": "t1"}),
    ("mid", {"x": "t1"}, {"y": "t2"}),
    ("post", {"x": "t2"}, {"y": "OUT"}),
]
# pre -> (mid, post) side by side -> join; the mid branch is an output too.
DAG: list[Step] = [
    ("pre", {"x": "IN"}, {"y": "t1"}),
    ("mid", {"x": "t1"}, {"y": "A"}),
    ("post", {"x": "t1"}, {"y": "B"}),
    ("join", {"a": "A", "b": "B"}, {"y": "OUT"}),
]


def build(repo: Path) -> Path:
    write_step(repo, "pre", lambda p: modelgen.affine(p, 2.0, 1.0))
    write_step(repo, "mid", lambda p: modelgen.dense(p, seed=1))
    write_step(repo, "post", lambda p: modelgen.affine(p, 0.5, -1.0))
    write_step(repo, "join", modelgen.join)
    write_ensemble(repo, "chain", CHAIN)
    write_ensemble(repo, "dag", DAG, outputs={"OUT": "TYPE_FP32", "A": "TYPE_FP32"})
    # Load-time faults: each ensemble is refused with its reason, its steps serve on.
    write_ensemble(repo, "missing", [("nosuch", {"x": "IN"}, {"y": "OUT"})])
    write_ensemble(
        repo,
        "unconnected",
        [("pre", {"x": "IN"}, {"y": "t1"}), ("post", {"x": "ghost"}, {"y": "OUT"})],
    )
    cycle: list[Step] = [
        ("join", {"a": "IN", "b": "t2"}, {"y": "t1"}),
        ("mid", {"x": "t1"}, {"y": "t2"}),
        ("post", {"x": "t1"}, {"y": "OUT"}),
    ]
    write_ensemble(repo, "cycle", cycle)
    write_ensemble(repo, "wrongtype", CHAIN, inputs={"IN": "TYPE_INT32"})
    # Looser than its first step: a request the ensemble takes and the step refuses.
    write_ensemble(repo, "loose", CHAIN, dims="[-1]")
    # An ensemble of an ensemble, named to load before the one it runs.
    write_ensemble(
        repo,
        "a_nested",
        [("chain", {"IN": "IN"}, {"OUT": "t"}), ("post", {"x": "t"}, {"y": "OUT"})],
    )
    return repo


class Reference:
    """The same pipelines with ONNX Runtime sessions chained by hand."""

    def __init__(self, repo: Path) -> None:
        self._sessions = {
            name: ort.InferenceSession(str(repo / name / "1" / "model.onnx"))
            for name in ("pre", "mid", "post", "join")
        }

    def run(self, name: str, **feeds: np.ndarray) -> np.ndarray:
        return np.asarray(self._sessions[name].run(None, feeds)[0])

    def chain(self, x: np.ndarray) -> np.ndarray:
        return self.run("post", x=self.run("mid", x=self.run("pre", x=x)))

    def dag(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t1 = self.run("pre", x=x)
        a = self.run("mid", x=t1)
        return self.run("join", a=a, b=self.run("post", x=t1)), a


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("ensembles"))


@pytest.fixture(scope="module")
def reference(repo: Path) -> Reference:
    return Reference(repo)


@pytest.fixture(scope="module")
def agent(repo: Path) -> Iterator[Daemon]:
    daemon = Daemon(
        ["--model-repository", str(repo), "--execution-providers", "cpu",
         "--http-address", "127.0.0.1:0", "--allow-shared-memory"]
    ).wait_started()  # fmt: skip
    yield daemon
    daemon.stop()


def http_url(agent: Daemon) -> str:
    return f"127.0.0.1:{agent.named('agent.started')[0]['http_port']}"


def grpc_infer(url: str, model: str, x: np.ndarray, outputs: tuple[str, ...] = ("OUT",)) -> Any:
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url) as client:
        tensor = grpcclient.InferInput("IN", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        wanted = [grpcclient.InferRequestedOutput(n) for n in outputs]
        return client.infer(model, [tensor], outputs=wanted)


def http_infer(url: str, model: str, x: np.ndarray, binary: bool = True) -> Any:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url)
    try:
        tensor = httpclient.InferInput("IN", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        return client.infer(model, [tensor])
    finally:
        client.close()


def sample(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, WIDTH)).astype(np.float32)


def test_a_chain_and_a_dag_answer_as_the_sessions_chained(
    agent: Daemon, reference: Reference
) -> None:
    for rows in (1, 3, 8):
        x = sample(rows, rows)
        chained = grpc_infer(agent.url, "chain", x).as_numpy("OUT")
        assert chained.shape == (rows, WIDTH)
        np.testing.assert_allclose(chained, reference.chain(x), rtol=1e-5, atol=1e-6)
        over_http = http_infer(http_url(agent), "chain", x).as_numpy("OUT")
        np.testing.assert_allclose(over_http, reference.chain(x), rtol=1e-5, atol=1e-6)
        json_http = http_infer(http_url(agent), "chain", x, binary=False).as_numpy("OUT")
        np.testing.assert_allclose(json_http, reference.chain(x), rtol=1e-5, atol=1e-6)
        out, a = reference.dag(x)
        result = grpc_infer(agent.url, "dag", x, ("OUT", "A"))
        np.testing.assert_allclose(result.as_numpy("OUT"), out, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result.as_numpy("A"), a, rtol=1e-5, atol=1e-6)


def test_concurrent_threads_each_get_their_own_answer(agent: Daemon, reference: Reference) -> None:
    errors: queue.Queue[str] = queue.Queue()

    def caller(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for i in range(15):
            x = sample(int(rng.integers(1, 9)), seed * 100 + i)
            model = ("chain", "dag")[i % 2]
            try:
                if seed % 2:
                    got = http_infer(http_url(agent), model, x).as_numpy("OUT")
                else:
                    got = grpc_infer(agent.url, model, x).as_numpy("OUT")
                want = reference.chain(x) if model == "chain" else reference.dag(x)[0]
                if not np.allclose(got, want, rtol=1e-5, atol=1e-6):
                    errors.put(f"{model} answered another request's result")
            except Exception as exc:
                errors.put(repr(exc))

    threads = [threading.Thread(target=caller, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors.empty(), list(errors.queue)


def test_an_ensemble_of_an_ensemble(agent: Daemon, reference: Reference) -> None:
    x = sample(3, 5)
    got = grpc_infer(agent.url, "a_nested", x).as_numpy("OUT")
    np.testing.assert_allclose(got, reference.run("post", x=reference.chain(x)), rtol=1e-5)


def test_metadata_and_config_are_the_ensembles_own(agent: Daemon) -> None:
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(agent.url) as client:
        metadata = client.get_model_metadata("dag")
        assert metadata.platform == "ensemble"
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
            ("IN", "FP32", [-1, WIDTH])
        ]
        assert sorted(t.name for t in metadata.outputs) == ["A", "OUT"]
        config = client.get_model_config("dag").config
        assert config.platform == "ensemble" and config.max_batch_size == 8
        steps = config.ensemble_scheduling.step
        assert [s.model_name for s in steps] == ["pre", "mid", "post", "join"]
        assert dict(steps[3].input_map) == {"a": "A", "b": "B"}
        assert client.is_model_ready("chain") and client.is_model_ready("dag")


def test_load_faults_are_reported_per_ensemble(agent: Daemon) -> None:
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(agent.url) as client:
        index = {m.name: m for m in client.get_model_repository_index().models}
        reasons = {
            "missing": "unknown model 'nosuch'",
            "unconnected": "'ghost'",
            "cycle": "form a cycle",
            "wrongtype": "is FP32, but ensemble tensor 'IN'",
        }
        for name, words in reasons.items():
            assert not client.is_model_ready(name)
            assert index[name].state == "UNAVAILABLE", index[name]
            assert words in index[name].reason, (name, index[name].reason)
        # Their step models serve on.
        for name in ("pre", "mid", "post", "join"):
            assert client.is_model_ready(name)
    status, message = triton_failure(lambda: grpc_infer(agent.url, "cycle", sample(1)))
    assert status == "StatusCode.UNAVAILABLE" and "cycle" in message


def test_a_steps_error_keeps_its_status(agent: Daemon) -> None:
    # The ensemble takes any width; its first step takes 4: the request's fault.
    x = np.ones((2, 3), np.float32)
    status, message = triton_failure(lambda: grpc_infer(agent.url, "loose", x))
    assert status == "StatusCode.INVALID_ARGUMENT", message
    assert "step 1 (model 'pre')" in message and "[2, 3]" in message
    status, message = triton_failure(lambda: http_infer(http_url(agent), "loose", x))
    assert status == "400", (status, message)
    # The ensemble's own checks come first: too many rows for its max_batch_size.
    status, _ = triton_failure(lambda: grpc_infer(agent.url, "chain", sample(9)))
    assert status == "StatusCode.INVALID_ARGUMENT"


def test_statistics_for_the_ensemble_and_each_step(agent: Daemon) -> None:
    import tritonclient.grpc as grpcclient

    def counts(client: Any, name: str) -> tuple[int, int, int]:
        stats = client.get_inference_statistics(name).model_stats[0]
        return (
            stats.inference_stats.success.count,
            stats.inference_stats.fail.count,
            (stats.inference_count),
        )

    with grpcclient.InferenceServerClient(agent.url) as client:
        before = {n: counts(client, n) for n in ("chain", "pre", "mid", "post", "loose")}
        for rows in (1, 2, 5):
            grpc_infer(agent.url, "chain", sample(rows))
        triton_failure(lambda: grpc_infer(agent.url, "loose", np.ones((1, 3), np.float32)))
        after = {n: counts(client, n) for n in before}
    assert after["chain"][0] - before["chain"][0] == 3
    assert after["chain"][2] - before["chain"][2] == 8  # inferences count rows
    for step in ("pre", "mid", "post"):
        assert after[step][0] - before[step][0] == 3, step
        assert after[step][2] - before[step][2] == 8, step
    assert after["loose"][1] - before["loose"][1] == 1  # the failed request, on the ensemble
    assert after["pre"][1] == before["pre"][1]  # refused before it reached the step model


def test_shared_memory_inputs_and_outputs_on_an_ensemble(
    agent: Daemon, reference: Reference
) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.utils.shared_memory as shm

    x = sample(3, 7)
    tag = os.getpid()
    size = x.nbytes
    inputs = shm.create_shared_memory_region("ens_in", f"/ea_ens_in_{tag}", size)
    outputs = shm.create_shared_memory_region("ens_out", f"/ea_ens_out_{tag}", size)
    try:
        shm.set_shared_memory_region(inputs, [x])
        with grpcclient.InferenceServerClient(agent.url) as client:
            client.register_system_shared_memory("ens_in", f"/ea_ens_in_{tag}", size)
            client.register_system_shared_memory("ens_out", f"/ea_ens_out_{tag}", size)
            tensor = grpcclient.InferInput("IN", list(x.shape), "FP32")
            tensor.set_shared_memory("ens_in", size)
            wanted = grpcclient.InferRequestedOutput("OUT")
            wanted.set_shared_memory("ens_out", size)
            client.infer("chain", [tensor], outputs=[wanted])
            written = shm.get_contents_as_numpy(outputs, np.float32, list(x.shape))
            np.testing.assert_allclose(written, reference.chain(x), rtol=1e-5, atol=1e-6)
            client.unregister_system_shared_memory()
    finally:
        shm.destroy_shared_memory_region(inputs)
        shm.destroy_shared_memory_region(outputs)


def stream(url: str, model: str, batches: list[np.ndarray]) -> list[Any]:
    """ModelStreamInfer: one request per batch on one stream, the answers in order."""
    import tritonclient.grpc as grpcclient

    answers: queue.Queue[Any] = queue.Queue()
    with grpcclient.InferenceServerClient(url) as client:
        client.start_stream(callback=lambda result, error: answers.put(error or result))
        for i, x in enumerate(batches):
            tensor = grpcclient.InferInput("IN", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            client.async_stream_infer(model, [tensor], request_id=str(i))
        got = [answers.get(timeout=30) for _ in batches]
        client.stop_stream()
    return got


def test_streams_and_the_sync_front_end(
    repo: Path, reference: Reference, start_daemon: Callable[..., Daemon]
) -> None:
    batches = [sample(rows, rows) for rows in (1, 4, 2)]
    sync = start_daemon(
        "--model-repository", str(repo), "--execution-providers", "cpu", "--front-end", "sync"
    ).wait_started()  # fmt: skip
    for url in (sync.url,):
        for x in batches:
            got = grpc_infer(url, "dag", x).as_numpy("OUT")
            np.testing.assert_allclose(got, reference.dag(x)[0], rtol=1e-5, atol=1e-6)
        answers = stream(url, "chain", batches)
        for x, answer in zip(batches, answers, strict=True):
            np.testing.assert_allclose(
                answer.as_numpy("OUT"), reference.chain(x), rtol=1e-5, atol=1e-6
            )
    status, _ = triton_failure(lambda: grpc_infer(sync.url, "loose", np.ones((1, 3), np.float32)))
    assert status == "StatusCode.INVALID_ARGUMENT"


def test_streams_on_the_asyncio_front_end(agent: Daemon, reference: Reference) -> None:
    batches = [sample(rows, rows + 10) for rows in (2, 1, 8, 3)]
    for x, answer in zip(batches, stream(agent.url, "dag", batches), strict=True):
        np.testing.assert_allclose(answer.as_numpy("OUT"), reference.dag(x)[0], rtol=1e-5)


def explicit_agent(repo: Path, start_daemon: Callable[..., Daemon], *load: str) -> Daemon:
    models = [arg for name in load for arg in ("--load-model", name)]
    return start_daemon(
        "--model-repository", str(repo), "--execution-providers", "cpu",
        "--model-control-mode", "explicit", *models,
    ).wait_started()  # fmt: skip


def test_an_ensemble_waits_for_its_steps_and_goes_with_them(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    import tritonclient.grpc as grpcclient

    repo = build(tmp_path / "repo")
    agent = explicit_agent(repo, start_daemon, "chain")
    with grpcclient.InferenceServerClient(agent.url) as client:
        assert not client.is_model_ready("chain")
        index = {m.name: m for m in client.get_model_repository_index().models}
        assert "step 1 (model 'pre') cannot serve" in index["chain"].reason
        for name in ("pre", "mid", "post"):
            client.load_model(name)
        # The last step to load brings the waiting ensemble in.
        assert client.is_model_ready("chain")
        grpc_infer(agent.url, "chain", sample(2))
        client.unload_model("mid", unload_dependents=True)
        wait_for(lambda: not client.is_model_ready("chain"), "the ensemble unloaded with it")
        assert client.is_model_ready("pre")


def test_a_step_swapped_under_ensemble_traffic_fails_no_request(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    import tritonclient.grpc as grpcclient

    repo = build(tmp_path / "repo")
    reference = Reference(repo)
    new_mid = modelgen.dense(tmp_path / "mid2.onnx", seed=2)
    new_sessions = ort.InferenceSession(str(new_mid))
    agent = explicit_agent(repo, start_daemon, "pre", "mid", "post", "chain")
    x = sample(4, 3)
    old = reference.chain(x)
    new = reference.run("post", x=new_sessions.run(None, {"x": reference.run("pre", x=x)})[0])
    assert not np.allclose(old, new)
    seen: queue.Queue[str] = queue.Queue()
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            try:
                got = grpc_infer(agent.url, "chain", x).as_numpy("OUT")
            except Exception as exc:
                seen.put(f"failed: {exc!r}")
                continue
            seen.put("old" if np.allclose(got, old, atol=1e-5) else
                     "new" if np.allclose(got, new, atol=1e-5) else "mixed")  # fmt: skip

    threads = [threading.Thread(target=traffic) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: seen.qsize() >= 20, "ensemble traffic before the swap")
        with grpcclient.InferenceServerClient(agent.url) as client:
            client.load_model("mid", files={"file:2/model.onnx": new_mid.read_bytes()})
        count = seen.qsize()
        wait_for(lambda: seen.qsize() >= count + 20, "ensemble traffic after the swap")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    outcomes = list(seen.queue)
    assert not [o for o in outcomes if o not in ("old", "new")], set(outcomes)
    assert outcomes[0] == "old" and outcomes[-1] == "new"


def test_an_ensemble_follows_its_steps_going_and_changing(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    """Checked again whenever a step model changes: unloaded (without unload_dependents) or
    swapped to a version with other tensors, the ensemble stops serving with the reason; the
    step back as it was, the ensemble serves again."""
    import tritonclient.grpc as grpcclient

    repo = build(tmp_path / "repo")
    agent = explicit_agent(repo, start_daemon, "pre", "mid", "post", "chain")

    def reason() -> str:
        with grpcclient.InferenceServerClient(agent.url) as client:
            index = {m.name: m for m in client.get_model_repository_index().models}
        return str(index["chain"].reason)

    with grpcclient.InferenceServerClient(agent.url) as client:
        assert client.is_model_ready("chain")
        client.unload_model("mid")
        assert not client.is_model_ready("chain")
        assert "step 2 (model 'mid') cannot serve" in reason()
        status, _ = triton_failure(lambda: grpc_infer(agent.url, "chain", sample(1)))
        assert status == "StatusCode.UNAVAILABLE"
        client.load_model("mid")
        assert client.is_model_ready("chain")
        grpc_infer(agent.url, "chain", sample(2))
        # A new version of a step whose input is named otherwise.
        renamed = modelgen.dense(tmp_path / "renamed.onnx", seed=4, names=("z", "y"))
        client.load_model("mid", files={"file:2/model.onnx": renamed.read_bytes()})
        assert client.is_model_ready("mid") and not client.is_model_ready("chain")
        assert "input_map names 'x', not an input of the model" in reason()
        same = modelgen.dense(tmp_path / "same.onnx", seed=5)
        client.load_model("mid", files={"file:3/model.onnx": same.read_bytes()})
        assert client.is_model_ready("chain")
