"""`edge-agent examples import` (labelled examples into an agent, through SubmitExamples) and
`edge-agent learn start|status|stop` (learning tasks on the control plane; `start --wait` watches
the task until it stops).

Errors are one line on stderr and exit 1; bad arguments exit 2 (argparse).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import json_format

from edge_agent._proto import examples_pb2 as epb
from edge_agent._proto import examples_pb2_grpc as epb_grpc
from edge_agent._proto import fleet_pb2 as pb
from edge_agent._proto import fleet_pb2_grpc as pb_grpc
from edge_agent.common.exits import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK
from edge_agent.common.progress import NULL, Progress, progress
from edge_agent.common.tensors import encode
from edge_agent.errors import ConfigError, EdgeAgentError
from edge_agent.fleet import auth
from edge_agent.fleet.commands import (
    Commands,
    add_actions,
    add_remote_arguments,
    print_json,
    report_failures,
    table,
)
from edge_agent.fleet.connect import channel_credentials, open_channel, upload_missing
from edge_agent.learn.defaults import SERVER_LR_DEFAULTS, TASK_DEFAULTS

# `learn start`'s flags for LearningSpec fields: (flag, type, help); unset ones take the control
# plane's defaults (learn/defaults.py), shown in the help.
SPEC_HELP: tuple[tuple[str, type, str], ...] = (
    ("buffer", int, "K: updates per aggregation, at most the devices taking part"),
    ("min-updates", int, "after max-wait, aggregate once this many are in"),
    ("max-wait", float, "seconds after the oldest waiting update before aggregating fewer"),
    ("min-interval", float, "seconds between a device's runs when nothing changed"),
    ("trainable", str, "all | last:N"),
    ("epochs", int, "local epochs per run"),
    ("batch-size", int, "local batch size"),
    ("lr", float, "local learning rate"),
    ("optimizer", str, "local optimizer: sgd | adam"),
    ("proximal-mu", float, "FedProx: mu/2 |w - w_global|^2 in the local loss"),
    ("server-optimizer", str, "sgd | momentum | adam | yogi | adagrad"),
    ("server-lr", float, "server learning rate"),
    ("server-momentum", float, "momentum's beta"),
    ("server-beta1", float, "adam/yogi beta1"),
    ("server-beta2", float, "adam/yogi beta2"),
    ("server-tau", float, "adaptive optimizers' tau"),
    ("staleness-exponent", float, "a in (1+tau)^-a"),
    ("max-staleness", int, "updates older than this many versions are dropped"),
    ("clip-norm", float, "L2 clip per update (0: off)"),
    ("trim", float, "trimmed-mean share cut from each side"),
    ("aggregator", str, "mean | median (FedMedian)"),
    ("dp-noise-multiplier", float, "central DP: noise std z * clip-norm on each buffer's sum"),
    ("dp-delta", float, "central DP: the delta epsilon is spent at"),
    ("dp-max-epsilon", float, "central DP: the task stops before spending more"),
    ("int8-threshold", int, "int8 deltas above this many elements"),
    ("max-accuracy-drop", float, "the gate: below the best accepted - D, kept out"),
    ("min-examples", int, "a device trains from this many"),
    ("train-seconds", float, "local time budget per run"),
)
SPEC_FLAGS = tuple(flag.replace("-", "_") for flag, _, _ in SPEC_HELP)
CALL_BYTES = 2 << 20  # rows per SubmitExamples call: about this many bytes
# learn start --wait: seconds between status calls (an aggregation takes seconds at the least),
# the state it waits to leave (LearningTask.state), and its exit when Ctrl-C ends the wait.
WAIT_POLL_SECONDS = 2.0
RUNNING = "running"
# A control plane that restarts or fails over answers these for a while: the wait rides them
# out for this long before it gives up (the task runs on either way).
WAIT_TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
WAIT_GIVE_UP_SECONDS = 300.0


def load_npz(path: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except Exception as exc:  # numpy raises ValueError, BadZipFile, OSError, ...
        raise ConfigError(f"{path}: not a readable .npz ({exc})") from exc
    if "labels" not in arrays:
        raise ConfigError(f"{path}: needs a `labels` array (one class index per row)")
    return arrays, arrays.pop("labels")


def import_examples(args: argparse.Namespace) -> int:
    inputs, labels = load_npz(args.data)
    rows = len(labels)
    row_bytes = max(1, sum(v.nbytes // max(1, len(v)) for v in inputs.values()))
    step = max(1, min(4096, CALL_BYTES // row_bytes))
    meta = auth.metadata(auth.read_token(args.token_file)) if args.token_file else ()
    credentials = channel_credentials(args.tls_ca, args.tls_cert, args.tls_key)
    accepted = stored = dropped = 0
    with open_channel(args.url, credentials) as channel:
        stub = epb_grpc.ExampleServiceStub(channel)
        for start in range(0, rows, step):
            request = epb.SubmitExamplesRequest(
                model_name=args.model, labels=labels[start : start + step].tolist()
            )
            for name, value in inputs.items():
                datatype, shape, raw = encode(np.ascontiguousarray(value[start : start + step]))
                request.inputs.add(name=name, datatype=datatype, shape=shape)
                request.raw_input_contents.append(raw)
            answer = stub.SubmitExamples(request, metadata=meta, timeout=60)
            accepted += answer.accepted
            stored, dropped = answer.stored, dropped + answer.dropped
    print(
        f"{args.model}: {accepted} examples accepted; the agent holds {stored} ({dropped} dropped)"
    )
    return EXIT_OK


def _upload_blob(
    stub: pb_grpc.FleetServiceStub, meta: object, path: Path, shown: Progress = NULL
) -> str:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    upload_missing(stub, meta, {digest: path}, shown, f"uploading {path.name}", timeout=600)
    return digest


def _task_line(t: pb.LearningTask) -> str:
    last = t.versions[-1] if t.versions else None
    released = [v for v in t.versions if v.released_version and v.version]
    return (
        f"task {t.id}: {t.spec.model} from v{t.spec.base_version} {t.state}, {t.devices} devices; "
        f"global version {t.global_version}, updates {t.updates_received} received / "
        f"{t.updates_applied} applied / {t.dropped_stale} stale / {t.clipped} clipped / "
        f"{t.refused} refused; accuracy base {t.base_accuracy:.4f}"
        + (f", last candidate {last.accuracy:.4f}" if last and last.version else "")
        + (f"; released v{released[-1].released_version}" if released else "")
        + f"\n  {t.progress}"
        + (f"\n  privacy spent: epsilon {t.dp_epsilon:.3g} at delta {t.spec.dp_delta:g}"
           if t.spec.dp_noise_multiplier else "")
        + (f"\n  device training: {t.train_seconds:.1f} s, of it {t.paused_seconds:.1f} s "
           "paused for serving" if t.train_seconds else "")
    )  # fmt: skip


def learn(args: argparse.Namespace) -> int:
    meta = auth.metadata(auth.read_token(args.token_file))
    credentials = channel_credentials(args.control_plane_ca)
    with open_channel(args.control_plane, credentials) as channel:
        stub = pb_grpc.FleetServiceStub(channel)
        if args.action == "start":
            spec = pb.LearningSpec(
                model=args.model, base_version=args.base_version or 0, scope=pb.FLEET,
                **{key: value for key in SPEC_FLAGS if (value := getattr(args, key)) is not None},
            )  # fmt: skip
            if args.group:
                spec.scope, spec.group = pb.GROUP, args.group
            elif args.canary is not None:
                spec.scope, spec.canary_percent = pb.CANARY, args.canary
            load_npz(args.validation)  # a bad file fails here, not on the control plane
            with progress(enabled=not args.json) as shown:
                spec.validation_blob = _upload_blob(stub, meta, args.validation, shown)
                shown.phase("starting the task")
                task = stub.StartLearning(
                    pb.StartLearningRequest(spec=spec), metadata=meta, timeout=300
                )
            if task.notice:
                print(f"edge-agent learn start: {task.notice}", file=sys.stderr)
            if args.wait:
                return _wait_and_show(stub, meta, task, args.json)
            if args.json:
                print_json(task)
            else:
                print(task.id)
            return EXIT_OK
        if args.action == "stop":
            task = stub.StopLearning(
                pb.StopLearningRequest(task_id=args.task), metadata=meta, timeout=60
            )
            print(json_format.MessageToJson(task) if args.json else _task_line(task))
            return EXIT_OK
        status = stub.LearningStatus(
            pb.LearningStatusRequest(task_id=args.task or 0), metadata=meta, timeout=60
        )
    if args.json:
        print_json(status)
        return EXIT_OK
    _show_tasks(status.tasks)
    return EXIT_OK


def _wait_and_show(
    stub: pb_grpc.FleetServiceStub, meta: object, task: pb.LearningTask, as_json: bool
) -> int:
    """learn start --wait: the id at once (not with --json), then the task watched until it
    stops and shown as `learn status` shows it (with --json, that task alone)."""
    if not as_json:
        print(task.id, flush=True)  # the id is there to copy while the wait goes on
    runs_on = f"task {task.id} runs on (`edge-agent learn stop --task {task.id}` stops it)"
    # SIGTERM (a closed terminal, `timeout`) ends the wait as Ctrl-C does: the display is torn
    # down (rich hides the cursor while it draws) and the hint printed.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with progress(enabled=not as_json) as shown:
            task = _wait(stub, meta, task, shown)
    except KeyboardInterrupt:
        print(f"edge-agent learn start: stopped waiting; {runs_on}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except grpc.RpcError as exc:
        print(
            f"edge-agent learn start: {exc.code().name}: {exc.details()}; stopped waiting; "
            + runs_on,
            file=sys.stderr,
        )
        return EXIT_FAILED
    finally:
        signal.signal(signal.SIGTERM, previous)
    if as_json:
        print_json(task)
    else:
        _show_tasks([task])
    return EXIT_OK


def _wait(
    stub: pb_grpc.FleetServiceStub, meta: object, task: pb.LearningTask, shown: Progress
) -> pb.LearningTask:
    """Poll the task until it is no longer running (`learn stop`, or its privacy budget spent):
    each global version once as it comes, its release when it ships, and the task's state."""
    released: dict[int, int] = {}  # global version -> the release shown for it (0: none yet)
    while True:
        for v in task.versions:
            if v.version not in released:
                shown.line(_version_line(task, v))
            elif v.released_version and not released[v.version]:
                shown.line(f"global v{v.version} released as v{v.released_version}")
            released[v.version] = v.released_version
        shown.status(
            f"task {task.id} {task.state}: v{task.global_version}, best "
            f"{max(task.best_accuracy, task.base_accuracy):.4f}, {task.buffered} buffered, "
            f"{task.active_devices}/{task.devices} active; {task.progress}"
        )
        if task.state != RUNNING:
            return task
        time.sleep(WAIT_POLL_SECONDS)
        task = _poll(stub, meta, task.id, shown)


def _poll(
    stub: pb_grpc.FleetServiceStub, meta: object, task_id: int, shown: Progress
) -> pb.LearningTask:
    """The task's status, retrying WAIT_TRANSIENT answers for up to WAIT_GIVE_UP_SECONDS."""
    failing_since: float | None = None
    while True:
        try:
            request = pb.LearningStatusRequest(task_id=task_id)
            task: pb.LearningTask = stub.LearningStatus(request, metadata=meta, timeout=60).tasks[0]
            return task
        except grpc.RpcError as exc:
            now = time.monotonic()
            failing_since = now if failing_since is None else failing_since
            if exc.code() not in WAIT_TRANSIENT or now - failing_since >= WAIT_GIVE_UP_SECONDS:
                raise
            shown.status(f"task {task_id}: the control plane answered {exc.code().name}; retrying")
            time.sleep(WAIT_POLL_SECONDS)


def _interrupt(signum: int, frame: object) -> None:
    del signum, frame
    raise KeyboardInterrupt


def _version_line(task: pb.LearningTask, v: pb.GlobalVersion) -> str:
    if not v.version:
        return f"global v0 (release v{task.spec.base_version}): accuracy {v.accuracy:.4f}"
    verdict = "accepted" if v.accepted else "kept out by the gate"
    return f"global v{v.version}: accuracy {v.accuracy:.4f}, {verdict}, {v.updates} updates" + (
        f", released as v{v.released_version}" if v.released_version else ""
    )


def _show_tasks(tasks: Sequence[pb.LearningTask]) -> None:
    """`learn status`'s text: each task's line, its global versions, its uplink."""
    for task in tasks:
        print(_task_line(task))
        rows = [
            [
                str(v.version), f"{v.accuracy:.4f}", "yes" if v.accepted else "no",
                f"v{v.released_version}" if v.released_version else "-", str(v.updates),
            ]
            for v in task.versions
        ]  # fmt: skip
        print(table(["GLOBAL", "ACCURACY", "ACCEPTED", "RELEASED", "UPDATES"], rows))
        if task.fp32_bytes_up:
            share = task.bytes_up / task.fp32_bytes_up
            print(f"uplink: {task.bytes_up:,} B, {share:.0%} of the same updates in fp32")


def run(command: str, args: argparse.Namespace) -> int:
    action = import_examples if command == "examples" else learn
    return report_failures(
        command, lambda: action(args), (EdgeAgentError, OSError, json.JSONDecodeError)
    )


def add_arguments(commands: Commands) -> None:
    _add_examples(commands)
    _add_learn(commands)


def _add_examples(commands: Commands) -> None:
    actions = add_actions(commands, "examples", "hand an agent labelled examples")
    imp = actions.add_parser(
        "import",
        help="send the examples of an .npz to an agent (SubmitExamples)",
        description="Send every row of DATA (arrays named after the model's inputs, plus "
        "`labels`: one class index per row) to the agent, which checks and keeps them for "
        "learning.",
    )
    imp.add_argument(
        "--url", default="127.0.0.1:8003", help="HOST:PORT of the agent's control listener"
    )
    imp.add_argument("--model", required=True, help="the model the examples are for")
    imp.add_argument("--data", required=True, type=Path, help=".npz of inputs and labels")
    imp.add_argument("--token-file", type=Path, help="the control listener's bearer token")
    imp.add_argument("--tls-ca", type=Path, help="PEM CA to verify a TLS listener with")
    imp.add_argument("--tls-cert", type=Path, help="PEM client certificate (mTLS)")
    imp.add_argument("--tls-key", type=Path, help="PEM client key (mTLS)")


def _remote(parser: argparse.ArgumentParser) -> None:
    add_remote_arguments(parser, "HOST:PORT", "publisher token", "PEM CA: TLS")


def _add_learn(commands: Commands) -> None:
    steps = add_actions(commands, "learn", "start, watch and stop learning tasks")
    start = steps.add_parser("start", help="start a learning task; prints its id")
    _remote(start)
    start.add_argument("--model", required=True, help="the model to train")
    start.add_argument("--validation", required=True, type=Path, help=".npz with labels: the gate")
    start.add_argument("--base-version", type=int, help="release to start from (newest)")
    where = start.add_mutually_exclusive_group()
    where.add_argument("--group", help="only the devices of this group take part")
    where.add_argument("--canary", type=float, metavar="PCT", help="PCT%% of the devices")
    per_optimizer = ", ".join(f"{k} {v:g}" for k, v in SERVER_LR_DEFAULTS.items())
    for flag, kind, text in SPEC_HELP:
        default = TASK_DEFAULTS.get(flag.replace("-", "_"), "off")
        if flag == "server-lr":
            default = per_optimizer
        start.add_argument(f"--{flag}", type=kind, help=f"{text} ({default})")
    start.add_argument(
        "--wait",
        action="store_true",
        help="print the id, then watch the task until it stops (learn stop, or its privacy "
        "budget spent) and print it as `learn status` does (with --json: that task's JSON "
        "alone, and no id first); on a terminal, each global version's accuracy as it comes. "
        "Ctrl-C or SIGTERM stops the watching, not the task (exit 130); a control plane "
        "unreachable for 5 minutes ends it with exit 1",
    )
    for name in ("status", "stop"):
        step = steps.add_parser(name, help=f"{name} learning tasks")
        _remote(step)
        step.add_argument("--task", type=int, required=name == "stop", help="the task id")
