"""Triton's own load generator drives the daemon unchanged and measures a throughput."""

from __future__ import annotations

import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

TOOL = Path(__file__).resolve().parents[1] / "scripts" / "perf_analyzer"


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
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    throughput = re.search(r"Throughput: ([0-9.]+) infer/sec", result.stdout)
    assert throughput is not None, result.stdout[-3000:]
    assert float(throughput.group(1)) > 0
