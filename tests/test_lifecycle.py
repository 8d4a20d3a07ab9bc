"""Model lifecycle through the real daemon: control modes, load / unload, inline pushes, swaps
under load (overlap and drain_first), failed loads and golden checks, safe polling, rollback.

The `versioned` test model answers a = b = its version number, with A in the graph and B in an
external-data file, so an answer with a == b == n came from one complete version n.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

import modelgen
from conftest import ROOT, Daemon, metric, wait_for

X = np.ones((1, 4), np.float32)
WAIT_S = 30.0


def answer(client: Any, model: str = "m") -> float:
    """The version that answered (a == b is checked: one complete version)."""
    inp = grpcclient.InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(X)
    result = client.infer(model, [inp])
    a, b = result.as_numpy("a"), result.as_numpy("b")
    assert np.array_equal(a, b), f"mixed versions: a={a} b={b}"
    assert np.all(a == a[0, 0])
    return float(a[0, 0])


def index(client: Any) -> dict[tuple[str, str], tuple[str, str]]:
    return {
        (m.name, m.version): (m.state, m.reason) for m in client.get_model_repository_index().models
    }


def metrics(daemon: Daemon) -> str:
    with urllib.request.urlopen(daemon.metrics_url, timeout=10) as response:
        return str(response.read().decode())


def health(daemon: Daemon, service: str) -> int:
    with grpc.insecure_channel(daemon.url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status)


def explicit(start_daemon: Any, repo: Path, *extra: str) -> Daemon:
    args = ["--model-repository", str(repo), "--model-control-mode", "explicit"]
    daemon: Daemon = start_daemon(*args, "--load-model", "*", *extra).wait_started()
    return daemon


def poll(start_daemon: Any, repo: Path) -> Daemon:
    """A daemon in poll mode, scanning every 0.1 s."""
    args = ["--model-repository", str(repo), "--model-control-mode", "poll"]
    daemon: Daemon = start_daemon(*args, "--repository-poll-secs", "0.1").wait_started()
    return daemon


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    modelgen.versioned(tmp_path / "m" / "1", 1)
    return tmp_path


# -- control modes and the RPCs ----------------------------------------------------------------


def test_explicit_mode_loads_only_what_is_asked(start_daemon: Any, repo: Path) -> None:
    modelgen.copy_shipped(repo)
    args = ["--model-repository", str(repo), "--model-control-mode", "explicit"]
    daemon = start_daemon(*args, "--load-model", "digits").wait_started()
    with grpcclient.InferenceServerClient(daemon.url) as client:
        assert client.is_model_ready("digits")
        assert not client.is_model_ready("m")
        assert index(client)[("m", "")] == ("UNAVAILABLE", "not loaded")
        client.load_model("m")
        assert client.is_model_ready("m")
        assert answer(client) == 1.0
        assert index(client)[("m", "1")] == ("READY", "")
        client.unload_model("m")
        assert not client.is_model_ready("m")
        state, reason = index(client)[("m", "1")]
        assert state == "UNAVAILABLE" and "unloaded" in reason
        with pytest.raises(InferenceServerException, match="UNAVAILABLE"):
            answer(client)
        with pytest.raises(InferenceServerException, match="no model 'nosuch'"):
            client.load_model("nosuch")
        with pytest.raises(InferenceServerException, match="not a plain directory name"):
            client.load_model("../etc")


def test_load_and_unload_refused_outside_explicit_mode(start_daemon: Any, repo: Path) -> None:
    for mode in ("none", "poll"):
        daemon = start_daemon(
            "--model-repository", str(repo), "--model-control-mode", mode
        ).wait_started()
        with grpcclient.InferenceServerClient(daemon.url) as client:
            for call in (client.load_model, client.unload_model):
                with pytest.raises(InferenceServerException, match="UNAVAILABLE") as info:
                    call("m")
                assert "explicit" in str(info.value)
            assert client.is_model_ready("m")
        daemon.stop()


def test_reload_after_new_version_on_disk_swaps(start_daemon: Any, repo: Path) -> None:
    daemon = explicit(start_daemon, repo)
    with grpcclient.InferenceServerClient(daemon.url) as client:
        modelgen.versioned(repo / "m" / "2", 2)
        client.load_model("m")
        assert answer(client) == 2.0
        models = index(client)
        assert models[("m", "2")] == ("READY", "")
        assert models[("m", "1")][0] == "UNAVAILABLE"  # latest-1 policy: v1 released
        # The same version rewritten in place is rebuilt and swapped too.
        modelgen.versioned(repo / "m" / "2", 7)
        client.load_model("m")
        assert answer(client) == 7.0
    swapped = daemon.named("model.swapped")
    assert [e["versions"] for e in swapped] == [[2], [2]]
    assert all(e["policy"] == "overlap" and e["pause_seconds"] == 0 for e in swapped)
    assert all(e["peak_rss_bytes"] > 0 for e in swapped)
    assert 'edge_agent_model_swaps_total{model="m",policy="overlap"} 2.0' in metrics(daemon)


# -- failures keep the old version serving ------------------------------------------------------


def test_failed_load_keeps_the_old_version_serving(start_daemon: Any, repo: Path) -> None:
    daemon = explicit(start_daemon, repo)
    (repo / "m" / "2").mkdir()
    (repo / "m" / "2" / "model.onnx").write_bytes(b"garbage, not a model")
    with grpcclient.InferenceServerClient(daemon.url) as client:
        with pytest.raises(InferenceServerException, match="INVALID_ARGUMENT") as info:
            client.load_model("m")
        assert "version 2" in str(info.value)
        assert answer(client) == 1.0
        models = index(client)
        assert models[("m", "1")] == ("READY", "")
        state, reason = models[("m", "2")]
        assert state == "UNAVAILABLE" and "not a readable ONNX model" in reason
    assert health(daemon, "m") == health_pb2.HealthCheckResponse.SERVING
    assert health(daemon, "m/1") == health_pb2.HealthCheckResponse.SERVING
    assert health(daemon, "m/2") == health_pb2.HealthCheckResponse.NOT_SERVING
    assert any(e.get("version") == 2 for e in daemon.named("model.load_failed"))
    assert 'edge_agent_model_load_failures_total{model="m"} 1.0' in metrics(daemon)


def test_failed_golden_check_keeps_the_old_version(start_daemon: Any, repo: Path) -> None:
    daemon = explicit(start_daemon, repo)
    modelgen.versioned(repo / "m" / "2", 2, golden=5)  # expects 5, answers 2
    with grpcclient.InferenceServerClient(daemon.url) as client:
        with pytest.raises(InferenceServerException, match="golden check failed"):
            client.load_model("m")
        assert answer(client) == 1.0
        assert index(client)[("m", "2")][0] == "UNAVAILABLE"
        modelgen.versioned(repo / "m" / "3", 3, golden=3)  # a passing golden check
        client.load_model("m")
        assert answer(client) == 3.0


def test_bad_config_on_reload_keeps_serving(start_daemon: Any, repo: Path) -> None:
    daemon = explicit(start_daemon, repo)
    (repo / "m" / "config.pbtxt").write_text("max_batch_size: banana\n")
    with grpcclient.InferenceServerClient(daemon.url) as client:
        with pytest.raises(InferenceServerException, match=r"config\.pbtxt is invalid"):
            client.load_model("m")
        assert answer(client) == 1.0


# -- inline pushes ------------------------------------------------------------------------------


def test_push_inline_files_installs_and_serves(
    start_daemon: Any, repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    daemon = explicit(start_daemon, repo)
    files = modelgen.versioned_files(4, tmp_path_factory.mktemp("push"))
    with grpcclient.InferenceServerClient(daemon.url) as client:
        config = json.dumps({"max_batch_size": 8, "dynamic_batching": {}})
        client.load_model("m", config=config, files={f"file:4/{k}": v for k, v in files.items()})
        assert answer(client) == 4.0
        assert client.get_model_config("m").config.max_batch_size == 8
        # Installed into the repository (config too), nothing left in staging.
        assert (repo / "m" / "4" / "weights.bin").read_bytes() == files["weights.bin"]
        assert "max_batch_size: 8" in (repo / "m" / "config.pbtxt").read_text()
        assert not any((repo / ".staging").glob("*"))
        # A brand-new model by push, without a config (completed from the graph).
        client.load_model("fresh", files={f"file:1/{k}": v for k, v in files.items()})
        assert answer(client, "fresh") == 4.0


def test_bad_pushes_are_refused_and_change_nothing(
    start_daemon: Any, repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    daemon = explicit(start_daemon, repo)
    files = modelgen.versioned_files(2, tmp_path_factory.mktemp("push"))
    before = sorted(str(p.relative_to(repo)) for p in repo.rglob("*"))
    with grpcclient.InferenceServerClient(daemon.url) as client:
        bad_names = ["file:2/../../escape.onnx", "file:x/model.onnx", "file:2/.hidden", "file:2"]
        for key in bad_names:
            with pytest.raises(InferenceServerException, match="INVALID_ARGUMENT"):
                client.load_model("m", files={key: b"data"})
        with pytest.raises(InferenceServerException, match="not a valid model config"):
            client.load_model("m", config="{not json")
        # A broken model is built in staging, refused, and never reaches the repository.
        broken = {"file:2/model.onnx": b"not onnx", "file:2/weights.bin": files["weights.bin"]}
        with pytest.raises(InferenceServerException, match="pushed files"):
            client.load_model("m", files=broken)
        assert answer(client) == 1.0
    after = sorted(str(p.relative_to(repo)) for p in repo.rglob("*"))
    assert [p for p in after if not p.startswith(".staging")] == before
    assert not (repo.parent / "escape.onnx").exists()


# -- unload and drain ---------------------------------------------------------------------------


def test_unload_lets_requests_in_flight_finish(start_daemon: Any, tmp_path: Path) -> None:
    modelgen.slow(tmp_path / "slow" / "1" / "model.onnx")
    daemon = explicit(start_daemon, tmp_path)
    results: list[Any] = []
    with grpcclient.InferenceServerClient(daemon.url) as client:
        inp = grpcclient.InferInput("x", [1, 512], "FP32")
        inp.set_data_from_numpy(np.ones((1, 512), np.float32))
        for _ in range(5):
            client.async_infer("slow", [inp], lambda result, error: results.append(error))
        # All five admitted (queued or running): a fifth still on its way when the unload began
        # would be refused, rightly (a wait for 3 or 4 queued raced it on a busy machine).
        wait_for(
            lambda: (
                metric(daemon, "nv_inference_pending_request_count", "slow")
                + metric(daemon, "edge_agent_requests_in_flight", "slow")
                == 5
            ),
            "five requests admitted on the slow model",
        )
        client.unload_model("slow")  # returns once the admitted requests are answered
        wait_for(lambda: len(results) == 5, "the client's callbacks")  # they run on its threads
        assert results == [None] * 5
        with pytest.raises(InferenceServerException, match="UNAVAILABLE"):
            client.infer("slow", [inp])


def _load_generator(url: str, stop: threading.Event, failures: list[str], seen: list[float]):
    def run() -> None:
        with grpcclient.InferenceServerClient(url) as client:
            last = 0.0
            while not stop.is_set():
                try:
                    value = answer(client)
                except (InferenceServerException, AssertionError) as exc:
                    failures.append(str(exc))
                    continue
                if value < last:
                    failures.append(f"went back from version {last} to {value}")
                last = value
                seen.append(value)

    return run


class Load:
    """`threads` clients inferring continuously until stopped."""

    def __init__(self, url: str, threads: int) -> None:
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.seen: list[float] = []
        run = _load_generator(url, self.stop, self.failures, self.seen)
        self.threads = [threading.Thread(target=run) for _ in range(threads)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        wait_for(lambda: len(self.seen) >= len(self.threads), "the first answers")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(WAIT_S)

    def answered(self, value: float, count: int) -> bool:
        """`count` answers from version `value` after the latest check."""
        return self.seen[-count:] == [value] * count if len(self.seen) >= count else False


def test_drain_first_swaps_under_load_without_errors(start_daemon: Any, repo: Path) -> None:
    (repo / "m" / "config.pbtxt").write_text(
        'parameters { key: "swap_policy" value { string_value: "drain_first" } }\n'
    )
    daemon = explicit(start_daemon, repo)
    with grpcclient.InferenceServerClient(daemon.url) as client, Load(daemon.url, 4) as load:
        for version in (2, 3, 4):
            modelgen.versioned(repo / "m" / str(version), version)
            client.load_model("m")
            wait_for(lambda v=version: load.answered(v, 4), f"answers from version {version}")
    assert load.failures == []
    swapped = daemon.named("model.swapped")
    assert [e["policy"] for e in swapped] == ["drain_first"] * 3
    assert all(e["pause_seconds"] > 0 for e in swapped)
    text = metrics(daemon)
    assert 'edge_agent_model_swaps_total{model="m",policy="drain_first"} 3.0' in text
    assert 'edge_agent_model_swap_pause_seconds{model="m"}' in text


def test_drain_first_failure_restores_the_old_version(start_daemon: Any, repo: Path) -> None:
    daemon = explicit(start_daemon, repo, "--swap-policy", "drain_first")
    (repo / "m" / "2").mkdir()
    (repo / "m" / "2" / "model.onnx").write_bytes(b"garbage")
    with grpcclient.InferenceServerClient(daemon.url) as client:
        with pytest.raises(InferenceServerException, match="version 2"):
            client.load_model("m")
        assert answer(client) == 1.0
        assert index(client)[("m", "1")] == ("READY", "")
    assert daemon.named("model.swap_restoring")
    # Requests paused, but nothing was swapped: reported as such, not counted as a swap.
    (restored,) = daemon.named("model.swap_restored")
    assert restored["versions"] == restored["versions_before"] == [1]
    assert restored["pause_seconds"] > 0
    assert daemon.named("model.swapped") == []
    assert "edge_agent_model_swaps_total{" not in metrics(daemon)


def test_an_invalid_swap_policy_is_a_recorded_load_failure(start_daemon: Any, repo: Path) -> None:
    daemon = explicit(start_daemon, repo)
    (repo / "m" / "config.pbtxt").write_text(
        'parameters { key: "swap_policy" value { string_value: "sideways" } }\n'
    )
    with grpcclient.InferenceServerClient(daemon.url) as client:
        with pytest.raises(InferenceServerException, match="swap_policy 'sideways'"):
            client.load_model("m")
        assert answer(client) == 1.0  # the serving version stays
        state, reason = index(client)[("m", "")]
        assert state == "UNAVAILABLE" and "swap_policy 'sideways'" in reason
    assert 'edge_agent_model_load_failures_total{model="m"} 1.0' in metrics(daemon)


# -- the soak: 8 clients, 20 swaps by RPC and 20 by poll, zero failures -------------------------

SWAPS = 20


def test_soak_swaps_through_repository_model_load(
    start_daemon: Any, repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    daemon = explicit(start_daemon, repo)
    staging = tmp_path_factory.mktemp("push")
    with grpcclient.InferenceServerClient(daemon.url) as client, Load(daemon.url, 8) as load:
        for version in range(2, 2 + SWAPS):
            if version % 2:  # half written to disk then loaded, half pushed inline
                modelgen.versioned(repo / "m" / str(version), version)
                client.load_model("m")
            else:
                files = modelgen.versioned_files(version, staging / str(version))
                client.load_model("m", files={f"file:{version}/{k}": v for k, v in files.items()})
            wait_for(lambda v=version: load.answered(v, 8), f"answers from version {version}")
    assert load.failures == []
    assert load.seen[-1] == 1 + SWAPS
    assert len(daemon.named("model.swapped")) == SWAPS


def test_soak_swaps_through_poll_mode(start_daemon: Any, repo: Path) -> None:
    daemon = poll(start_daemon, repo)
    with Load(daemon.url, 8) as load:
        for version in range(2, 2 + SWAPS):
            modelgen.versioned(repo / "m" / str(version), version)  # written in place
            wait_for(lambda v=version: load.answered(v, 8), f"answers from version {version}")
    assert load.failures == []
    assert load.seen[-1] == 1 + SWAPS
    assert len(daemon.named("model.swapped")) == SWAPS


# -- safe polling -------------------------------------------------------------------------------


def test_poll_never_loads_a_half_written_version(start_daemon: Any, repo: Path) -> None:
    modelgen.echo(repo / "other" / "1" / "model.onnx")
    daemon = poll(start_daemon, repo)
    complete = modelgen.versioned(repo.parent / "complete" / "2", 2).parent
    target = repo / "m" / "2"
    target.mkdir()
    model = (complete / "model.onnx").read_bytes()
    with grpcclient.InferenceServerClient(daemon.url) as client:
        # A copy in progress: the graph half written, its weights not yet there.
        with open(target / "model.onnx", "wb") as f:
            f.write(model[: len(model) // 2])
            f.flush()
            wait_for(
                lambda: (
                    any(e.get("model") == "m" for e in daemon.named("repository.change_pending"))
                    or daemon.named("model.load_failed")
                ),
                "the poll to see the partial version",
            )
            assert answer(client) == 1.0
            # A broken model beside it does not stop polling for the others.
            (repo / "other" / "2").mkdir()
            (repo / "other" / "2" / "model.onnx").write_bytes(b"broken")
            time.sleep(0.5)  # several polls while the copy is stalled half way
            assert answer(client) == 1.0
            assert index(client)[("m", "2")][0] != "READY"
            f.write(model[len(model) // 2 :])
        (target / "weights.bin").write_bytes((complete / "weights.bin").read_bytes())
        wait_for(lambda: answer(client) == 2.0, "version 2 once complete")
        assert index(client)[("other", "1")] == ("READY", "")
    loaded = [e for e in daemon.named("model.loaded") if e.get("model") == "m"]
    assert [e["version"] for e in loaded] == [1, 2]


def test_poll_loads_new_and_unloads_removed_models(start_daemon: Any, repo: Path) -> None:
    daemon = poll(start_daemon, repo)
    with grpcclient.InferenceServerClient(daemon.url) as client:
        modelgen.versioned(repo / "n" / "1", 9)
        wait_for(lambda: client.is_model_ready("n"), "the new model")
        assert answer(client, "n") == 9.0
        shutil.rmtree(repo / "n")
        wait_for(lambda: not client.is_model_ready("n"), "the removed model to unload")
        assert ("n", "1") not in index(client)


# -- rollback -----------------------------------------------------------------------------------


def models_cli(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", "models", *args, "--url", daemon.url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_rollback_through_the_cli_and_its_persistence(
    start_daemon: Any, repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    state = tmp_path_factory.mktemp("state")
    modelgen.versioned(repo / "m" / "2", 2)
    daemon = explicit(start_daemon, repo, "--state-dir", str(state))
    with grpcclient.InferenceServerClient(daemon.url) as client:
        assert answer(client) == 2.0
        done = models_cli(daemon, "rollback", "--model", "m")
        assert done.returncode == 0, done.stderr
        assert answer(client) == 1.0
        assert index(client)[("m", "2")] == ("UNAVAILABLE", "rolled back")
        again = models_cli(daemon, "rollback", "--model", "m")
        assert again.returncode == 1 and "FAILED_PRECONDITION" in again.stderr
        listing = models_cli(daemon, "list")
        assert "m\t1\tREADY" in listing.stdout
    daemon.stop()
    # The rollback survives a restart (--state-dir) ...
    daemon = explicit(start_daemon, repo, "--state-dir", str(state))
    with grpcclient.InferenceServerClient(daemon.url) as client:
        assert answer(client) == 1.0
        # ... until an explicit load asks for the model's versions again.
        client.load_model("m")
        assert answer(client) == 2.0


def test_rollback_is_served_in_poll_mode_and_a_newer_version_supersedes_it(
    start_daemon: Any, repo: Path
) -> None:
    modelgen.versioned(repo / "m" / "2", 2)
    daemon = poll(start_daemon, repo)
    with grpcclient.InferenceServerClient(daemon.url) as client:
        assert answer(client) == 2.0
        assert models_cli(daemon, "rollback", "--model", "m").returncode == 0
        assert answer(client) == 1.0
        modelgen.versioned(repo / "m" / "3", 3)
        wait_for(lambda: answer(client) == 3.0, "the newer version")


def test_models_cli_errors(start_daemon: Any, repo: Path) -> None:
    daemon = explicit(start_daemon, repo)
    missing = models_cli(daemon, "load")
    assert missing.returncode == 2 and "--model is required" in missing.stderr
    bad_file = models_cli(daemon, "load", "--model", "m", "--file", "2/model.onnx=/nonexistent")
    assert bad_file.returncode == 2 and "nonexistent" in bad_file.stderr
    loaded = models_cli(daemon, "load", "--model", "m")
    assert loaded.returncode == 0 and "load: m: done" in loaded.stdout


# -- warmup -------------------------------------------------------------------------------------

WARMUP_CONFIG = """
max_batch_size: 8
model_warmup [
  {
    name: "from_file"
    batch_size: 2
    count: 2
    inputs { key: "x" value { data_type: TYPE_FP32 dims: [4] input_data_file: "%s" } }
  },
  {
    name: "random"
    batch_size: 8
    inputs { key: "x" value { data_type: TYPE_FP32 dims: [4] random_data: true } }
  }
]
"""


def test_every_batch_size_and_model_warmup_run_before_serving(
    start_daemon: Any, repo: Path
) -> None:
    (repo / "m" / "config.pbtxt").write_text(WARMUP_CONFIG % "x.bin")
    (repo / "m" / "warmup").mkdir()
    (repo / "m" / "warmup" / "x.bin").write_bytes(np.ones(4, np.float32).tobytes())
    daemon = explicit(start_daemon, repo)
    (loaded,) = daemon.named("model.loaded")
    # Batch sizes 1..8 once, the largest twice more (timed), then 2 + 1 model_warmup runs.
    assert loaded["warmup_runs"] == 8 + 2 + 3
    with grpcclient.InferenceServerClient(daemon.url) as client:
        assert answer(client) == 1.0


@pytest.mark.parametrize(
    ("file_name", "content", "reason"),
    [
        ("x.bin", np.ones(3, np.float32).tobytes(), "needs 16 bytes"),
        ("../config.pbtxt", b"", "must be a plain path"),
        ("absent.bin", b"", "is missing"),
    ],
)
def test_bad_model_warmup_is_a_load_failure(
    start_daemon: Any, repo: Path, file_name: str, content: bytes, reason: str
) -> None:
    (repo / "m" / "config.pbtxt").write_text(WARMUP_CONFIG % file_name)
    (repo / "m" / "warmup").mkdir()
    (repo / "m" / "warmup" / "x.bin").write_bytes(content)
    daemon = explicit(start_daemon, repo)
    with grpcclient.InferenceServerClient(daemon.url) as client:
        state, message = index(client)[("m", "1")]
        assert state == "UNAVAILABLE"
        assert "model_warmup 'from_file'" in message and reason in message


def test_config_parameter_applies_until_the_next_plain_load(start_daemon: Any, repo: Path) -> None:
    daemon = explicit(start_daemon, repo)
    with grpcclient.InferenceServerClient(daemon.url) as client:
        client.load_model("m", config=json.dumps({"max_batch_size": 2, "dynamic_batching": {}}))
        assert client.get_model_config("m").config.max_batch_size == 2
        assert not (repo / "m" / "config.pbtxt").exists()  # not written without files
        assert answer(client) == 1.0
        client.load_model("m")
        assert client.get_model_config("m").config.max_batch_size == 32  # autocompleted
        with pytest.raises(InferenceServerException, match="names model 'other'"):
            client.load_model("m", config=json.dumps({"name": "other"}))


def test_a_load_whose_caller_gives_up_still_completes(start_daemon: Any, repo: Path) -> None:
    """A client deadline on RepositoryModelLoad must not leave a swap half done (with
    drain_first the old version is already gone by then)."""
    (repo / "m" / "config.pbtxt").write_text(
        "max_batch_size: 8\n"
        'parameters { key: "swap_policy" value { string_value: "drain_first" } }\n'
        'model_warmup [ { name: "long" batch_size: 1 count: 20000\n'
        '  inputs { key: "x" value { data_type: TYPE_FP32 dims: [4] zero_data: true } } } ]\n'
    )
    daemon = explicit(start_daemon, repo)
    modelgen.versioned(repo / "m" / "2", 2)
    with grpcclient.InferenceServerClient(daemon.url) as client:
        with pytest.raises(InferenceServerException, match="Deadline"):
            client.load_model("m", client_timeout=0.05)
        wait_for(lambda: daemon.named("model.swapped"), "the swap to finish anyway")
        assert answer(client) == 2.0
        assert index(client)[("m", "2")] == ("READY", "")
