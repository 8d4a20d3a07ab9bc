"""`edge-agent optimize MODEL.onnx --mode MODE --out OUT.onnx [...]`.

Exit 0: OUT written (and the report). Exit 1: an error (one line on stderr, nothing at OUT), or
the accuracy drop exceeded --max-accuracy-drop (the report is still written; OUT is not).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx

from edge_agent.common.exits import EXIT_FAILED, EXIT_OK
from edge_agent.common.files import write_atomically
from edge_agent.common.progress import NULL, Progress, progress
from edge_agent.compress import modes, report
from edge_agent.compress.data import load_set
from edge_agent.errors import EdgeAgentError, InvalidArgument


def add_arguments(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    opt = commands.add_parser("optimize", help="compress a model (int8, fp16, prune) and report")
    opt.add_argument("model_file", type=Path, metavar="MODEL.onnx", help="the model to compress")
    opt.add_argument(
        "--mode",
        required=True,
        choices=modes.MODES,
        help="int8-dynamic: int8 weights, activations quantized as it runs; int8-static: int8 "
        "weights and activations (QDQ, ranges from --calibration); fp16: float16 weights and "
        "compute; prune: zero the smallest --sparsity share of each weight matrix",
    )
    opt.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="OUT.onnx",
        help="the compressed model (not written when --max-accuracy-drop refuses it)",
    )
    opt.add_argument("--calibration", type=Path, metavar="NPZ", help="int8-static: inputs")
    opt.add_argument(
        "--validation", type=Path, metavar="NPZ", help="inputs (+ `labels`) to measure accuracy"
    )
    opt.add_argument(
        "--report",
        type=Path,
        metavar="REPORT.json",
        help="also write the report (sizes, accuracy, latency) here as JSON, OUT refused or not",
    )
    opt.add_argument("--sparsity", type=float, default=0.5, help="prune: share of weights zeroed")
    opt.add_argument(
        "--max-accuracy-drop",
        type=float,
        metavar="D",
        help="refuse OUT when accuracy falls by more than D (0.01 = one point); needs labels",
    )
    opt.add_argument(
        "--fine-tune",
        type=Path,
        metavar="DATA.npz",
        help="prune: then train on these labelled examples with the pruning mask held fixed "
        "(needs edge-agent[learn])",
    )
    opt.add_argument("--fine-tune-epochs", type=int, default=20, help="fine-tune: epochs (20)")
    opt.add_argument("--fine-tune-lr", type=float, default=0.001, help="fine-tune: Adam lr")
    opt.add_argument(
        "--fp16-io",
        action="store_true",
        help="fp16: make inputs and outputs float16 too (default: they stay float32)",
    )
    opt.add_argument(
        "--fp16-block-ops",
        default="",
        metavar="OP,OP",
        help="fp16: more op types to keep in float32 (beyond ONNX Runtime's default list)",
    )


def add_distill_arguments(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    dist = commands.add_parser(
        "distill",
        help="train a smaller student on a teacher's soft outputs, and report",
        description="Knowledge distillation (needs edge-agent[learn]): the student learns the "
        "teacher's softened outputs (temperature T) and, where DATA has labels, the labels "
        "(weight 1 - alpha). The report compares the student with the teacher.",
    )
    dist.add_argument(
        "--teacher", required=True, type=Path, metavar="T.onnx", help="the model to learn from"
    )
    dist.add_argument(
        "--student",
        required=True,
        type=Path,
        metavar="S.onnx",
        help="the smaller model to train, from its weights in this file",
    )
    dist.add_argument("--data", required=True, type=Path, metavar="X.npz", help="training inputs")
    dist.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="OUT.onnx",
        help="the trained student (not written when --max-accuracy-drop refuses it)",
    )
    dist.add_argument("--temperature", type=float, default=4.0, help="T (4)")
    dist.add_argument("--alpha", type=float, default=0.7, help="weight of the soft loss (0.7)")
    dist.add_argument("--epochs", type=int, default=30, help="training epochs (30)")
    dist.add_argument("--lr", type=float, default=0.003, help="Adam learning rate (0.003)")
    dist.add_argument(
        "--validation", type=Path, metavar="NPZ", help="inputs + labels to measure (default DATA)"
    )
    dist.add_argument(
        "--report",
        type=Path,
        metavar="REPORT.json",
        help="also write the report (student against teacher) here as JSON, OUT refused or not",
    )
    dist.add_argument(
        "--max-accuracy-drop",
        type=float,
        metavar="D",
        help="refuse OUT when the student is more than D below the teacher; needs labels",
    )


def _epochs(shown: Progress, total: int) -> Callable[[int, float], None]:
    """The training's after-epoch callback, shown as epoch N of `total` with its loss."""
    return lambda done, loss: shown.epoch(done, total, loss)


def build_distilled(args: argparse.Namespace, shown: Progress = NULL) -> dict[str, Any]:
    from edge_agent.compress.finetune import distill

    shown.phase("loading the models and data")
    teacher, student = _load_model(args.teacher), _load_model(args.student)
    feeds, labels = load_set(args.data, student, "data")
    validation, val_labels = (
        load_set(args.validation, student, "validation")
        if args.validation is not None
        else (feeds, labels)
    )
    if args.max_accuracy_drop is not None and val_labels is None:
        raise InvalidArgument("--max-accuracy-drop needs labels in the validation set")
    shown.phase(f"distilling ({args.epochs} epochs)")
    out = distill(
        teacher, student, feeds, labels, args.temperature, args.alpha, args.epochs, args.lr,
        on_epoch=_epochs(shown, args.epochs),
    )  # fmt: skip
    data = out.SerializeToString()
    teacher_bytes = args.teacher.read_bytes()
    teacher_session = report.session(teacher.SerializeToString())
    shown.phase("measuring sizes")
    sizes = _sizes(teacher, teacher_bytes, out, data)
    shown.phase("measuring accuracy")
    accuracy = report.accuracy_report(teacher_session, report.session(data), validation, val_labels)
    shown.phase("measuring latency")
    latency = report.latency_report(teacher, teacher_session, report.session(data), validation)
    result: dict[str, Any] = {
        "mode": "distill",
        "model": str(args.teacher),
        "student": str(args.student),
        "out": str(args.out),
        "temperature": args.temperature,
        "alpha": args.alpha,
        **sizes,
        "validation": accuracy,
        "latency_ms_median": latency,
        "max_accuracy_drop": args.max_accuracy_drop,
    }
    if val_labels is not None:
        shown.phase("measuring the untrained student")
        untrained = report.accuracy_report(
            teacher_session, report.session(student.SerializeToString()), validation, val_labels
        )
        result["validation"]["student_accuracy_before"] = untrained["accuracy_after"]
    drop = result["validation"].get("accuracy_drop")
    result["accepted"] = args.max_accuracy_drop is None or drop <= args.max_accuracy_drop
    result["_model_bytes"] = data
    return result


def _sizes(
    before: onnx.ModelProto, before_bytes: bytes, after: onnx.ModelProto, after_bytes: bytes
) -> dict[str, Any]:
    """The report's size entries, before and after: bytes, parameters, compressed bytes."""
    return {
        "size_bytes": {"before": len(before_bytes), "after": len(after_bytes)},
        "compression_rate": (len(before_bytes) - len(after_bytes)) / len(before_bytes),
        "parameters": {"before": report.parameters(before), "after": report.parameters(after)},
        "compressed_size_bytes": {
            "before": report.compressed_sizes(before_bytes),
            "after": report.compressed_sizes(after_bytes),
        },
    }


def _write_atomically(path: Path, data: bytes) -> None:
    """OUT is whole or absent (common/files.write_atomically), in a directory made if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, data)


def _load_model(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError, OSError, ValueError...
        raise InvalidArgument(f"{path} is not a readable ONNX model ({exc})") from exc


def build(args: argparse.Namespace, shown: Progress = NULL) -> dict[str, Any]:
    shown.phase("loading the model and data")
    source = _load_model(args.model_file)
    calibration = validation = labels = None
    if args.calibration is not None:
        calibration, _ = load_set(args.calibration, source, "calibration")
    if args.validation is not None:
        validation, labels = load_set(args.validation, source, "validation")
    if args.fine_tune is not None and args.mode != "prune":
        # Before any work: not after minutes of quantizing.
        raise InvalidArgument("--fine-tune goes with --mode prune")
    if args.mode == "int8-static" and calibration is None:
        raise InvalidArgument("mode int8-static needs --calibration NPZ (inputs to calibrate on)")
    if args.max_accuracy_drop is not None and labels is None:
        raise InvalidArgument(
            "--max-accuracy-drop needs --validation with `labels` (class indices): "
            + ("no --validation given" if validation is None else f"{args.validation} has none")
        )
    if args.mode == "int8-dynamic":
        shown.phase("quantizing (int8-dynamic)")
        model = modes.int8_dynamic(args.model_file)
    elif args.mode == "int8-static":
        assert calibration is not None
        model = modes.int8_static(args.model_file, calibration, shown.phase)
    elif args.mode == "fp16":
        shown.phase("converting to fp16")
        blocked = [op.strip() for op in args.fp16_block_ops.split(",") if op.strip()]
        model = modes.fp16(args.model_file, not args.fp16_io, blocked)
    else:
        shown.phase(f"pruning {args.sparsity:.0%} of each weight matrix")
        model = modes.prune(args.model_file, args.sparsity)
        if args.fine_tune is not None:
            from edge_agent.compress.finetune import fine_tune

            feeds, tune_labels = load_set(args.fine_tune, source, "fine-tune")
            shown.phase(f"fine-tuning ({args.fine_tune_epochs} epochs, the mask held)")
            model = fine_tune(
                model, feeds, tune_labels, args.fine_tune_epochs, args.fine_tune_lr,
                on_epoch=_epochs(shown, args.fine_tune_epochs),
            )  # fmt: skip
    data = model.SerializeToString()
    try:
        after = report.session(data)
    except Exception as exc:  # ORT's own exception types
        raise InvalidArgument(
            f"mode {args.mode}: the result does not load in ONNX Runtime (an op this mode "
            f"cannot handle?): {str(exc).splitlines()[0][:300]}"
        ) from exc
    before = report.session(source.SerializeToString())
    source_bytes = args.model_file.read_bytes()
    shown.phase("measuring sizes")
    sizes = _sizes(source, source_bytes, model, data)
    shown.phase("measuring latency")
    latency = report.latency_report(source, before, after, validation)
    result: dict[str, Any] = {
        "mode": args.mode,
        "model": str(args.model_file),
        "out": str(args.out),
        **sizes,
        "validation": None,
        "latency_ms_median": latency,
        "max_accuracy_drop": args.max_accuracy_drop,
    }
    if args.mode == "prune":
        result["sparsity"] = args.sparsity
        result["fine_tuned"] = args.fine_tune is not None
    if validation is not None:
        shown.phase(f"measuring accuracy on {args.validation.name}")
        result["validation"] = report.accuracy_report(before, after, validation, labels)
    drop = (result["validation"] or {}).get("accuracy_drop")
    result["accepted"] = args.max_accuracy_drop is None or drop <= args.max_accuracy_drop
    result["_model_bytes"] = data
    return result


def _table(result: dict[str, Any]) -> str:
    size = result["size_bytes"]
    lines = [
        f"mode {result['mode']}: {result['model']} -> {result['out']}",
        f"  size            {size['before']:>12,} B -> {size['after']:>12,} B  "
        f"(compression_rate {result['compression_rate']:.3f})",
    ]
    for kind, before in result["compressed_size_bytes"]["before"].items():
        after = result["compressed_size_bytes"]["after"][kind]
        lines.append(f"  {kind + ' size':<15} {before:>12,} B -> {after:>12,} B")
    params = result["parameters"]
    lines.append(
        f"  parameters      {params['before']['total']:>12,}   -> {params['after']['total']:>12,}"
        f"    (nonzero {params['after']['nonzero']:,})"
    )
    v = result["validation"]
    if v:
        lines.append(
            f"  validation      {v['rows']} rows on '{v['output']}': top1_agreement "
            f"{v['top1_agreement']:.4f}, max_abs_error {v['max_abs_error']:.3g}"
        )
        if "accuracy_before" in v:
            lines.append(
                f"  accuracy        {v['accuracy_before']:.4f} -> {v['accuracy_after']:.4f} "
                f"(change {-v['accuracy_drop']:+.4f})"
            )
    for batch, times in result["latency_ms_median"].items():
        if times is None:
            lines.append(f"  latency b={batch:<3}   (fixed batch size: not measured)")
        else:
            lines.append(
                f"  latency b={batch:<3}   {times['before']:>9.3f} ms -> {times['after']:>9.3f} ms"
                " (CPU, median)"
            )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        # The phases and epochs on a terminal (stderr), done before anything below is printed.
        with progress() as shown:
            build_one = build_distilled if args.command == "distill" else build
            result = build_one(args, shown)
    except (EdgeAgentError, OSError) as exc:
        print(f"edge-agent {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    data = result.pop("_model_bytes")
    print(_table(result))
    if args.report is not None:
        _write_atomically(args.report, (json.dumps(result, indent=1) + "\n").encode())
    if not result["accepted"]:
        drop = result["validation"]["accuracy_drop"]
        print(
            f"edge-agent {args.command}: accuracy dropped by {drop:.4f} > --max-accuracy-drop "
            f"{args.max_accuracy_drop}; {args.out} not written",
            file=sys.stderr,
        )
        return EXIT_FAILED
    _write_atomically(args.out, data)
    return EXIT_OK
