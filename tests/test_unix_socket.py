"""The inference listener on a unix socket, beside TCP."""

from __future__ import annotations

import socket
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np

from conftest import ROOT, Daemon


def test_unix_socket_beside_tcp(tmp_path: Path, start_daemon: Callable[..., Daemon]) -> None:
    import tritonclient.grpc as grpcclient

    path = tmp_path / "run" / "grpc.sock"
    path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX)  # a socket file a crashed agent left behind
    stale.bind(str(path))
    stale.close()
    agent = start_daemon(
        "--model-repository", str(ROOT / "models"), "--execution-providers", "cpu",
        "--grpc-address", f"127.0.0.1:0,unix:{path}", "--metrics-address", "127.0.0.1:0",
        "--control-address", "127.0.0.1:0", address=False,
    ).wait_started()  # fmt: skip
    started = agent.named("agent.started")[0]
    assert started["unix_sockets"] == [str(path)]
    assert stat.S_IMODE(path.stat().st_mode) == 0o660
    x = np.load(ROOT / "models" / "digits" / "sample.npy").astype(np.float32).reshape(1, 64)
    for url in (f"unix:{path}", agent.url):
        with grpcclient.InferenceServerClient(url) as client:
            tensor = grpcclient.InferInput("input", [1, 64], "FP32")
            tensor.set_data_from_numpy(x)
            assert client.infer("digits", [tensor]).as_numpy("label")[0] == 7


def test_a_path_that_is_not_a_socket_is_refused(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    path = tmp_path / "grpc.sock"
    path.write_text("not a socket")
    agent = start_daemon(
        "--model-repository", str(ROOT / "models"), "--grpc-address", f"unix:{path}",
        "--metrics-address", "127.0.0.1:0", "--control-address", "127.0.0.1:0", address=False,
    )  # fmt: skip
    assert agent.proc.wait(60) == 78
    assert path.read_text() == "not a socket"
    assert any("is not a socket" in line for line in agent.stderr)
