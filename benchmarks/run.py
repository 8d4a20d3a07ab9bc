"""The benchmark: the daemon against its limits and against the naive design, in one run.

    .venv/bin/python benchmarks/run.py [--quick] [--out FILE.json]

For each model (the shipped `digits`, where the RPC dominates; a wide MLP 784-4096-4096-10,
where batching pays; a small CNN, which gains little from batching on a CPU), at batch-1
requests and concurrency 1, 4, 16, 64, with Triton's perf_analyzer as the client:

  daemon        edge-agent with dynamic batching (1 instance, no queue delay)
  daemon-sync   the same with the sync front end (front_end = "sync", api/sync_front.py)
  daemon-nobatch edge-agent, dynamic batching off (one request per execution, same limiter)
  naive         sync grpcio + thread pool, one session.run per request
                (benchmarks/baseline_servers.py)
  pytriton      PyTriton 0.7 (Triton's server and its Python backend) running the same ONNX
                Runtime session in a bound function with dynamic batching up to 64, no queue
                delay (benchmarks/pytriton_server.py); only with --pytriton-python
  nowork        the same protocol answering a canned response: the RPC limit R (sync and aio;
                the better is R)
  in-process    ONNX Runtime in this process at each batch size: the compute limit C

L = 1 / (1/R + 1/C) is the combined limit. Progress goes to stderr, the report to stdout, the
numbers to --out and two charts (throughput, latency percentiles) to --charts; --plot-only
redraws the charts from a saved --out file. Then an overload run: offered load far above capacity
against max_queue_size 8 (benchmarks/loadgen.py), with the daemon's memory before and after.
Everything runs on this machine's cores, clients included: ratios are the point, not absolutes.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import charts, models  # noqa: E402
from benchmarks.progress import step  # noqa: E402

PERF_ANALYZER = ROOT / "scripts" / "perf_analyzer"
PYTHON = sys.executable
CONFIG = """max_batch_size: 64
instance_group [ {{ count: {instances}, kind: KIND_CPU }} ]
{batching}
"""
# INSTANCES=2 in the environment reruns it with two execution instances (the trade-off table).
INSTANCES = int(os.environ.get("INSTANCES", "1"))
# Triton's default: no queue delay (a batch is whatever queued while the instance was busy).
# DELAY_US=2000 in the environment reruns it with a 2 ms delay, for the trade-off table.
BATCHING = (
    "dynamic_batching { max_queue_delay_microseconds: "
    + os.environ.get("DELAY_US", "0")
    + " default_queue_policy { max_queue_size: %d } }"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                time.sleep(0.5)
                return
        time.sleep(0.2)
    raise RuntimeError("server did not come up")


class Server:
    def __init__(self, command: list[str], port: int, log: Path | None = None) -> None:
        """`log`: where its stdout (the JSON log) goes; nowhere by default."""
        self.port = port
        self._log = open(log, "w") if log is not None else None  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            command,
            stdout=self._log or subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
        )
        wait_port(port, self.proc)

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        if self._log is not None:
            self._log.close()


def daemon(repo: Path, front_end: str = "aio") -> Server:
    port = free_port()
    return Server(
        [
            PYTHON,
            "-m",
            "edge_agent",
            "serve",
            "--model-repository",
            str(repo),
            "--grpc-address",
            f"127.0.0.1:{port}",
            "--metrics-address",
            "127.0.0.1:0",
            "--execution-providers",
            "cpu",
            "--log-level",
            "warning",
            "--front-end",
            front_end,
        ],
        port,
    )


def baseline(mode: str, model: Path) -> Server:
    port = free_port()
    return Server(
        [PYTHON, str(ROOT / "benchmarks" / "baseline_servers.py"), mode, str(model), str(port)],
        port,
    )


def pytriton(python: str, model: Path) -> Server:
    port = free_port()
    server = Server([python, str(ROOT / "benchmarks" / "pytriton_server.py"), str(model),
                     str(port)], port)  # fmt: skip
    # Triton opens its port before the bound model is loaded: wait until it is ready.
    from edge_agent._proto import grpc_service_pb2 as pb
    from edge_agent._proto import grpc_service_pb2_grpc as pb_grpc

    deadline = time.monotonic() + 120
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline and server.proc.poll() is None:
            with contextlib.suppress(grpc.RpcError):
                if stub.ModelReady(pb.ModelReadyRequest(name="model"), timeout=5).ready:
                    return server
            time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"PyTriton did not load the model; {PYTRITON_SETUP}")


def perf_analyzer(
    port: int,
    concurrency: int,
    quick: bool,
    extra: list[str] | None = None,
    window_ms: int | None = None,
) -> dict[str, float]:
    """One perf_analyzer measurement of model "model" on 127.0.0.1:PORT (gRPC unless `extra`
    says `-i http`): throughput and p50/p99 in ms; NaN when no window was stable."""
    window = window_ms or (1500 if quick else 3000)
    with tempfile.NamedTemporaryFile(suffix=".csv") as out:
        command = [
            str(PERF_ANALYZER),
            "-m",
            "model",
            "-u",
            f"127.0.0.1:{port}",
            *(extra if extra and "-i" in extra else ["-i", "grpc", *(extra or [])]),
            "--concurrency-range",
            str(concurrency),
            "-f",
            out.name,
            "--measurement-interval",
            str(window),
            # This machine is shared and small: accept 25% window-to-window spread.
            "--stability-percentage",
            "25",
            "--max-trials",
            "6" if quick else "10",
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
        text = Path(out.name).read_text().strip()
        if not text:
            print(f"   no stable measurement: {result.stdout[-300:]}", file=sys.stderr)
            return {"throughput": float("nan"), "p50_ms": float("nan"), "p99_ms": float("nan")}
        row = next(csv.DictReader(io.StringIO(text)))
    return {
        "throughput": float(row["Inferences/Second"]),
        "p50_ms": float(row["p50 latency"]) / 1000,
        "p99_ms": float(row["p99 latency"]) / 1000,
    }


def in_process(model: Path, input_shape: tuple[int, ...], quick: bool) -> dict[str, Any]:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    rng = np.random.default_rng(0)
    best: dict[str, Any] = {"batch": 1, "samples_per_s": 0.0}
    by_batch = {}
    for batch in (1, 2, 4, 8, 16, 32, 64):
        x = rng.standard_normal((batch, *input_shape)).astype(np.float32)
        session.run(None, {name: x})
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < (0.7 if quick else 2.0):
            session.run(None, {name: x})
            runs += 1
        rate = runs * batch / (time.perf_counter() - started)
        by_batch[batch] = round(rate, 1)
        if rate > best["samples_per_s"]:
            best = {"batch": batch, "samples_per_s": rate}
    x = rng.standard_normal((1, *input_shape)).astype(np.float32)
    latencies = []
    for _ in range(300 if quick else 2000):
        started = time.perf_counter()
        session.run(None, {name: x})
        latencies.append(time.perf_counter() - started)
    ms = np.array(latencies) * 1000
    return {
        "by_batch": by_batch,
        "best": best,
        "batch1_p50_ms": float(np.percentile(ms, 50)),
        "batch1_p99_ms": float(np.percentile(ms, 99)),
    }


def build(work: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    built = {
        "digits": (ROOT / "models" / "digits" / "1" / "model.onnx", (64,)),
        "wide_mlp": (models.wide_mlp(work / "wide_mlp.onnx"), (784,)),
        "small_cnn": (models.small_cnn(work / "small_cnn.onnx"), (1, 28, 28)),
    }
    return built


def repository(work: Path, name: str, model: Path, batching: str) -> Path:
    repo = work / f"repo-{name}-{'batch' if batching else 'nobatch'}"
    (repo / "model" / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy(model, repo / "model" / "1" / "model.onnx")
    (repo / "model" / "config.pbtxt").write_text(
        CONFIG.format(batching=batching, instances=INSTANCES)
    )
    return repo


MODELS = ("digits", "wide_mlp", "small_cnn")  # what build() makes
# What a failed PyTriton start most likely needs: its Python backend links the system libpython.
PYTRITON_SETUP = (
    "its venv must be made with Debian's /usr/bin/python3 (PyTriton's backend links the "
    "system libpython): see benchmarks/pytriton_server.py"
)
SYSTEMS = ("daemon", "daemon-sync", "daemon-nobatch", "pytriton", "naive", "nowork", "nowork-aio")


def start(system: str, work: Path, name: str, model: Path, pytriton_python: str = "") -> Server:
    """One of SYSTEMS (the module docstring), serving `model` (named `name`) as "model"."""
    if system == "daemon":
        return daemon(repository(work, name, model, BATCHING % 1024))
    if system == "daemon-sync":
        return daemon(repository(work, name + "-sync", model, BATCHING % 1024), "sync")
    if system == "daemon-nobatch":
        return daemon(repository(work, name, model, ""))
    if system in ("naive", "nowork", "nowork-aio"):
        return baseline(system, model)
    if system == "pytriton":
        return pytriton(pytriton_python, model)
    raise ValueError(f"unknown system {system!r} (one of {', '.join(SYSTEMS)})")


def idle_policy() -> str:
    """How this machine's idle CPUs wake, where Linux says (cpuidle driver; on a KVM guest with
    cpuidle-haltpoll, how long an idle vCPU polls before it halts): at low concurrency every
    request wakes threads across cores, and this alone moved concurrency-1 throughput ~2x
    (BENCHMARKS.md "Where concurrency 1 goes")."""
    parts = []
    driver = Path("/sys/devices/system/cpu/cpuidle/current_driver")
    poll = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
    with contextlib.suppress(OSError):
        parts.append(f"cpuidle {driver.read_text().strip()}")
    with contextlib.suppress(OSError):
        parts.append(f"guest_halt_poll_ns {poll.read_text().strip()}")
    return "".join(f", {part}" for part in parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter windows, for a smoke run")
    parser.add_argument("--models", default="digits,wide_mlp,small_cnn")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--systems", default="", help="only these (comma-separated)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "serving_results.json")
    parser.add_argument(
        "--pytriton-python", default=os.environ.get("PYTRITON_PYTHON", ""),
        help="a Python with nvidia-pytriton and onnxruntime (benchmarks/pytriton_server.py); "
        "PyTriton is left out without it",
    )  # fmt: skip
    parser.add_argument(
        "--charts", type=Path, default=charts.IMAGES, help="where the two PNG charts go"
    )
    parser.add_argument(
        "--plot-only", type=Path, metavar="RESULTS.json",
        help="redraw the charts (and print the report) from a saved --out file",
    )  # fmt: skip
    args = parser.parse_args()
    if args.plot_only:
        saved = json.loads(args.plot_only.read_text())
        print(report(saved))
        print(*charts.serving(saved, args.charts), sep="\n", file=sys.stderr)
        return
    levels = [int(c) for c in args.concurrency.split(",")]
    chosen = [s for s in SYSTEMS if not args.systems or s in args.systems.split(",")]  # in order
    if "pytriton" in chosen and not args.pytriton_python:
        print("PyTriton left out: no --pytriton-python (or PYTRITON_PYTHON)", file=sys.stderr)
        chosen.remove("pytriton")
    names = args.models.split(",")
    asked = [s for s in args.systems.split(",") if s]
    unknown = [n for n in names if n not in MODELS] + [s for s in asked if s not in SYSTEMS]
    if unknown:
        parser.error(f"unknown model or system: {', '.join(unknown)}")
    total, done = len(names) * len(chosen) * len(levels), 0
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores"
        + (f", {platform.processor()}" if platform.processor() else "")
        + idle_policy(),
        "onnxruntime": ort.__version__,
        "pytriton": pytriton_version(parser, args.pytriton_python)
        if "pytriton" in chosen
        else None,
        "models": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, (model, shape) in build(work).items():
            if name not in names:
                continue
            step(done, total, name, "in-process ONNX Runtime")
            entry: dict[str, Any] = {"in_process": in_process(model, shape, args.quick)}
            for system in chosen:
                server = start(system, work, name, model, args.pytriton_python)
                try:
                    entry[system] = {}
                    for c in levels:
                        done += 1
                        step(done, total, name, system, f"c={c}")
                        entry[system][str(c)] = perf_analyzer(server.port, c, args.quick)
                finally:
                    server.stop()
            results["models"][name] = entry
        if not args.systems:
            print("overload: digits, max_queue_size 8", file=sys.stderr, flush=True)
            results["overload"] = overload(work, args.quick)
    args.out.write_text(json.dumps(results, indent=2))
    print(report(results))
    print(*charts.serving(results, args.charts), sep="\n", file=sys.stderr)


def pytriton_version(parser: argparse.ArgumentParser, python: str) -> str:
    """nvidia-pytriton's version in `python`; a usage error at once where it has none."""
    try:
        out = subprocess.run(
            [python, "-c", "import importlib.metadata as m; print(m.version('nvidia-pytriton'))"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        parser.error(f"--pytriton-python {python}: no nvidia-pytriton there; {PYTRITON_SETUP}")
    return out.stdout.strip()


def overload(work: Path, quick: bool) -> dict[str, Any]:
    # Threaded execution (not inline), so requests reach the bounded queue while one runs.
    inline_off = '\nparameters { key: "execution_inline" value { string_value: "false" } }'
    model = ROOT / "models" / "digits" / "1" / "model.onnx"
    server = daemon(repository(work, "overload", model, BATCHING % 8 + inline_off))
    try:
        seconds = 5 if quick else 15
        rss_before = server.rss_mib()
        runs = []
        for in_flight in (64, 256, 256):
            command = [PYTHON, str(ROOT / "benchmarks" / "loadgen.py"),
                       f"127.0.0.1:{server.port}", "model", "input", "64", str(in_flight),
                       str(seconds)]  # fmt: skip
            out = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
            runs.append(json.loads(out.stdout))
            runs[-1]["rss_after_mib"] = server.rss_mib()
        return {"max_queue_size": 8, "rss_before_mib": rss_before, "runs": runs}
    finally:
        server.stop()


def report(results: dict[str, Any]) -> str:
    lines = [
        f"Run {results['date']} on {results['machine']}, onnxruntime {results['onnxruntime']}",
        "",
    ]
    for name, entry in results["models"].items():
        ip = entry["in_process"]
        c_limit = ip["best"]["samples_per_s"]
        lines += [
            f"### {name}",
            "",
            f"In-process ONNX Runtime: {ip['by_batch']} samples/s by batch size; best "
            f"{c_limit:,.0f}/s at batch {ip['best']['batch']}; batch 1 p50 "
            f"{ip['batch1_p50_ms']:.3f} ms, p99 {ip['batch1_p99_ms']:.3f} ms.",
            "",
            "| concurrency | daemon (aio) | daemon (sync) | daemon, batching off | PyTriton | "
            "naive | no-work sync | no-work aio | L | aio / naive | sync / naive | "
            "aio / PyTriton | sync / no-work | sync / L |",
            "|" + " --- |" * 15,
        ]

        def cell(x: dict[str, float] | None) -> str:
            if not x:
                return "—"
            return f"{x['throughput']:,.0f}/s ({x['p50_ms']:.2f} / {x['p99_ms']:.2f} ms)"

        def ratio(a: dict[str, float] | None, b: dict[str, float] | float | None) -> str:
            base = b["throughput"] if isinstance(b, dict) else b
            return f"{a['throughput'] / base:.2f}" if a and base else "—"

        # --systems may leave any system out (the naive one too): list every level measured.
        levels = sorted(
            {c for system, by_c in entry.items() if system != "in_process" for c in by_c}, key=int
        )
        for c in levels:
            d = entry.get("daemon", {}).get(c)
            sync = entry.get("daemon-sync", {}).get(c)
            nb = entry.get("daemon-nobatch", {}).get(c)
            nv = entry.get("naive", {}).get(c)
            pt = entry.get("pytriton", {}).get(c)
            rs, ra = entry.get("nowork", {}).get(c), entry.get("nowork-aio", {}).get(c)
            r = max(x["throughput"] for x in (rs, ra) if x) if rs or ra else None
            # Without the no-work servers (--systems left them out) there is no R, hence no L.
            limit = charts.combined_limit(entry, c)
            limit_cell = f"{limit:,.0f}/s" if limit else "—"
            lines.append(
                f"| {c} | {cell(d)} | {cell(sync)} | {cell(nb)} | {cell(pt)} | {cell(nv)} | "
                f"{cell(rs)} | {cell(ra)} | {limit_cell} | {ratio(d, nv)} | {ratio(sync, nv)} | "
                f"{ratio(d, pt)} | {ratio(sync, r)} | {ratio(sync, limit)} |"
            )
        lines.append("")
    o = results.get("overload")
    if not o:
        return "\n".join(lines)
    lines += [
        "### Overload (digits, threaded execution, max_queue_size 8)",
        "",
        f"RSS before: {o['rss_before_mib']:.0f} MiB",
        "",
    ]
    for i, run in enumerate(o["runs"], 1):
        lines.append(
            f"- run {i}, {run['offered_concurrency']} in flight: {run['codes']}; "
            f"admitted {run['admitted_per_s']:,.0f}/s "
            f"(p50 {run['admitted']['p50_ms']:.2f} ms, p99 {run['admitted']['p99_ms']:.2f} ms); "
            f"rejected {run['rejected_per_s']:,.0f}/s (p50 {run['rejected']['p50_ms']:.2f} ms, "
            f"p99 {run['rejected']['p99_ms']:.2f} ms); RSS after {run['rss_after_mib']:.0f} MiB"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
