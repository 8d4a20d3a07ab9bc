"""The daemon as a system service: the systemd notify protocol under a test-made NOTIFY_SOCKET,
SIGTERM drain, a forced second signal, SIGHUP reloads, and the unit file."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import modelgen
from conftest import ROOT, Daemon, held_daemon, metric, wait_for


class NotifySocket:
    """A datagram socket standing in for systemd's; collects what the daemon sends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._stop = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def with_key(self, key: str) -> list[dict[str, str]]:
        return [m for _, m in list(self.messages) if key in m]

    def close(self) -> None:
        self._stop = True
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


IMAGE = np.full((1, 64), 8.0, np.float32)


def in_flight(daemon: Daemon, model: str) -> float:
    return metric(daemon, "edge_agent_requests_in_flight", model)


def infer_in_background(
    daemon: Daemon, transport: str = "grpc"
) -> tuple[threading.Thread, list[object]]:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    result: list[object] = []

    def call() -> None:
        client: Any
        tensor: Any
        if transport == "http":
            url = f"127.0.0.1:{daemon.named('agent.started')[0]['http_port']}"
            client = httpclient.InferenceServerClient(url, network_timeout=300)
            tensor = httpclient.InferInput("input", [1, 64], "FP32")
            timeout = {}
        else:
            client = grpcclient.InferenceServerClient(daemon.url)
            tensor = grpcclient.InferInput("input", [1, 64], "FP32")
            timeout = {"client_timeout": 300}
        with client:
            tensor.set_data_from_numpy(IMAGE)
            try:
                answer = client.infer("digits", [tensor], **timeout)
                result.append(answer.as_numpy("label"))
            except Exception as exc:
                result.append(exc)
            result.append(time.monotonic())  # when the answer came

    thread = threading.Thread(target=call)
    thread.start()
    return thread, result


def test_notify_ready_watchdog_stopping(
    notify: NotifySocket, start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    import tritonclient.grpc as grpcclient

    daemon = start_daemon(
        "--model-repository",
        str(ROOT / "models"),
        "--execution-providers",
        "cpu",
        env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "300000"},
    )
    ready = wait_for(lambda: notify.with_key("READY"), "READY=1")
    daemon.wait_started()
    assert ready[0]["READY"] == "1" and ready[0]["STATUS"].startswith("serving 1 model on ")
    # READY came only once the agent could serve: nothing before it claimed readiness, and the
    # listener answers now.
    with grpcclient.InferenceServerClient(daemon.url) as client:
        assert client.is_server_ready() and client.is_model_ready("digits")
    first_ready = next(t for t, m in notify.messages if "READY" in m)
    wait_for(lambda: len(notify.with_key("WATCHDOG")) >= 4, "WATCHDOG=1 again and again")
    beats = [t for t, m in notify.messages if "WATCHDOG" in m]
    assert beats[0] >= first_ready  # the watchdog starts with the service
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(30) == 0
    stopping = notify.with_key("STOPPING")
    assert len(stopping) == 1 and stopping[0]["STOPPING"] == "1"  # said once


def test_no_notify_socket_is_a_no_op(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon(
        "--model-repository",
        str(ROOT / "models"),
        "--execution-providers",
        "cpu",
        env={"NOTIFY_SOCKET": ""},
    ).wait_started()
    assert not daemon.named("systemd.notify_failed")
    assert daemon.stop() == 0


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_sigterm_lets_an_in_flight_request_finish(
    tmp_path: Path, start_daemon: Callable[..., Daemon], transport: str
) -> None:
    # Deterministic on any machine: the request is held mid-execution across the signal and let
    # go only once the drain has begun (a slow model raced its client's deadline on a busy one).
    daemon, flag = held_daemon(tmp_path, start_daemon)
    thread, result = infer_in_background(daemon, transport)
    wait_for(lambda: Path(f"{flag}.reached").exists(), "the request executing")
    assert in_flight(daemon, "digits") == 1
    daemon.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: daemon.named("agent.stopping"), "the drain to begin")
    time.sleep(0.5)  # the drain goes on (server stop, the grace clock) with the request held
    assert daemon.proc.poll() is None and not result
    released = time.monotonic()
    flag.unlink()
    thread.join(120)
    assert daemon.proc.wait(120) == 0
    answer, answered = result
    assert isinstance(answer, np.ndarray), str(answer)  # tritonclient's repr drops the message
    assert answer.tolist() == digits_label(IMAGE)  # the model's answer, not an error
    assert answered > released  # answered in the drain, after it ran
    assert daemon.named("agent.stopped")


def digits_label(image: np.ndarray) -> list[int]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(ROOT / "models" / "digits" / "1" / "model.onnx"))
    return [int(v) for v in session.run(["label"], {"input": image})[0]]


def test_the_grace_bounds_a_drain(tmp_path: Path, start_daemon: Callable[..., Daemon]) -> None:
    # A run longer than the grace: the agent stops when the grace is over, without waiting for the
    # run, and the caller is told (not left waiting on a closed connection).
    daemon, flag = held_daemon(tmp_path, start_daemon, EDGE_AGENT_SHUTDOWN_GRACE_SECONDS="1")
    thread, result = infer_in_background(daemon)
    wait_for(lambda: Path(f"{flag}.reached").exists(), "the request executing")
    daemon.proc.send_signal(signal.SIGTERM)
    try:
        assert daemon.proc.wait(120) == 0  # the run is still held
        thread.join(120)
        answer, _ = result
        assert "UNAVAILABLE" in str(answer)  # told, not left waiting
        assert daemon.named("agent.runs_abandoned")[0]["running"] == 1
        assert daemon.named("agent.stopped")
    finally:
        flag.unlink()


def test_a_second_signal_forces_exit(tmp_path: Path, start_daemon: Callable[..., Daemon]) -> None:
    daemon, flag = held_daemon(tmp_path, start_daemon)
    threads = [infer_in_background(daemon)[0] for _ in range(3)]  # one held, two queued
    wait_for(lambda: Path(f"{flag}.reached").exists(), "a request executing")
    daemon.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: daemon.named("agent.stopping"), "the drain to begin")
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(30) == 1  # EXIT_FORCED, without waiting for the held run or the queue
    assert daemon.named("agent.forced_exit") and not daemon.named("agent.stopped")
    flag.unlink()
    for t in threads:
        t.join(60)


def unknown_model_failures(daemon: Daemon) -> int:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    with grpcclient.InferenceServerClient(daemon.url) as client:
        tensor = grpcclient.InferInput("input", [1, 64], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, 64), np.float32))
        with pytest.raises(InferenceServerException):
            client.infer("no-such-model", [tensor])
    time.sleep(0.3)  # let the log line arrive
    return len(daemon.named("request.failed"))


def test_sighup_reloads_the_log_level_and_reports_what_needs_a_restart(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "models", repo)
    config = tmp_path / "config.toml"
    config.write_text(f'model_repository = "{repo}"\nexecution_providers = ["cpu"]\n')
    daemon = start_daemon("--config", str(config)).wait_started()
    assert unknown_model_failures(daemon) == 1  # a warning, logged at level info

    config.write_text(
        f'model_repository = "{repo}"\nexecution_providers = ["cpu"]\nlog_level = "error"\n'
        "max_message_bytes = 1048576\n"
    )
    daemon.proc.send_signal(signal.SIGHUP)
    reloaded = wait_for(lambda: daemon.named("config.reloaded"), "the reload")
    assert reloaded[0]["applied"] == ["log_level"]
    assert reloaded[0]["needs_restart"] == ["max_message_bytes"]
    assert unknown_model_failures(daemon) == 1  # warnings are no longer logged

    config.write_text("this is not toml ==")
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: daemon.named("config.reload_failed"), "the failed reload (an error)")
    config.write_text(f'model_repository = "{repo}"\nexecution_providers = ["cpu"]\n')
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: unknown_model_failures(daemon) > 1, "warnings logged again")
    assert daemon.proc.poll() is None and daemon.stop() == 0


def test_sighup_picks_up_a_new_model(tmp_path: Path, start_daemon: Callable[..., Daemon]) -> None:
    import tritonclient.grpc as grpcclient

    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "models", repo)
    daemon = start_daemon(
        "--model-repository", str(repo), "--execution-providers", "cpu"
    ).wait_started()
    modelgen.echo(repo / "echo" / "1" / "model.onnx")
    daemon.proc.send_signal(signal.SIGHUP)
    with grpcclient.InferenceServerClient(daemon.url) as client:
        wait_for(lambda: client.is_model_ready("echo"), "the new model after SIGHUP")
        assert client.is_model_ready("digits")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
@pytest.mark.parametrize("unit", ["edge-agent.service", "edge-agent-control-plane.service"])
def test_the_unit_files_verify(unit: str) -> None:
    done = subprocess.run(
        ["systemd-analyze", "verify", str(ROOT / "systemd" / unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert unit not in done.stderr, done.stderr  # no warnings about our unit
    assert "LimitNOFILE=65536" in (ROOT / "systemd" / unit).read_text()
