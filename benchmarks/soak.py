"""Soak: hundreds of hot swaps under a closed-loop inference load, the three ways a new version
reaches a daemon (BENCHMARKS.md "Soak").

    .venv/bin/python benchmarks/soak.py [--explicit N] [--poll N] [--fleet N] [--steady S]
        [--gap S] [--swap-policy overlap|drain_first] [--out FILE.json]

Defaults: 80 + 70 + 60 swaps, 20 s steady windows, about 10 minutes on a shared 2-core VM;
`--explicit 3 --poll 3 --fleet 3 --steady 3` is a one-minute smoke run (0 skips a mode).

One daemon per mode (subprocesses, CPU provider, 1 instance, dynamic batching), serving the test
suite's `mlp` model (tests/modelgen.py: 64 -> 256 -> 256 -> 10, 330 KB; each version changes only
the last layer, so that a fleet release moves one blob):

  explicit  `--model-control-mode explicit`; each version pushed inline with RepositoryModelLoad
            (`file:<version>/model.onnx`) on the control listener;
  poll      `--model-control-mode poll --repository-poll-secs 0.25`; each version's directory
            written into the repository in place (no rename), as a copy onto the device would;
  fleet     a real control plane and a real agent (tests/test_sync.py's Fleet): each version
            published with `edge-agent publish` (a signed release and a fleet rollout); the agent
            long-polls, downloads what changed, verifies and swaps.

CLIENTS (8) threads, one gRPC channel each (our own stubs), send batch-1 requests back to back for
the whole run. Every answer is checked: a non-OK status is a failed request, and so is an OK answer
whose output is not the one of the version it names (`model_version`), or a version older than
the one the same client saw last. Each mode: a warm-up, STEADY seconds with no swap ("steady"),
N swaps, each GAP seconds after the previous one served, then STEADY seconds again ("after").
A request counts as "during a swap" when it started inside a swap's window: from the moment the
new version exists for the daemon (the load RPC is called; the version's first file is written;
the control plane logs `rollout.started`) to the daemon's `model.swapped` event. Resident memory
(VmRSS of the daemon) before the steady window and after the last one; the daemon's CPU time per
request in the steady windows and the swap phase (less disturbed by other work on shared cores
than latency is).
"""

from __future__ import annotations

import argparse
import array
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

# The test suite's helpers (tests/ is no package: mypy finds these modules only when run there).
import test_sync  # type: ignore[import-not-found]  # noqa: E402

import modelgen  # type: ignore[import-not-found]  # noqa: E402
from benchmarks.fleet import cpu_seconds, rss_mib  # noqa: E402
from conftest import Daemon, Daemons  # type: ignore[import-not-found]  # noqa: E402
from edge_agent._proto import grpc_service_pb2 as pb  # noqa: E402

CLIENTS = 8
MODEL = "mlp"  # the name test_sync's Fleet publishes and reports
CONFIG = """max_batch_size: 64
instance_group [ { count: 1, kind: KIND_CPU } ]
dynamic_batching { default_queue_policy { max_queue_size: 256 } }
"""
X = np.random.default_rng(7).standard_normal((1, 64)).astype(np.float32)
POLL_SECS = "0.25"
WARM_S = 2.0
SWAP_TIMEOUT_S = 120.0
KEPT_DETAILS = 20  # failure details kept per mode (all are counted)


# -- the load ----------------------------------------------------------------------------------


@dataclasses.dataclass
class ClientLog:
    """One client's record: start (wall clock) and latency of every good answer; failures."""

    starts: array.array[float] = dataclasses.field(default_factory=lambda: array.array("d"))
    latencies: array.array[float] = dataclasses.field(default_factory=lambda: array.array("d"))
    failures: Counter[str] = dataclasses.field(default_factory=Counter)
    details: list[str] = dataclasses.field(default_factory=list)
    versions: Counter[int] = dataclasses.field(default_factory=Counter)

    def fail(self, started: float, code: str, detail: str) -> None:
        self.failures[code] += 1
        if len(self.details) < KEPT_DETAILS:
            self.details.append(f"{started:.3f} {code}: {detail}")


class Load:
    """CLIENTS threads inferring back to back until stopped, each answer checked against the
    output expected from the version that answered."""

    def __init__(self, url: str, expected: dict[int, np.ndarray]) -> None:
        request = pb.ModelInferRequest(model_name=MODEL)
        request.inputs.add(name="x", datatype="FP32", shape=list(X.shape))
        request.raw_input_contents.append(X.tobytes())
        self._payload = request.SerializeToString()
        self._url = url
        self._expected = expected
        self._stop = threading.Event()
        self.logs = [ClientLog() for _ in range(CLIENTS)]
        self._threads = [threading.Thread(target=self._run, args=(log,)) for log in self.logs]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        deadline = time.monotonic() + 60
        while not all(log.starts for log in self.logs):
            if time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"no good answers from {self._url}: {self.failures()}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _run(self, log: ClientLog) -> None:
        with grpc.insecure_channel(self._url) as channel:
            infer = channel.unary_unary(
                "/inference.GRPCInferenceService/ModelInfer",
                response_deserializer=pb.ModelInferResponse.FromString,
            )
            last = 0
            while not self._stop.is_set():
                started = time.time()
                begun = time.perf_counter()
                try:
                    response = infer(self._payload, timeout=30)
                except grpc.RpcError as exc:
                    log.fail(started, exc.code().name, str(exc.details()))
                    time.sleep(0.001)  # a refusal is instant: do not spin on it
                    continue
                latency = time.perf_counter() - begun
                version = int(response.model_version)
                problem = self._check(response, version, last)
                if problem:
                    log.fail(started, "WRONG_ANSWER", problem)
                    continue
                last = version
                log.versions[version] += 1
                log.starts.append(started)
                log.latencies.append(latency)

    def _check(self, response: pb.ModelInferResponse, version: int, last: int) -> str:
        want = self._expected.get(version)
        if want is None:
            return f"answered by version {version}, never published"
        if version < last:
            return f"went back from version {last} to {version}"
        got = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(want.shape)
        if not np.allclose(got, want, rtol=1e-4, atol=1e-4):
            return f"version {version} answered {got.ravel()[:3]}, expected {want.ravel()[:3]}"
        return ""

    def failures(self) -> Counter[str]:
        return sum((log.failures for log in self.logs), Counter())

    def answers(self) -> tuple[np.ndarray, np.ndarray]:
        """(start, latency in ms) of every good answer, ordered by start."""
        starts = np.concatenate([np.frombuffer(log.starts, np.float64) for log in self.logs])
        latencies = np.concatenate([np.frombuffer(log.latencies, np.float64) for log in self.logs])
        order = np.argsort(starts)
        return starts[order], latencies[order] * 1000


# -- the versions ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Versions:
    """Every version's model file and expected answer, made before any load runs (so that
    nothing but the swap itself competes with the clients while a window is open)."""

    files: dict[int, Path]
    expected: dict[int, np.ndarray]

    @staticmethod
    def make(directory: Path, count: int) -> Versions:
        files, expected = {}, {}
        for version in range(1, count + 1):
            path = modelgen.mlp(directory / str(version) / "model.onnx", last_layer_seed=version)
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            files[version] = path
            expected[version] = session.run(None, {"x": X})[0]
        return Versions(files, expected)


def event_time(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


def wait_event(
    daemon: Daemon, name: str, version: int, since: int, timeout: float = SWAP_TIMEOUT_S
) -> dict[str, Any]:
    """The first event `name` for `version` among the daemon's events from index `since`; a load
    failure of that version ends the wait."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events: list[dict[str, Any]] = daemon.events[since:]
        for event in events:
            versions = event.get("versions") or [event.get("version")]
            if event.get("event") == name and version in versions:
                return event
            if event.get("event") == "model.load_failed" and event.get("version") == version:
                raise RuntimeError(f"version {version} failed to load: {event.get('reason')}")
        time.sleep(0.01)
    raise RuntimeError(f"no {name} for version {version} within {timeout:.0f} s")


# -- one mode ----------------------------------------------------------------------------------

Swap = Callable[[int], tuple[float, float]]  # version -> its window (opened, closed), wall clock


@dataclasses.dataclass
class Phases:
    """When each phase of a mode ran (wall clock), and the daemon's memory around them."""

    steady: tuple[float, float]
    windows: list[tuple[float, float]]
    after: tuple[float, float]
    rss_before_mib: float
    rss_after_mib: float
    # The daemon's CPU seconds in the steady window, the swaps and the window after: per request,
    # a measure that other work on this machine's cores disturbs less than latency.
    cpu_s: dict[str, float]


def soak(
    daemon: Daemon, versions: Versions, swap: Swap, swaps: int, args: argparse.Namespace
) -> dict[str, Any]:
    """The load against `daemon` (serving version 1): steady, `swaps` swaps, steady again."""
    began = time.monotonic()
    first_event = len(daemon.events)
    pid = daemon.proc.pid
    load_average = os.getloadavg()[0]
    with Load(daemon.url, versions.expected) as load:
        time.sleep(WARM_S)
        rss_before = rss_mib(pid)
        cpu = [cpu_seconds(pid)]
        steady = window(args.steady)
        cpu.append(cpu_seconds(pid))
        windows = []
        for version in range(2, swaps + 2):
            windows.append(swap(version))
            time.sleep(args.gap)
        cpu.append(cpu_seconds(pid))
        after = window(args.steady)
        cpu.append(cpu_seconds(pid))
        used = dict(zip(["steady", "swap_phase", "after"], np.diff(cpu).tolist(), strict=True))
        phases = Phases(steady, windows, after, rss_before, rss_mib(pid), used)
    events = daemon.events[first_event:]
    swapped = [e for e in events if e.get("event") == "model.swapped"]
    return {
        "swaps_requested": swaps,
        **summary(load, phases, swapped),
        "inline": inline_decisions(events),
        "load_average_1min": [round(load_average, 2), round(os.getloadavg()[0], 2)],
        "wall_s": round(time.monotonic() - began, 1),
    }


def inline_decisions(events: list[dict[str, Any]]) -> dict[str, Any]:
    """How the versions loaded were executed: inline at load or not, then demoted / promoted
    (the scheduler's judge), with the demotions' own fields."""
    loaded = [e for e in events if e.get("event") == "model.loaded"]
    demoted = [e for e in events if e.get("event") == "model.inline_demoted"]
    return {
        "loaded_inline": sum(1 for e in loaded if e.get("inline")),
        "loaded_threaded": sum(1 for e in loaded if not e.get("inline")),
        "demoted": len(demoted),
        "promoted": sum(1 for e in events if e.get("event") == "model.inline_promoted"),
        "demotions": [
            {k: v for k, v in e.items() if k not in ("event", "level")} for e in demoted[:10]
        ],
    }


def window(seconds: float) -> tuple[float, float]:
    """Wait `seconds`: the window waited."""
    opened = time.time()
    time.sleep(seconds)
    return opened, time.time()


def summary(load: Load, phases: Phases, swapped: list[dict[str, Any]]) -> dict[str, Any]:
    starts, latencies = load.answers()
    failures = load.failures()
    opens = np.array([a for a, _ in phases.windows])
    closes = np.array([b for _, b in phases.windows])
    # The windows follow one another: the one a request may have started in is the last opened.
    slot = np.searchsorted(opens, starts, side="right") - 1
    during = (slot >= 0) & (starts < closes[np.maximum(slot, 0)]) if len(opens) else slot < -1

    def inside(opened: float, closed: float) -> np.ndarray:
        return (starts >= opened) & (starts < closed)

    steady, after = phases.steady, phases.after
    result: dict[str, Any] = {
        "swaps_completed": len(swapped),
        "last_version_served": max(sum((log.versions for log in load.logs), Counter())),
        "requests": len(starts) + sum(failures.values()),
        "failed": sum(failures.values()),
        "failures_by_code": dict(failures),
        "failure_examples": [d for log in load.logs for d in log.details][:KEPT_DETAILS],
        "steady": stats(latencies[inside(*steady)], steady[1] - steady[0], phases.cpu_s["steady"]),
        "during_swaps": stats(latencies[during], float(np.sum(closes - opens))),
        "swap_phase": stats(
            latencies[inside(steady[1], after[0])], after[0] - steady[1], phases.cpu_s["swap_phase"]
        ),
        "after": stats(latencies[inside(*after)], after[1] - after[0], phases.cpu_s["after"]),
        "swap_window_s": spread([float(s) for s in closes - opens]),
        "daemon_swap_s": spread([e["seconds"] for e in swapped]),
        "rss_before_mib": round(phases.rss_before_mib, 1),
        "rss_after_mib": round(phases.rss_after_mib, 1),
        "peak_rss_during_swaps_mib": round(
            max((e["peak_rss_bytes"] for e in swapped), default=0) / 2**20, 1
        ),
    }
    result["p99_ratio"] = round(result["during_swaps"]["p99_ms"] / result["steady"]["p99_ms"], 2)
    return result


def stats(latencies_ms: np.ndarray, seconds: float, cpu_s: float | None = None) -> dict[str, float]:
    if not len(latencies_ms):
        return {"requests": 0, "p50_ms": float("nan"), "p99_ms": float("nan")}
    result = {
        "requests": len(latencies_ms),
        "per_s": round(len(latencies_ms) / seconds, 1),
        "p50_ms": round(float(np.percentile(latencies_ms, 50)), 2),
        "p99_ms": round(float(np.percentile(latencies_ms, 99)), 2),
        "max_ms": round(float(latencies_ms.max()), 1),
    }
    if cpu_s is not None:
        result["daemon_cpu_ms_per_request"] = round(cpu_s / len(latencies_ms) * 1000, 3)
    return result


def spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"median": round(float(np.median(values)), 3), "max": round(max(values), 3)}


# -- the three ways a version arrives ----------------------------------------------------------


def repository(root: Path, versions: Versions) -> Path:
    (root / MODEL / "1").mkdir(parents=True)
    (root / MODEL / "config.pbtxt").write_text(CONFIG)
    (root / MODEL / "1" / "model.onnx").write_bytes(versions.files[1].read_bytes())
    return root


def explicit(
    daemons: Daemons, work: Path, versions: Versions, swaps: int, args: argparse.Namespace
) -> dict[str, Any]:
    repo = repository(work / "repo-explicit", versions)
    daemon = daemons.start(
        "--model-repository", str(repo), "--model-control-mode", "explicit",
        "--load-model", MODEL, "--execution-providers", "cpu", "--swap-policy", args.swap_policy,
    ).wait_started()  # fmt: skip
    pushes = {
        v: pb.RepositoryModelLoadRequest(
            model_name=MODEL,
            parameters={
                f"file:{v}/model.onnx": pb.ModelRepositoryParameter(bytes_param=f.read_bytes())
            },
        )
        for v, f in versions.files.items()
    }
    with grpc.insecure_channel(daemon.control_url) as channel:
        load = channel.unary_unary(
            "/inference.GRPCInferenceService/RepositoryModelLoad",
            request_serializer=pb.RepositoryModelLoadRequest.SerializeToString,
            response_deserializer=pb.RepositoryModelLoadResponse.FromString,
        )

        def swap(version: int) -> tuple[float, float]:
            opened = time.time()
            load(pushes[version], timeout=SWAP_TIMEOUT_S)
            return opened, time.time()

        return soak(daemon, versions, swap, swaps, args)


def poll(
    daemons: Daemons, work: Path, versions: Versions, swaps: int, args: argparse.Namespace
) -> dict[str, Any]:
    repo = repository(work / "repo-poll", versions)
    daemon = daemons.start(
        "--model-repository", str(repo), "--model-control-mode", "poll",
        "--repository-poll-secs", POLL_SECS, "--execution-providers", "cpu",
        "--swap-policy", args.swap_policy,
    ).wait_started()  # fmt: skip
    graphs = {v: f.read_bytes() for v, f in versions.files.items()}

    def swap(version: int) -> tuple[float, float]:
        since = len(daemon.events)
        opened = time.time()
        (repo / MODEL / str(version)).mkdir()
        (repo / MODEL / str(version) / "model.onnx").write_bytes(graphs[version])
        return opened, event_time(wait_event(daemon, "model.swapped", version, since))

    return soak(daemon, versions, swap, swaps, args)


def fleet(
    daemons: Daemons, work: Path, versions: Versions, swaps: int, args: argparse.Namespace
) -> dict[str, Any]:
    plane = test_sync.Fleet(work / "fleet", daemons.start)
    config = work / "config.pbtxt"
    config.write_text(CONFIG)
    plane.add_device("edge-1")
    plane.publish(versions.files[1], 1, "--config", str(config))
    agent = plane.agent("edge-1", "--swap-policy", args.swap_policy)
    wait_event(agent, "model.loaded", 1, 0)
    publish_s: list[float] = []

    def swap(version: int) -> tuple[float, float]:
        since, cp_since = len(agent.events), len(plane.cp.events)
        begun = time.monotonic()
        plane.publish(versions.files[version], version, "--config", str(config))
        publish_s.append(time.monotonic() - begun)
        rollout = wait_event(plane.cp, "rollout.started", version, cp_since, 30)
        swapped = wait_event(agent, "model.swapped", version, since)
        return event_time(rollout), event_time(swapped)

    result = soak(agent, versions, swap, swaps, args)
    result["publish_cli_s"] = spread(publish_s)
    report = plane.report("edge-1")
    result["device_report"] = (
        {"serving": report.serving_version, "installed": report.installed_version}
        if report is not None
        else None
    )
    result["rollouts"] = dict(Counter(r.state for r in plane.status().rollouts))
    return result


MODES = {"explicit": explicit, "poll": poll, "fleet": fleet}


# -- the run -----------------------------------------------------------------------------------


def report(results: dict[str, Any]) -> str:
    lines = [
        "| mode | swaps | requests | failed | steady p50 / p99 ms | during swaps p50 / p99 ms "
        "(requests) | p99 ratio | swap window s (median / max) | RSS before / after MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode, r in results["modes"].items():
        s, d, w = r["steady"], r["during_swaps"], r["swap_window_s"]
        lines.append(
            f"| {mode} | {r['swaps_completed']} / {r['swaps_requested']} | {r['requests']:,} "
            f"| {r['failed']} | {s['p50_ms']:.2f} / {s['p99_ms']:.2f} "
            f"| {d['p50_ms']:.2f} / {d['p99_ms']:.2f} ({d['requests']:,}) | {r['p99_ratio']:.2f} "
            f"| {w.get('median', float('nan')):.2f} / {w.get('max', float('nan')):.2f} "
            f"| {r['rss_before_mib']:.0f} / {r['rss_after_mib']:.0f} |"
        )
    return "\n".join(lines)


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD"),
        "edge_agent_dirty": bool(git("status", "--porcelain", "edge_agent")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--explicit", type=int, default=80, help="swaps by RepositoryModelLoad")
    parser.add_argument("--poll", type=int, default=70, help="swaps by poll mode")
    parser.add_argument("--fleet", type=int, default=60, help="swaps by fleet releases")
    parser.add_argument("--steady", type=float, default=20.0, help="seconds of each steady window")
    parser.add_argument("--gap", type=float, default=0.3, help="seconds between swaps")
    parser.add_argument("--swap-policy", choices=["overlap", "drain_first"], default="overlap")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "soak_results.json")
    args = parser.parse_args()
    counts = {"explicit": args.explicit, "poll": args.poll, "fleet": args.fleet}
    began = time.monotonic()
    results: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.node()}",
        "command": " ".join(["benchmarks/soak.py", *sys.argv[1:]]),
        **git_state(),
        "clients": CLIENTS,
        "steady_s": args.steady,
        "gap_s": args.gap,
        "swap_policy": args.swap_policy,
        "modes": {},
    }
    with tempfile.TemporaryDirectory(prefix="ea-soak-") as scratch:
        work = Path(scratch)
        versions = Versions.make(work / "versions", max(counts.values()) + 1)
        for mode, run in MODES.items():
            if not counts[mode]:
                continue
            daemons = Daemons()
            try:
                results["modes"][mode] = run(daemons, work, versions, counts[mode], args)
            finally:
                daemons.stop_all()
            print(f"{mode}: {json.dumps(results['modes'][mode])}", flush=True)
    modes = results["modes"].values()
    results["swaps_total"] = sum(r["swaps_completed"] for r in modes)
    results["failed_total"] = sum(r["failed"] for r in modes)
    results["wall_s"] = round(time.monotonic() - began, 1)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(report(results))
    print(
        f"{results['swaps_total']} swaps, {results['failed_total']} failed requests, "
        f"{results['wall_s']:.0f} s"
    )


if __name__ == "__main__":
    main()
