"""Fixtures: model repositories built by the tests, and the real daemon in a subprocess.

The daemon runs as `python -m edge_agent serve` on port 0 and is driven with stock tritonclient.
It must be a separate process anyway: our generated stubs and tritonclient's both register the
`inference.*` protobuf names, which one process cannot hold twice (edge_agent/_proto).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import onnx
import pytest

import modelgen
from edge_agent.common.failpoints import ENVIRONMENT, REQUEST_EXECUTING

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 90


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    """Poll until predicate() is truthy and return its value (a bound on waiting, not a timing
    assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Daemon:
    """`edge-agent serve` in a subprocess; its JSON log lines are parsed as they arrive."""

    STARTED = "agent.started"

    def __init__(
        self,
        args: list[str],
        env: dict[str, str] | None = None,
        address: bool = True,
        preexec: Callable[[], None] | None = None,
    ):
        command = [sys.executable, "-m", "edge_agent", *self.command(), "--log-format", "json"]
        # The lifecycle tests drive load / unload over the inference listener, as Triton's
        # clients do; tests/test_security.py checks the default, which refuses that.
        env = {"EDGE_AGENT_CONTROL_ON_INFERENCE_LISTENER": "true", **(env or {})}
        command += args
        if address:
            command += self.address_args()
        self.events: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        self._started = threading.Event()
        self.proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=preexec,
        )
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = {"event": "unparsed", "line": line}
            self.events.append(event)
            if event.get("event") == self.STARTED:
                self._started.set()
        self._started.set()  # the process ended: wake any waiter

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def wait_started(self) -> Daemon:
        if not self._started.wait(START_TIMEOUT_S) or self.port is None:
            self.stop()
            raise AssertionError(
                f"daemon did not start (rc={self.proc.returncode}):\n"
                + "".join(self.stderr[-30:])
                + "\n".join(map(str, self.events[-30:]))
            )
        return self

    def command(self) -> list[str]:
        return ["serve"]

    def address_args(self) -> list[str]:
        return [
            "--grpc-address",
            "127.0.0.1:0",
            "--metrics-address",
            "127.0.0.1:0",
            "--control-address",
            "127.0.0.1:0",
        ]

    @property
    def port(self) -> int | None:
        started = self.named(self.STARTED)
        return int(started[0]["port"]) if started else None

    @property
    def control_url(self) -> str:
        return f"127.0.0.1:{self.named(self.STARTED)[0]['control_port']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.named('agent.started')[0]['metrics_port']}/metrics"

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if e.get("event") == event]

    def stop(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class ControlPlaneProcess(Daemon):
    """`edge-agent control-plane serve` in a subprocess (args: --data-dir DIR ...)."""

    STARTED = "controlplane.started"

    def command(self) -> list[str]:
        return ["control-plane", "serve"]

    def address_args(self) -> list[str]:
        return ["--address", "127.0.0.1:0"]


class Daemons:
    """Daemons started for one test (or one benchmark), all stopped at its end."""

    def __init__(self) -> None:
        self._started: list[Daemon] = []

    def start(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        address: bool = True,
        kind: type[Daemon] = Daemon,
        preexec: Callable[[], None] | None = None,
    ) -> Daemon:
        daemon = kind(list(args), env, address, preexec)
        self._started.append(daemon)
        return daemon

    def stop_all(self) -> None:
        for daemon in self._started:
            daemon.stop()


@pytest.fixture
def start_daemon() -> Iterator[Any]:
    daemons = Daemons()
    yield daemons.start
    daemons.stop_all()


def build_repository(repo: Path) -> Path:
    """The shared test repository: working models beside broken ones."""
    modelgen.copy_shipped(repo)
    modelgen.echo_all_types(repo / "alltypes" / "1" / "model.onnx")
    modelgen.add_fixed(repo / "fixed" / "1" / "model.onnx")
    modelgen.add_fixed(repo / "fixed" / "2" / "model.onnx")  # default policy: latest 1 -> v2 only
    modelgen.echo(repo / "echo" / "1" / "model.onnx")
    modelgen.echo(repo / "echo" / "2" / "model.onnx")
    (repo / "echo" / "config.pbtxt").write_text("version_policy: { all: {} }\n")
    modelgen.echo(repo / "int8" / "1" / "model.onnx", onnx.TensorProto.INT8)
    modelgen.echo(repo / "text" / "1" / "model.onnx", onnx.TensorProto.STRING)
    modelgen.matmul_external(repo / "external" / "1")
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"this is not an onnx model")
    evil = modelgen.matmul_external(repo / "evil" / "1")
    modelgen.set_external_location(evil, "../../external/1/weights.bin")
    mismatch = repo / "mismatch"
    modelgen.add_fixed(mismatch / "1" / "model.onnx")
    (mismatch / "config.pbtxt").write_text(
        'name: "mismatch"\ninput [ { name: "x", data_type: TYPE_INT32, dims: [2, 3] } ]\n'
    )
    return repo


@pytest.fixture(scope="session")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="session")
def server(repository: Path) -> Iterator[Daemon]:
    """One daemon for the read-only tests, serving the shared repository."""
    # The CPU path, also on a machine with a GPU (tests/test_gpu.py covers CUDA).
    daemon = Daemon(
        ["--model-repository", str(repository), "--execution-providers", "cpu"]
    ).wait_started()
    yield daemon
    daemon.stop()


@pytest.fixture
def client(server: Daemon) -> Iterator[Any]:
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(server.url) as c:
        yield c


@pytest.fixture(scope="session")
def scale_services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """PostgreSQL and SeaweedFS for this session (tests/services.py): started on first use,
    stopped at the end."""
    import services

    root = tmp_path_factory.mktemp("services")
    with services.postgres() as pg, services.seaweedfs(root / "s3") as s3:
        yield pg, s3


def held_daemon(
    tmp_path: Path, start_daemon: Callable[..., Daemon], queue: int = 256, **env: str
) -> tuple[Daemon, Path]:
    """The shipped model on a thread (never inline: a held run must not hold the event loop),
    with every run held at its start while the returned flag file exists (common/failpoints.py).
    The test decides when a request finishes, whatever the machine's speed. `queue`: the model's
    max_queue_size."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "models", repo)
    config = repo / "digits" / "config.pbtxt"
    config.write_text(
        config.read_text().replace("max_queue_size: 256", f"max_queue_size: {queue}")
        + 'parameters { key: "execution_inline" value { string_value: "false" } }\n'
    )
    flag = tmp_path / "hold"
    flag.touch()
    daemon = start_daemon(
        "--model-repository", str(repo), "--execution-providers", "cpu",
        "--http-address", "127.0.0.1:0",
        env={ENVIRONMENT: f"{REQUEST_EXECUTING}:pause:{flag}", **env},
    ).wait_started()  # fmt: skip
    return daemon, flag


def triton_failure(call: Callable[[], Any]) -> tuple[str, str]:
    """(status, message) of the InferenceServerException a tritonclient call raises."""
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as failed:
        call()
    return str(failed.value.status()), str(failed.value.message())


def metric(daemon: Daemon, name: str, model: str | None = None) -> float:
    """A metric of the daemon's /metrics (`name` may carry its labels), summed over its series;
    with `model`, over that model's series only."""
    text = urllib.request.urlopen(daemon.metrics_url, timeout=10).read().decode()
    prefixes = (f'{name}{{model="{model}",',) if model else (name + " ", name + "{")
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefixes)
    )
