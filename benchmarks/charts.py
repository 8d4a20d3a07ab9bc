"""Charts the benchmark commands write beside their numbers (PNG, matplotlib's Agg backend).

Each function takes the results dictionary its benchmark writes as JSON, so a chart can be
redrawn from a saved run (`run.py --plot-only`, `fleet.py --plot-only`) without measuring
again. matplotlib is imported inside the functions: the benchmarks' numbers never depend on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

IMAGES = Path(__file__).resolve().parents[1] / "docs" / "images"

# How each serving system is drawn, in legend order: label, colour, line style.
SERVING_STYLE: dict[str, tuple[str, str, str]] = {
    "daemon": ("edge-agent (aio)", "tab:blue", "-"),
    "daemon-sync": ("edge-agent (sync front end)", "tab:cyan", "-"),
    "daemon-nobatch": ("edge-agent, batching off", "tab:purple", "--"),
    "pytriton": ("PyTriton", "tab:green", "-"),
    "naive": ("naive (one session.run per request)", "tab:red", "-"),
    "nowork": ("no-work server, sync (RPC limit)", "tab:gray", ":"),
    "nowork-aio": ("no-work server, aio (RPC limit)", "tab:brown", ":"),
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _levels(entry: Mapping[str, Any]) -> list[int]:
    return sorted(
        {int(c) for system, by_c in entry.items() if system in SERVING_STYLE for c in by_c}
    )


def combined_limit(entry: Mapping[str, Any], level: str) -> float | None:
    """L = 1 / (1/R + 1/C): R the better no-work server at this level, C the in-process best."""
    rates = [
        entry[s][level]["throughput"]
        for s in ("nowork", "nowork-aio")
        if level in entry.get(s, {}) and not math.isnan(entry[s][level]["throughput"])
    ]
    compute = entry.get("in_process", {}).get("best", {}).get("samples_per_s")
    if not rates or not compute:
        return None
    return float(1 / (1 / max(rates) + 1 / compute))


def _subtitle(results: Mapping[str, Any]) -> str:
    return f"{results.get('date', '')}, {results.get('machine', '')}"


def _per_model(
    results: Mapping[str, Any],
    path: Path,
    title: str,
    draw: Callable[[Any, Mapping[str, Any], list[int]], None],
) -> Path:
    """A panel per model, concurrency on a log2 x axis; `draw(axis, entry, levels)` fills one.
    The legend is the first panel's; the run's date and machine go under the title."""
    plt = _pyplot()
    models = list(results["models"].items())
    figure, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.8), squeeze=False)
    for axis, (name, entry) in zip(axes[0], models, strict=True):
        levels = _levels(entry)
        draw(axis, entry, levels)
        axis.set_xscale("log", base=2)
        axis.set_xticks(levels, [str(c) for c in levels])
        axis.set_xlabel("concurrent requests (perf_analyzer, batch 1)")
        axis.set_title(name)
    axes[0][0].legend(fontsize=6, loc="upper left")
    figure.suptitle(f"{title}\n{_subtitle(results)}", fontsize=8)
    return _save(plt, figure, path)


def _save(plt: Any, figure: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _throughput_panel(axis: Any, entry: Mapping[str, Any], levels: list[int]) -> None:
    for system, (label, colour, style) in SERVING_STYLE.items():
        by_c = entry.get(system)
        if not by_c:
            continue
        xs = [c for c in levels if str(c) in by_c]
        axis.plot(
            xs, [by_c[str(c)]["throughput"] for c in xs], style,
            marker="o", markersize=4, color=colour, label=label,
        )  # fmt: skip
    limit = [(c, v) for c in levels if (v := combined_limit(entry, str(c)))]
    if limit:
        axis.plot(
            [c for c, _ in limit], [v for _, v in limit], "--", color="black",
            linewidth=1, label="L: limit of RPC + compute",
        )  # fmt: skip
    axis.set_ylim(bottom=0)
    axis.set_ylabel("inferences / s")
    axis.grid(alpha=0.3)


def _latency_panel(axis: Any, entry: Mapping[str, Any], levels: list[int]) -> None:
    from matplotlib.ticker import ScalarFormatter

    for system, (label, colour, _) in SERVING_STYLE.items():
        by_c = entry.get(system)
        if not by_c or system.startswith("nowork"):
            continue
        xs = [c for c in levels if str(c) in by_c]
        for key, style, suffix in (("p50_ms", "-", " p50"), ("p99_ms", ":", " p99")):
            axis.plot(
                xs, [by_c[str(c)][key] for c in xs], style, marker="o", markersize=3,
                color=colour, label=label + suffix,
            )  # fmt: skip
    axis.set_yscale("log")
    axis.yaxis.set_major_formatter(ScalarFormatter())
    axis.yaxis.set_minor_formatter(ScalarFormatter())
    axis.set_ylabel("latency (ms)")
    axis.grid(alpha=0.3, which="both")


def serving(results: Mapping[str, Any], directory: Path = IMAGES) -> list[Path]:
    """Throughput against concurrency (a line per system, the combined limit L dashed) and p50
    (solid) / p99 (dotted) latency on a log scale, a panel per model."""
    return [
        _per_model(results, directory / "serving_throughput.png",
                   "Throughput against concurrency", _throughput_panel),
        _per_model(results, directory / "serving_latency.png",
                   "Latency percentiles", _latency_panel),
    ]  # fmt: skip


# The rollouts the fleet simulator times, and their legend labels.
FLEET_ROLLOUTS = {
    "one_layer_update": "one-layer update of an 80 MB model",
    "full_install_small": "full install of a 20 KB model",
}


def fleet_convergence(runs: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Share of devices serving the new version against seconds since publishing began, a line
    per rollout and run (`curve`: [seconds, share] pairs from `sample_curve`)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 5))
    styles = ["-", "--", "-.", ":"]
    for index, run in enumerate(runs):
        where = (
            f"{run['devices']:,} devices, {run['backend']}, {run['replicas']} "
            f"control plane{'s' if run['replicas'] > 1 else ''}"
        )
        colours = ("tab:blue", "tab:orange")
        for colour, (key, label) in zip(colours, FLEET_ROLLOUTS.items(), strict=True):
            curve = run.get(key, {}).get("curve")
            if not curve:
                continue
            axis.step(
                [0.0, *(t for t, _ in curve)], [0.0, *(share for _, share in curve)],
                styles[index % len(styles)], where="post", color=colour,
                label=f"{label} ({where})",
            )  # fmt: skip
    axis.set_xlabel("seconds since publishing began")
    axis.set_ylabel("share of devices serving the new version")
    axis.set_ylim(0, 1.02)
    axis.set_xlim(left=0)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="lower right")
    axis.set_title("Fleet convergence: simulated devices on the real device protocol", fontsize=9)
    return _save(plt, figure, path)


def sample_curve(seconds: Sequence[float], devices: int, points: int = 200) -> list[list[float]]:
    """[seconds, share of `devices` serving by then] at about `points` arrivals (the first and
    the last kept), from each arrival's seconds: a JSON of 10,000 devices stays small and the
    step chart keeps its shape. Devices that never arrived keep the last share below 1."""
    ordered = sorted(seconds)
    if not ordered:
        return []
    count = min(points, len(ordered))
    step = (len(ordered) - 1) / max(count - 1, 1)
    picks = sorted({round(i * step) for i in range(count)})
    return [[round(ordered[i], 3), round((i + 1) / devices, 5)] for i in picks]
