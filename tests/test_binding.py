"""How a session executes (runtime/binding.py): IOBinding gives the same answers as
`session.run` (checked here on the CPU provider, where it also runs), CUDA graphs are asked only
of the CUDA provider (refused with a warning elsewhere, the model still serving), and the model
parameters that choose them are checked."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import tritonclient.grpc as grpcclient

import modelgen
from conftest import Daemon
from edge_agent.runtime.binding import Runner, choose_io_binding

DIGITS = modelgen.SHIPPED / "digits" / "1" / "model.onnx"


def test_io_binding_answers_as_session_run(tmp_path: Path) -> None:
    session = ort.InferenceSession(str(DIGITS), providers=["CPUExecutionProvider"])
    plain = Runner(session, "cpu")
    bound = Runner(session, "cpu", io_binding=True)
    assert (plain.mode, bound.mode) == ("run", "io_binding")
    data = np.load(modelgen.SHIPPED / "digits" / "validation.npz")["input"]
    for rows in (1, 7, 64):
        feeds = {"input": data[:rows]}
        for got, want in zip(
            bound.run(["probabilities", "label"], feeds),
            plain.run(["probabilities", "label"], feeds),
            strict=True,
        ):
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got, want)
    # A non-contiguous input (a column slice) is copied, not misread.
    wide = np.ascontiguousarray(np.concatenate([data[:3], data[:3]], axis=1))[:, ::2]
    np.testing.assert_array_equal(
        bound.run(["label"], {"input": wide})[0], plain.run(["label"], {"input": wide})[0]
    )
    # Every datatype but strings (which are never bound) through one graph.
    model = onnx.load(str(modelgen.echo_all_types(tmp_path / "echo.onnx")))
    text = onnx.TensorProto.STRING
    keep = [i for i in model.graph.input if i.type.tensor_type.elem_type != text]
    out = [o for o in model.graph.output if o.type.tensor_type.elem_type != text]
    nodes = [n for n in model.graph.node if n.input[0] in {i.name for i in keep}]
    del model.graph.input[:], model.graph.output[:], model.graph.node[:]
    model.graph.input.extend(keep), model.graph.output.extend(out), model.graph.node.extend(nodes)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {
        i.name: (np.arange(6) % 2).astype(ort_dtype(i.type)).reshape(2, 3)
        for i in session.get_inputs()
    }
    names = [o.name for o in session.get_outputs()]
    assert len(names) >= 12
    for got, want in zip(
        Runner(session, "cpu", io_binding=True).run(names, feeds),
        session.run(names, feeds),
        strict=True,
    ):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def ort_dtype(ort_type: str) -> type:
    from edge_agent.runtime.binding import _ORT_TYPES

    return _ORT_TYPES[ort_type]  # type: ignore[no-any-return]


def test_cuda_graphs_only_with_the_cuda_provider() -> None:
    session = ort.InferenceSession(str(DIGITS), providers=["CPUExecutionProvider"])
    runner = Runner(session, "cpu", cuda_graph=True)
    assert runner.mode == "io_binding" and not runner.cuda_graph
    assert choose_io_binding("auto", "cuda", False) and not choose_io_binding("auto", "cpu", False)
    assert choose_io_binding("on", "cpu", False) and not choose_io_binding("off", "cuda", False)
    assert not choose_io_binding("on", "cuda", True)  # string tensors: never bound


def serve(start: Callable[..., Daemon], repo: Path, parameters: str) -> Daemon:
    modelgen.copy_shipped(repo)
    config = repo / "digits" / "config.pbtxt"
    config.write_text(config.read_text() + parameters)
    return start(
        "--model-repository", str(repo), "--execution-providers", "cpu"
    ).wait_started()  # fmt: skip


def parameter(key: str, value: str) -> str:
    return f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n'


def test_the_model_parameters_choose_the_execution(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = serve(
        start_daemon,
        tmp_path / "a",
        parameter("io_binding", "on") + parameter("cuda_graph", "true"),
    )
    (loaded,) = daemon.named("model.loaded")
    assert loaded["execution"] == "io_binding"
    (refused,) = daemon.named("model.cuda_graph_unavailable")
    assert "CUDA provider" in refused["reason"]
    data = np.load(modelgen.SHIPPED / "digits" / "validation.npz")["input"][:5]
    expected = ort.InferenceSession(str(DIGITS), providers=["CPUExecutionProvider"]).run(
        ["probabilities"], {"input": data}
    )[0]
    with grpcclient.InferenceServerClient(daemon.url) as client:
        tensor = grpcclient.InferInput("input", list(data.shape), "FP32")
        tensor.set_data_from_numpy(data)
        got = client.infer("digits", [tensor]).as_numpy("probabilities")
    np.testing.assert_array_equal(got, expected)
    default = serve(start_daemon, tmp_path / "b", "")
    assert default.named("model.loaded")[0]["execution"] == "run"  # auto on the CPU


def test_a_bad_io_binding_value_is_refused(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = serve(start_daemon, tmp_path, parameter("io_binding", "sometimes"))
    failed = daemon.named("model.load_failed")
    assert failed and "io_binding 'sometimes'" in failed[0]["reason"]
    with grpcclient.InferenceServerClient(daemon.url) as client:
        assert not client.is_model_ready("digits")


def test_a_swap_paces_its_warmup(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    """swap_warmup_pause_ms: the version loaded while another serves pauses between its warmup
    runs. Sleeps make it a lower bound, not a timing race."""
    modelgen.versioned(tmp_path / "m" / "1", 1)
    (tmp_path / "m" / "config.pbtxt").write_text("max_batch_size: 8\ndynamic_batching {}\n")
    daemon = start_daemon(
        "--model-repository", str(tmp_path), "--execution-providers", "cpu",
        "--model-control-mode", "explicit", "--load-model", "m",
        env={"EDGE_AGENT_SWAP_WARMUP_PAUSE_MS": "100"},
    ).wait_started()  # fmt: skip
    with grpcclient.InferenceServerClient(daemon.url) as client:
        modelgen.versioned(tmp_path / "m" / "2", 2)
        client.load_model("m")
    first, second = daemon.named("model.loaded")
    assert first["warmup_runs"] == second["warmup_runs"] == 8 + 2
    assert second["seconds"] >= second["warmup_runs"] * 0.1
