"""Fuzzed inputs against the real daemon: only documented status codes, the daemon stays up and
its memory stays bounded. The search runs in its own process (tests/fuzz_rpcs.py) with a fixed
seed; for a longer local run: FUZZ_EXAMPLES=5000 FUZZ_SEED=7 .venv/bin/pytest tests/test_fuzz.py"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from conftest import ROOT, Daemon, build_repository


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_fuzzed_requests_get_documented_codes_only(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    repo = build_repository(tmp_path / "repo")
    daemon = start_daemon(
        "--model-repository", str(repo), "--execution-providers", "cpu"
    ).wait_started()
    examples = os.environ.get("FUZZ_EXAMPLES", "300")
    fuzz_seed = os.environ.get("FUZZ_SEED", "1234")
    before = rss_kib(daemon.proc.pid)
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "fuzz_rpcs.py"), daemon.url, examples, fuzz_seed],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["bad"] == [], result
    assert result["calls"] >= 2 * int(examples)
    assert "INTERNAL" not in result["codes"] and "UNKNOWN" not in result["codes"]
    assert daemon.proc.poll() is None  # still up
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(daemon.url) as client:
        assert client.is_server_ready() and client.is_model_ready("digits")
    assert rss_kib(daemon.proc.pid) < before + 300 * 1024  # bounded: no per-request leak


def test_element_limits(start_daemon: Callable[..., Daemon]) -> None:
    import numpy as np
    import pytest
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    daemon = start_daemon(
        "--model-repository",
        str(ROOT / "models"),
        "--execution-providers",
        "cpu",
        env={
            "EDGE_AGENT_MAX_ELEMENTS_PER_TENSOR": "128",
            "EDGE_AGENT_MAX_ELEMENTS_PER_REQUEST": "128",
        },
    ).wait_started()
    with grpcclient.InferenceServerClient(daemon.url) as client:
        for rows, allowed in ((2, True), (3, False)):  # 64 elements a row
            tensor = grpcclient.InferInput("input", [rows, 64], "FP32")
            tensor.set_data_from_numpy(np.zeros((rows, 64), np.float32))
            if allowed:
                assert client.infer("digits", [tensor]).as_numpy("label").shape == (rows,)
            else:
                with pytest.raises(InferenceServerException) as refused:
                    client.infer("digits", [tensor])
                assert "StatusCode.INVALID_ARGUMENT" in str(refused.value.status())
                assert "max_elements_per_tensor" in str(refused.value.message())


def test_fuzzed_fleet_calls_get_documented_codes_only(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    """Every FleetService RPC, random messages with every kind of credentials and random bytes:
    documented codes only, the control plane stays up."""
    from test_sync import Fleet

    fleet = Fleet(tmp_path, start_daemon, "--device-rate", "100000", "--publisher-rate", "100000")
    token = fleet.add_device("fuzz-device")
    fleet.publish(fleet.mlp(1), 1)  # so that manifests and blobs exist to be asked for
    examples = os.environ.get("FUZZ_EXAMPLES", "150")
    fuzz_seed = os.environ.get("FUZZ_SEED", "1234")
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "fuzz_fleet.py"),
            fleet.address,
            examples,
            fuzz_seed,
            fleet.token_file.read_text().strip(),
            "fuzz-device",
            token.read_text().strip(),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    internal = [e for e in fleet.cp.named("request.failed") if e.get("code") == "INTERNAL"]
    assert result["bad"] == [], (result, internal[:3])
    assert result["calls"] >= 9 * int(examples)
    assert result["codes"].get("OK", 0) > 0 and result["codes"].get("INVALID_ARGUMENT", 0) > 0
    assert fleet.cp.proc.poll() is None  # still up
    assert not [e for e in fleet.cp.named("request.failed") if e.get("code") == "INTERNAL"]
    assert fleet.status().devices  # and still answering
