"""What one request costs the server besides time: CPU, system calls and context switches.

    .venv/bin/python benchmarks/syscalls.py [--model digits] [--concurrency 1]
        [--systems daemon,daemon-sync,naive,nowork,nowork-aio] [--seconds 4]

For each system (as in benchmarks/run.py), perf_analyzer holds the load while `perf stat`
counts, over `--seconds`, the server process's futex, epoll_wait, read, write, sendmsg and
recvmsg calls and its context switches, per thread; the totals are divided by the requests
answered in that window (from the throughput perf_analyzer reports). The server's CPU time comes
from /proc. Needs Linux `perf` with tracepoints readable (root, or perf_event_paranoid <= 1).

Why: on a small VM a thread wake-up that crosses cores is the dominant cost of a request at low
concurrency (BENCHMARKS.md "Where concurrency 1 goes"); counting the calls that wake threads
shows which design pays more of them, which throughput alone cannot.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import run  # noqa: E402

EVENTS = ("futex", "epoll_wait", "read", "write", "sendmsg", "recvmsg")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid: int) -> int:
    """User + system clock ticks of every thread of `pid` so far."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{task}/stat").read_text()
        except OSError:
            continue  # a thread that ended meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])
    return total


def measure(
    system: str, work: Path, model: Path, concurrency: int, seconds: float
) -> dict[str, Any]:
    server = run.start(system, work, model.stem, model)
    try:
        load = subprocess.Popen(
            [
                str(run.PERF_ANALYZER),
                "-m",
                "model",
                "-u",
                f"127.0.0.1:{server.port}",
                "-i",
                "grpc",
                "--concurrency-range",
                str(concurrency),
                "-p",
                str(int((seconds + 4) * 1000)),
                "-s",
                "50",
                "-r",
                "3",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        time.sleep(3)  # past perf_analyzer's first window's start
        pid = server.proc.pid
        before = cpu_ticks(pid)
        events = ",".join([*(f"syscalls:sys_enter_{e}" for e in EVENTS), "context-switches"])
        command = ["perf", "stat", "--per-thread", "-x", ",", "-e", events, "-p", str(pid)]
        counted = subprocess.run(
            [*command, "--", "sleep", str(seconds)],
            capture_output=True,
            text=True,
        )
        cpu = (cpu_ticks(pid) - before) / CLOCK_TICKS / seconds
        output = load.communicate(timeout=300)[0]
    finally:
        server.stop()
    rates = [line for line in output.splitlines() if "throughput:" in line]
    if not rates:
        raise RuntimeError(f"{system}: perf_analyzer measured nothing:\n{output[-800:]}")
    throughput = float(rates[-1].split("throughput:")[1].split()[0])
    per_request: collections.Counter[str] = collections.Counter()
    by_thread: collections.Counter[str] = collections.Counter()
    for line in counted.stderr.splitlines():
        # -x , --per-thread: "comm-tid,count,unit,event,..."
        parts = line.split(",")
        if len(parts) < 4 or not parts[1].isdigit():
            continue
        thread, count, event = parts[0], int(parts[1]), parts[3]
        short = event.removeprefix("syscalls:sys_enter_")
        per_request[short] += count
        if short == "futex":
            by_thread[thread.rpartition("-")[0]] += count  # "comm-tid": by the kernel's name
    if not per_request:
        raise RuntimeError(
            f"perf stat counted nothing (root or perf_event_paranoid <= 1?):\n"
            f"{counted.stderr[-800:]}"
        )
    answered = throughput * seconds
    return {
        "throughput": throughput,
        "cpu_us_per_request": cpu / throughput * 1e6,
        "per_request": {k: v / answered for k, v in per_request.items()},
        "futex_by_thread": {k: v / answered for k, v in by_thread.most_common(6)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--systems", default="daemon,daemon-sync,naive,nowork,nowork-aio")
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    if shutil.which("perf") is None:
        sys.exit("needs Linux perf (apt install linux-perf)")
    print(f"machine: {os.cpu_count()} cores{run.idle_policy()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, _ = run.build(work)[args.model]
        header = ["system", "req/s", "CPU us/req", *EVENTS, "ctx switches", "futex by thread comm"]
        print("| " + " | ".join(header) + " |")
        print("|" + " --- |" * len(header))
        for system in args.systems.split(","):
            m = measure(system, work, model, args.concurrency, args.seconds)
            calls = m["per_request"]
            threads = ", ".join(f"{k} {v:.1f}" for k, v in m["futex_by_thread"].items() if v >= 0.1)
            cells = [
                system,
                f"{m['throughput']:,.0f}",
                f"{m['cpu_us_per_request']:.0f}",
                *(f"{calls.get(e, 0):.1f}" for e in EVENTS),
                f"{calls.get('context-switches', 0):.1f}",
                threads,
            ]
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
