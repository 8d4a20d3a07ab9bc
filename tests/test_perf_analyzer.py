"""Triton's own load generator drives the daemon unchanged and measures a throughput."""

from __future__ import annotations

import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

TOOL = Path(__file__).resolve().parents[1] / "scripts" / "perf_analyzer"
# These tests want a throughput, not a stable one: on a busy machine perf_analyzer's default (10%
# between windows, 10 trials) can fail to settle and exit 2.
STEADY_ENOUGH = ["--stability-percentage", "100", "--max-trials", "20"]


@pytest.mark.skipif(platform.machine() != "x86_64", reason="perf_analyzer ships for x86_64 only")
def test_perf_analyzer_reports_a_throughput(server: Any) -> None:
    result = subprocess.run(
        [
            str(TOOL),
            "-m",
            "digits",
            "-u",
            server.url,
            "-i",
            "grpc",
            "--concurrency-range",
            "2",
            "--measurement-interval",
            "1000",
            *STEADY_ENOUGH,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    throughput = re.search(r"Throughput: ([0-9.]+) infer/sec", result.stdout)
    assert throughput is not None, result.stdout[-3000:]
    assert float(throughput.group(1)) > 0


@pytest.mark.skipif(platform.machine() != "x86_64", reason="perf_analyzer ships for x86_64 only")
def test_perf_analyzer_over_system_shared_memory(start_daemon: Any) -> None:
    """perf_analyzer --shared-memory system: regions registered, inputs and outputs through
    them. (At exit it also unregisters every CUDA region: answered, so no warning.)"""
    daemon = start_daemon(
        "--model-repository", str(Path(__file__).resolve().parents[1] / "models"),
        "--execution-providers", "cpu", "--allow-shared-memory",
    ).wait_started()  # fmt: skip
    result = subprocess.run(
        [str(TOOL), "-m", "digits", "-u", daemon.url, "-i", "grpc", "--concurrency-range", "2",
         "--measurement-interval", "1000", *STEADY_ENOUGH, "--shared-memory", "system",
         "--output-shared-memory-size", "64"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    throughput = re.search(r"Throughput: ([0-9.]+) infer/sec", result.stdout)
    assert throughput is not None and float(throughput.group(1)) > 0, result.stdout[-3000:]
    assert not daemon.named("request.failed")
    assert "unimplemented" not in (result.stdout + result.stderr).lower()
