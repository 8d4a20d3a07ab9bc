"""The benchmark charts: drawn from a saved results file by the benchmark commands themselves
(`--plot-only`), and the pure helpers behind them. No measurement runs here."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import charts  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def cell(throughput: float) -> dict[str, float]:
    return {"throughput": throughput, "p50_ms": 1000 / throughput, "p99_ms": 3000 / throughput}


def serving_results() -> dict[str, object]:
    entry = {
        "in_process": {
            "by_batch": {"1": 2000.0, "64": 10_000.0},
            "best": {"batch": 64, "samples_per_s": 10_000.0},
            "batch1_p50_ms": 0.4,
            "batch1_p99_ms": 0.6,
        },
        "daemon": {"1": cell(900), "16": cell(2500)},
        "pytriton": {"1": cell(300), "16": cell(700)},
        "naive": {"1": cell(1000), "16": cell(1100)},
        "nowork": {"1": cell(3000), "16": cell(float("nan"))},
        "nowork-aio": {"1": cell(2000), "16": cell(5000)},
    }
    return {
        "date": "2026-12-03T13:00:00+00:00",
        "machine": "x86_64, 2 cores",
        "onnxruntime": "1.31.1",
        "models": {"digits": entry, "wide_mlp": entry},
    }


def test_combined_limit_takes_the_better_rpc_limit_and_skips_unstable_windows() -> None:
    entry = serving_results()["models"]["digits"]  # type: ignore[index]
    assert charts.combined_limit(entry, "1") == pytest.approx(1 / (1 / 3000 + 1 / 10_000))
    # At 16 the sync no-work window was unstable (NaN): the aio one is R.
    assert charts.combined_limit(entry, "16") == pytest.approx(1 / (1 / 5000 + 1 / 10_000))
    assert charts.combined_limit({"daemon": {"1": cell(1)}}, "1") is None


def test_sample_curve_keeps_first_last_and_the_share_of_the_whole_fleet() -> None:
    assert charts.sample_curve([], 10) == []
    assert charts.sample_curve([3.0, 1.0, 2.0], 4) == [[1.0, 0.25], [2.0, 0.5], [3.0, 0.75]]
    thinned = charts.sample_curve([float(s) for s in range(10_000)], 10_000, points=50)
    assert len(thinned) == 50
    assert thinned[0] == [0.0, 0.0001] and thinned[-1] == [9999.0, 1.0]
    assert all(a[0] <= b[0] and a[1] < b[1] for a, b in itertools.pairwise(thinned))


def test_run_plot_only_redraws_both_serving_charts_and_the_report(tmp_path: Path) -> None:
    saved = tmp_path / "results.json"
    saved.write_text(json.dumps(serving_results()))
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--plot-only", str(saved),
         "--charts", str(tmp_path / "charts")],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for name in ("serving_throughput.png", "serving_latency.png"):
        assert (tmp_path / "charts" / name).read_bytes().startswith(PNG)
    # The report has the PyTriton column and the ratio against it: 900 / 300.
    assert "| PyTriton |" in done.stdout
    row = next(line for line in done.stdout.splitlines() if line.startswith("| 1 |"))
    assert "| 3.00 |" in row and "300/s" in row


def test_fleet_plot_only_draws_convergence_of_saved_runs(tmp_path: Path) -> None:
    runs = []
    for replicas in (1, 2):
        run = {"devices": 4, "backend": "scale", "replicas": replicas}
        for key in charts.FLEET_ROLLOUTS:
            run[key] = {"curve": charts.sample_curve([0.5, 1.0, 1.5, 2.0 * replicas], 4)}
        path = tmp_path / f"fleet{replicas}.json"
        path.write_text(json.dumps(run))
        runs.append(str(path))
    chart = tmp_path / "not-yet" / "fleet.png"  # a directory the command makes
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fleet.py"), "--plot-only", *runs,
         "--chart", str(chart)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert chart.read_bytes().startswith(PNG)


def test_the_performance_page_shows_the_charts_the_commands_write() -> None:
    page = (ROOT / "docs" / "performance.md").read_text()
    for name in ("serving_throughput", "serving_latency", "fleet_convergence", "learning_accuracy"):
        assert f"(images/{name}.png)" in page, name
        assert (ROOT / "docs" / "images" / f"{name}.png").read_bytes().startswith(PNG)
