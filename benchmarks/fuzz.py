"""Fuzzing every listener at scale (BENCHMARKS.md "Fuzzing"):

    .venv/bin/python benchmarks/fuzz.py [--calls 100000] [--examples 200] [--seed 1234]

One daemon and one control plane, started as the test suite starts them (tests/conftest.py),
every listener on:
- the daemon: the gRPC inference listener (inference, system shared memory on, examples for a
  model with accept_examples; load / unload refused there, the default), the gRPC control
  listener (load / unload in explicit model control mode, examples), the HTTP inference and
  HTTP control listeners, a state dir (the example store);
- the control plane: the fleet gRPC listener with a learning key, one digits release, devices
  enrolled and one learning task running that the fuzzing device takes part in, and the
  dashboard.

Two kinds of calls, counted apart (`by_source`):
1. hypothesis: the property-based searches of tests/fuzz_rpcs.py, tests/fuzz_fleet.py and
   tests/fuzz_http.py (what each draws is in their docstrings), `--examples` examples each
   from a fixed seed (`--seed`); random structures, shrinking off (no assertion fails here: the
   answers are tallied);
2. mutation: a fast loop (random.Random(seed)) that takes valid requests of every listener and
   changes one to four things (a protobuf field anywhere in the message set to an edge value
   of its type, a repeated field grown or emptied, a JSON node replaced or removed, bytes
   flipped, cut, spliced or repeated, headers and lengths made wrong), until `--calls` calls
   have been made in total.

Allowed answers: documented gRPC codes, never INTERNAL or UNKNOWN; HTTP statuses below 500 or
503 (overload), and no answer only where the request was cut on purpose (tests/fuzzing.py).
Afterwards both processes must be up and answer normal requests on every listener; their logs
must hold no error (a failed call logs INTERNAL even where the client saw no answer); RSS is
read before the first fuzzed call and after the last. Writes benchmarks/fuzz_results.json and
prints the table; exits 1 if an answer, the logs or the liveness checks were wrong.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import platform
import random
import struct
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import fuzz_fleet  # noqa: E402
import fuzz_http  # noqa: E402
import fuzz_rpcs  # noqa: E402
from fuzzing import EXPECTED_LOG, KNOWN_BUGS, Grpc, Http, Tally, Targets, known_log, weighted  # noqa: E402

from conftest import ControlPlaneProcess, Daemon, Daemons, build_repository  # noqa: E402
from edge_agent._proto import examples_pb2 as epb  # noqa: E402
from edge_agent._proto import fleet_pb2 as fpb  # noqa: E402
from edge_agent._proto import grpc_service_pb2 as pb  # noqa: E402
from edge_agent.fleet import auth, signing  # noqa: E402
from edge_agent.learn import delta  # noqa: E402

DIGITS = ROOT / "models" / "digits"
ACCEPT_EXAMPLES = '\nparameters { key: "accept_examples" value: { string_value: "true" } }\n'
REGION_SIZES = [1, 256, 4096, 1 << 20]
DEVICES = 64  # enrolled; the main task's buffer is this many updates


class _Quiet:
    """Keeps only the start event and errors of a process's JSON log (a fuzz run logs a
    warning per refused call: parsing them all would cost the fuzzer's CPU)."""

    STARTED: str
    events: list[dict[str, Any]]
    proc: subprocess.Popen[str]
    _started: Any

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if self.STARTED in line or '"level": "error"' in line or '"level": "critical"' in line:
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    event = {"event": "unparsed", "line": line[:500]}
                self.events.append(event)
                if event.get("event") == self.STARTED:
                    self._started.set()
        self._started.set()


class QuietDaemon(_Quiet, Daemon):
    pass


class QuietControlPlane(_Quiet, ControlPlaneProcess):
    pass


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def cli(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "edge_agent", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        raise RuntimeError(f"edge-agent {args[0]}: {done.stderr[-2000:]}")
    return done.stdout


# -- the targets -------------------------------------------------------------------------------


def start_daemon(tmp: Path, daemons: Daemons) -> Daemon:
    repo = build_repository(tmp / "repo")
    config = repo / "digits" / "config.pbtxt"
    config.write_text(config.read_text() + ACCEPT_EXAMPLES)
    return daemons.start(
        "--model-repository",
        str(repo),
        "--execution-providers",
        "cpu",
        "--http-address",
        "127.0.0.1:0",
        "--http-control-address",
        "127.0.0.1:0",
        "--allow-shared-memory",
        "--state-dir",
        str(tmp / "state"),
        "--model-control-mode",
        "explicit",
        "--load-model",
        "*",
        env={
            "EDGE_AGENT_CONTROL_ON_INFERENCE_LISTENER": "false",
            "EDGE_AGENT_EXAMPLES_MAX_BYTES": str(4 << 20),
        },
        kind=QuietDaemon,
    )


def start_control_plane(tmp: Path, daemons: Daemons) -> Daemon:
    key = tmp / "learning.pem"
    signing.generate_keypair(key, tmp / "learning.pub")
    return daemons.start(
        "--data-dir",
        str(tmp / "cp"),
        "--learning-key",
        str(key),
        "--dashboard-address",
        "127.0.0.1:0",
        "--device-rate",
        "1000000",
        "--publisher-rate",
        "1000000",
        kind=QuietControlPlane,
    )


def prepare_learning(tmp: Path, targets: Targets) -> None:
    """Devices enrolled, the digits model published, a validation set uploaded, a task started
    and its trainable tensors read back the way a device reads them."""
    import grpc

    channel = grpc.insecure_channel(targets.control_plane)
    publisher = auth.metadata(targets.publisher_token)

    def unary(method: str, request: Any, response: Any, meta: Any = publisher) -> Any:
        call = channel.unary_unary(
            f"/edge_agent.fleet.v1.FleetService/{method}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=response.FromString,
        )
        return call(request, metadata=meta, timeout=60)

    enroll = fpb.EnrollDevicesRequest()
    for i in range(DEVICES):
        enroll.devices.add(device_id=f"fuzz-{i}")
    tokens = unary("EnrollDevices", enroll, fpb.EnrollDevicesResponse).tokens
    targets.device_id, targets.device_token = tokens[0].device_id, tokens[0].token
    signing_key = tmp / "signing.pem"
    signing.generate_keypair(signing_key, tmp / "signing.pub")
    token_file = tmp / "publisher.token"
    token_file.write_text(targets.publisher_token + "\n")
    cli(
        "publish",
        str(DIGITS / "1" / "model.onnx"),
        "--model",
        "digits",
        "--version",
        "1",
        "--control-plane",
        targets.control_plane,
        "--signing-key",
        str(signing_key),
        "--token-file",
        str(token_file),
    )
    data = np.load(DIGITS / "validation.npz")
    validation = tmp / "validation.npz"
    np.savez(validation, input=data["input"][:40].astype(np.float32), labels=data["labels"][:40])
    blob = validation.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    upload = channel.stream_unary(
        "/edge_agent.fleet.v1.FleetService/UploadBlob",
        request_serializer=fpb.UploadBlobRequest.SerializeToString,
        response_deserializer=fpb.UploadBlobResponse.FromString,
    )
    upload(
        iter([fpb.UploadBlobRequest(digest=digest, size=len(blob), data=blob)]),
        metadata=publisher,
        timeout=60,
    )
    targets.validation_blob = digest
    spec = fuzz_fleet.valid_spec(targets)
    task = unary("StartLearning", fpb.StartLearningRequest(spec=spec), fpb.LearningTask)
    targets.task_id = task.id
    device = auth.metadata(targets.device_token, targets.device_id)
    desired = unary("WatchDesiredState", fpb.WatchRequest(wait_ms=0), fpb.DesiredState, device)
    (assignment,) = [a for a in desired.learning if a.task_id == task.id]
    chunks = channel.unary_stream(
        "/edge_agent.fleet.v1.FleetService/GetBlob",
        request_serializer=fpb.GetBlobRequest.SerializeToString,
        response_deserializer=fpb.BlobChunk.FromString,
    )(fpb.GetBlobRequest(digest=assignment.global_weights.digest), metadata=device, timeout=60)
    weights = delta.decode(b"".join(c.data for c in chunks))
    targets.trainable = {name: list(value.shape) for name, value in weights.items()}
    channel.close()


def warm_learning(targets: Targets) -> None:
    """One aggregation of the main task (its first loads ONNX Runtime: not a leak)."""
    cp = fuzz_fleet.ControlPlane(targets, Tally())
    updates = fuzz_fleet.Updates(targets, cp)
    for i in range(DEVICES):
        code, _ = cp.call(updates.method, updates.valid(f"warm-{i}"), cp.device)
        assert code.name == "OK", code
    # A task with differential privacy: the control plane imports its accountant once.
    dp = fuzz_fleet.valid_spec(targets)
    dp.dp_noise_multiplier, dp.clip_norm, dp.dp_delta = 1.0, 1.0, 1e-5
    by_name = fuzz_fleet.SERVICE.methods_by_name
    answer = cp.call(
        by_name["StartLearning"],
        fpb.StartLearningRequest(spec=dp).SerializeToString(),
        cp.publisher,
    )
    assert answer[0].name in ("OK", "FAILED_PRECONDITION"), answer  # (without the extra)
    fuzz_fleet.started(cp, answer)
    status = fpb.LearningStatusRequest(task_id=targets.task_id).SerializeToString()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # the aggregation runs after the last update's answer
        code, answer = cp.call(
            fuzz_fleet.SERVICE.methods_by_name["LearningStatus"], status, cp.publisher
        )
        if (
            code.name == "OK"
            and len(fpb.LearningStatusResponse.FromString(answer).tasks[0].versions) > 1
        ):
            break
        time.sleep(0.2)
    cp.close()


def create_regions(targets: Targets) -> None:
    """System shared memory regions of this run only (removed at its end)."""
    targets.shm_prefix = f"/edge-agent-fuzz-{os.getpid()}"
    for i, size in enumerate(REGION_SIZES):
        key = f"{targets.shm_prefix}-{i}"
        fd = os.open(f"/dev/shm/{key[1:]}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(fd, size)
        os.close(fd)
        targets.shm_regions[key] = size


def remove_regions(targets: Targets) -> None:
    for key in targets.shm_regions:
        Path(f"/dev/shm/{key[1:]}").unlink(missing_ok=True)


# -- afterwards ----------------------------------------------------------------------------


def alive(targets: Targets, daemon: Daemon, cp: Daemon) -> dict[str, bool]:
    """Normal requests on every listener, after the fuzzing."""
    tally = Tally()
    checks: dict[str, bool] = {
        "daemon_process": daemon.proc.poll() is None,
        "control_plane_process": cp.proc.poll() is None,
    }
    inference, control = Grpc(targets.daemon_grpc, tally), Grpc(targets.daemon_control, tally)
    infer = fuzz_rpcs.digits_request(2).SerializeToString()
    code, answer = inference.call("check", fuzz_rpcs.INFER, infer)
    checks["grpc_inference"] = (
        code.name == "OK" and len(pb.ModelInferResponse.FromString(answer).outputs) == 2
    )
    code, _ = control.call("check", f"/{fuzz_rpcs.SERVICE.full_name}/RepositoryIndex", b"")
    checks["grpc_control"] = code.name == "OK"
    examples = fuzz_rpcs.valid_examples(2).SerializeToString()
    code, answer = control.call("check", fuzz_rpcs.SUBMIT, examples)
    checks["grpc_examples"] = (
        code.name == "OK" and epb.SubmitExamplesResponse.FromString(answer).accepted == 2
    )
    region = f"{targets.shm_prefix}-1"
    register = pb.SystemSharedMemoryRegisterRequest(name="check", key=region, byte_size=256)
    struct.pack_into("<64f", memory := bytearray(256), 0, *([0.5] * 64))
    with open(f"/dev/shm/{region[1:]}", "r+b") as f:
        f.write(memory)
    code, _ = inference.call(
        "check",
        f"/{fuzz_rpcs.SERVICE.full_name}/SystemSharedMemoryRegister",
        register.SerializeToString(),
    )
    request = fuzz_rpcs.shm_infer(fuzz_rpcs.digits_request(), "check", 0, 256, False)
    code2, _ = inference.call("check", fuzz_rpcs.INFER, request.SerializeToString())
    checks["grpc_shared_memory"] = code.name == "OK" and code2.name == "OK"
    body = json.dumps(fuzz_http.TEMPLATES[0]).encode()
    status, data = Http(targets.daemon_http, tally).request(
        "check", "POST", "/v2/models/digits/infer", body
    )
    checks["http_inference"] = status == 200 and json.loads(data)["outputs"] != []
    status, _ = Http(targets.daemon_http_control, tally).request(
        "check", "POST", "/v2/repository/index", b"{}"
    )
    checks["http_control"] = status == 200
    fleet = fuzz_fleet.ControlPlane(targets, tally)
    by_name = fuzz_fleet.SERVICE.methods_by_name
    code, answer = fleet.call(by_name["FleetStatus"], b"", fleet.publisher)
    checks["grpc_fleet"] = code.name == "OK" and bool(
        fpb.FleetStatusResponse.FromString(answer).devices
    )
    status_request = fpb.LearningStatusRequest(task_id=targets.task_id).SerializeToString()
    code, answer = fleet.call(by_name["LearningStatus"], status_request, fleet.publisher)
    task = fpb.LearningStatusResponse.FromString(answer).tasks[0] if code.name == "OK" else None
    checks["grpc_learning"] = (
        task is not None and task.state == "running" and task.updates_received > 0
    )
    board = Http(targets.dashboard, tally)
    good = {"Authorization": f"Bearer {targets.publisher_token}"}
    checks["dashboard"] = all(
        board.request("check", "GET", page, None, good)[0] == 200 for page in fuzz_http.PAGES[:4]
    )
    return checks


def learning_tasks(targets: Targets) -> int:
    """Tasks on the control plane (the fuzzed StartLearning calls that passed, then stopped)."""
    cp = fuzz_fleet.ControlPlane(targets, Tally())
    method = fuzz_fleet.SERVICE.methods_by_name["LearningStatus"]
    code, answer = cp.call(method, b"", cp.publisher)
    return len(fpb.LearningStatusResponse.FromString(answer).tasks) if code.name == "OK" else -1


def probe_known(targets: Targets) -> dict[str, bool]:
    """Whether each of KNOWN_BUGS still gives its wrong answer (one fixed request each)."""
    tally = Tally()
    inference, control = Grpc(targets.daemon_grpc, tally), Grpc(targets.daemon_control, tally)
    request = fuzz_rpcs.digits_request()
    request.model_version = "²"
    code, _ = inference.call("probe", fuzz_rpcs.INFER, request.SerializeToString())
    load = pb.RepositoryModelLoadRequest(model_name="echo")
    load.parameters["file:²/model.onnx"].bytes_param = b"not a model"
    code2, _ = control.call(
        "probe", f"/{fuzz_rpcs.SERVICE.full_name}/RepositoryModelLoad", load.SerializeToString()
    )
    code3, _ = inference.call("probe", "/grpc.health.v1.Health/Check", b"\xff")
    load = pb.RepositoryModelLoadRequest(model_name="echo")
    load.parameters["config"].string_param = "[" * 1000
    code4, _ = control.call(
        "probe", f"/{fuzz_rpcs.SERVICE.full_name}/RepositoryModelLoad", load.SerializeToString()
    )
    # Found by this fuzzing and fixed: a Unicode digit as a version (infer, file:), a config
    # nested too deep, bytes that do not parse sent to health. Replayed here: each must be
    # refused as a bad request.
    fixed = {code.name, code2.name, code3.name, code4.name}
    assert fixed <= {"INVALID_ARGUMENT", "NOT_FOUND", "UNAVAILABLE"}, fixed
    return {}


def regressions(targets: Targets) -> dict[str, bool]:
    """The wrong answers this fuzzing found and that were fixed, replayed: name -> right now."""
    tally = Tally()
    return {
        **fuzz_http.regressions(targets, tally),
        **fuzz_fleet.regressions(targets, tally),
    }


def errors_logged(process: Daemon, since: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Error lines logged since event `since`: those no known bug explains, and the count of
    those it does (by bug)."""
    unexplained, known = [], collections.Counter[str]()
    for e in process.events[since:]:
        if e.get("event") in (process.STARTED, *EXPECTED_LOG):
            continue
        name = known_log(e)
        if name is None:
            unexplained.append(e)
        else:
            known[name] += 1
    return unexplained, dict(known)


def kinds(events: list[dict[str, Any]]) -> dict[str, int]:
    """Error events by name and the last line of their traceback."""
    out: collections.Counter[str] = collections.Counter()
    for e in events:
        last = (e.get("exception") or "").strip().splitlines()[-1:] or [""]
        out[f"{e.get('event')}: {last[0]}"[:240]] += 1
    return dict(out.most_common())


# -- the run --------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    daemons = Daemons()
    targets = Targets()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        try:
            started = time.monotonic()
            daemon = start_daemon(tmp, daemons)
            cp = start_control_plane(tmp, daemons)
            daemon.wait_started()
            cp.wait_started()
            info = daemon.named(daemon.STARTED)[0]
            targets.daemon_grpc = daemon.url
            targets.daemon_control = daemon.control_url
            targets.daemon_http = f"127.0.0.1:{info['http_port']}"
            targets.daemon_http_control = f"127.0.0.1:{info['http_control_port']}"
            cp_info = cp.named(cp.STARTED)[0]
            targets.control_plane = cp.url
            targets.dashboard = f"127.0.0.1:{cp_info['dashboard_port']}"
            targets.publisher_token = auth.read_token(tmp / "cp" / "publisher.token")
            create_regions(targets)
            prepare_learning(tmp, targets)
            setup_s = time.monotonic() - started
            tally = Tally()
            rng = random.Random(args.seed)
            warm = [
                c
                for _, c in fuzz_rpcs.mutations(targets, Tally())
                + fuzz_http.daemon_mutations(targets, Tally())
                + fuzz_fleet.mutations(targets, Tally())
                + fuzz_http.dashboard_mutations(targets, Tally())
            ]
            for case in warm:  # first calls allocate what every later one reuses
                case(random.Random(0))
            warm_learning(targets)
            rss_before = {"daemon": rss_mib(daemon.proc.pid), "control_plane": rss_mib(cp.proc.pid)}
            since = {"daemon": len(daemon.events), "control_plane": len(cp.events)}
            fixed = regressions(targets)  # first: the dashboard's login limit is not spent yet
            started = time.monotonic()
            searches = [
                *fuzz_rpcs.fuzzers(targets, tally, args.examples, args.seed),
                *fuzz_http.daemon_fuzzers(targets, tally, args.examples, args.seed),
                *fuzz_fleet.fuzzers(targets, tally, args.examples, args.seed),
                *fuzz_http.dashboard_fuzzers(targets, tally, args.examples, args.seed),
            ]
            for search in searches:
                before = tally.calls
                search()
                progress(
                    f"hypothesis {search.__name__}: {tally.calls - before} calls", started, tally
                )
            hypothesis_s = time.monotonic() - started
            tally.source = "mutation"
            cases = weighted(
                rng,
                fuzz_rpcs.mutations(targets, tally)
                + fuzz_http.daemon_mutations(targets, tally)
                + fuzz_fleet.mutations(targets, tally)
                + fuzz_http.dashboard_mutations(targets, tally),
            )
            next_report = tally.calls + 10_000
            samples: list[list[float]] = []  # [calls, daemon MiB, control plane MiB]
            cost: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
            while tally.calls < args.calls:
                case, calls, at = next(cases), tally.calls, time.perf_counter()
                case(rng)
                spent = cost[f"{case.__module__}.{case.__name__}"]
                spent[0] += tally.calls - calls
                spent[1] += time.perf_counter() - at
                if tally.calls >= next_report:
                    progress("mutation", started, tally)
                    samples.append([tally.calls, rss_mib(daemon.proc.pid), rss_mib(cp.proc.pid)])
                    next_report += 10_000
            fuzz_s = time.monotonic() - started
            time.sleep(1.0)  # what the last calls started (an aggregation) finishes
            checks = alive(targets, daemon, cp)
            tasks = learning_tasks(targets)
            reproduces = probe_known(targets)
            rss_after = {"daemon": rss_mib(daemon.proc.pid), "control_plane": rss_mib(cp.proc.pid)}
            logged = {
                "daemon": errors_logged(daemon, since["daemon"]),
                "control_plane": errors_logged(cp, since["control_plane"]),
            }
        finally:
            daemons.stop_all()
            remove_regions(targets)
    summary = tally.summary()
    codes = [s for answers in summary["answers"].values() for s in answers]
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "command": " ".join(["benchmarks/fuzz.py", *sys.argv[1:]]),
        "seed": args.seed,
        "examples_per_search": args.examples,
        **summary,
        "internal_or_unknown": sum(
            n
            for a in summary["answers"].values()
            for s, n in a.items()
            if s in ("INTERNAL", "UNKNOWN")
        ),
        "http_5xx_not_503": sum(
            n
            for a in summary["answers"].values()
            for s, n in a.items()
            if s.isdigit() and int(s) >= 500 and s != "503"
        ),
        "http_500": sum(a.get("500", 0) for a in summary["answers"].values()),
        "of_them_known": sum(summary["known"].values()),
        "statuses_seen": sorted(set(codes)),
        "known_bugs": {
            name: {"what": KNOWN_BUGS[name], "reproduces": reproduces[name]} for name in KNOWN_BUGS
        },
        "regressions": fixed,
        "mutation_cases": {
            name: {"calls": int(n), "seconds": round(t, 1)} for name, (n, t) in sorted(cost.items())
        },
        "errors_logged": {k: len(v) for k, (v, _) in logged.items()},
        "errors_logged_known": {k: known for k, (_, known) in logged.items()},
        "errors_logged_kinds": {k: kinds(v) for k, (v, _) in logged.items()},
        "errors_logged_first": {k: v[:3] for k, (v, _) in logged.items()},
        "alive": checks,
        "rss_mib": {"before": rss_before, "after": rss_after, "every_10k_calls": samples},
        "learning_tasks_at_end": tasks,
        "seconds": {
            "setup": round(setup_s, 1),
            "hypothesis": round(hypothesis_s, 1),
            "total_fuzz": round(fuzz_s, 1),
        },
        "calls_per_second": round(summary["calls"] / fuzz_s, 1),
    }


def machine() -> str:
    model = ""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{os.cpu_count()} cores (nproc), {model or platform.processor() or platform.machine()}"


def progress(what: str, started: float, tally: Tally) -> None:
    print(
        f"  [{time.monotonic() - started:7.1f} s] {what}; {tally.calls} calls in all",
        file=sys.stderr,
        flush=True,
    )


def passed(result: dict[str, Any]) -> bool:
    """No wrong answer but the known bugs', each of those still reproducing (a fixed one must
    leave KNOWN_BUGS), every fixed one right, no unexplained error logged, all alive."""
    explained = (
        result["internal_or_unknown"] + result["http_5xx_not_503"] == result["of_them_known"]
    )
    return (
        not result["bad"]
        and explained
        and all(result["regressions"].values())
        and all(b["reproduces"] for b in result["known_bugs"].values())
        and not any(result["errors_logged"].values())
        and all(result["alive"].values())
    )


def table(result: dict[str, Any]) -> str:
    lines = ["| listener | calls | answers by status |", "| --- | ---: | --- |"]
    for listener, answers in result["answers"].items():
        text = ", ".join(f"{s} {n:,}" for s, n in sorted(answers.items(), key=lambda kv: -kv[1]))
        lines.append(f"| {listener} | {sum(answers.values()):,} | {text} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=100_000, help="calls in all (both kinds)")
    parser.add_argument("--examples", type=int, default=200, help="examples per hypothesis search")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "fuzz_results.json")
    args = parser.parse_args()
    result = run(args)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(
        f"{result['calls']:,} calls ({result['by_source']}) in "
        f"{result['seconds']['total_fuzz']} s; "
        f"INTERNAL/UNKNOWN {result['internal_or_unknown']}, HTTP 5xx (not 503) "
        f"{result['http_5xx_not_503']}, of them known bugs {result['of_them_known']}; errors "
        f"logged {result['errors_logged']}; alive "
        f"{all(result['alive'].values())}; RSS MiB {result['rss_mib']}"
    )
    for line in result["bad"]:
        print("BAD", line)
    for name, ok in result["regressions"].items():
        if not ok:
            print("REGRESSION", name)
    print("known:", json.dumps(result["known"]), json.dumps(result["errors_logged_known"]))
    sys.exit(0 if passed(result) else 1)


if __name__ == "__main__":
    main()
