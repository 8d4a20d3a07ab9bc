"""`edge-agent optimize MODEL.onnx --mode MODE --out OUT.onnx [...]`.

Exit 0: OUT written (and the report). Exit 1: an error (one line on stderr, nothing at OUT), or
the accuracy drop exceeded --max-accuracy-drop (the report is still written; OUT is not).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import onnx

from edge_agent.common.files import write_atomically
from edge_agent.compress import modes, report
from edge_agent.compress.data import load_set
from edge_agent.errors import EdgeAgentError, InvalidArgument

EXIT_OK, EXIT_FAILED = 0, 1


def add_arguments(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    opt = commands.add_parser("optimize", help="compress a model (int8, fp16, prune) and report")
    opt.add_argument("model_file", type=Path, metavar="MODEL.onnx")
    opt.add_argument("--mode", required=True, choices=modes.MODES)
    opt.add_argument("--out", required=True, type=Path, metavar="OUT.onnx")
    opt.add_argument("--calibration", type=Path, metavar="NPZ", help="int8-static: inputs")
    opt.add_argument(
        "--validation", type=Path, metavar="NPZ", help="inputs (+ `labels`) to measure accuracy"
    )
    opt.add_argument("--report", type=Path, metavar="REPORT.json")
    opt.add_argument("--sparsity", type=float, default=0.5, help="prune: share of weights zeroed")
    opt.add_argument(
        "--max-accuracy-drop",
        type=float,
        metavar="D",
        help="refuse OUT when accuracy falls by more than D (0.01 = one point); needs labels",
    )
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


def _write_atomically(path: Path, data: bytes) -> None:
    """OUT is whole or absent (common/files.write_atomically), in a directory made if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, data)


def _load_model(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError, OSError, ValueError...
        raise InvalidArgument(f"{path} is not a readable ONNX model ({exc})") from exc


def build(args: argparse.Namespace) -> dict[str, Any]:
    source = _load_model(args.model_file)
    calibration = validation = labels = None
    if args.calibration is not None:
        calibration, _ = load_set(args.calibration, source, "calibration")
    if args.validation is not None:
        validation, labels = load_set(args.validation, source, "validation")
    if args.mode == "int8-static" and calibration is None:
        raise InvalidArgument("mode int8-static needs --calibration NPZ (inputs to calibrate on)")
    if args.max_accuracy_drop is not None and labels is None:
        raise InvalidArgument(
            "--max-accuracy-drop needs --validation with `labels` (class indices): "
            + ("no --validation given" if validation is None else f"{args.validation} has none")
        )
    if args.mode == "int8-dynamic":
        model = modes.int8_dynamic(args.model_file)
    elif args.mode == "int8-static":
        assert calibration is not None
        model = modes.int8_static(args.model_file, calibration)
    elif args.mode == "fp16":
        blocked = [op.strip() for op in args.fp16_block_ops.split(",") if op.strip()]
        model = modes.fp16(args.model_file, not args.fp16_io, blocked)
    else:
        model = modes.prune(args.model_file, args.sparsity)
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
    result: dict[str, Any] = {
        "mode": args.mode,
        "model": str(args.model_file),
        "out": str(args.out),
        "size_bytes": {"before": len(source_bytes), "after": len(data)},
        "compression_rate": (len(source_bytes) - len(data)) / len(source_bytes),
        "parameters": {"before": report.parameters(source), "after": report.parameters(model)},
        "compressed_size_bytes": {
            "before": report.compressed_sizes(source_bytes),
            "after": report.compressed_sizes(data),
        },
        "validation": None,
        "latency_ms_median": report.latency_report(source, before, after, validation),
        "max_accuracy_drop": args.max_accuracy_drop,
    }
    if args.mode == "prune":
        result["sparsity"] = args.sparsity
    if validation is not None:
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
        result = build(args)
    except (EdgeAgentError, OSError) as exc:
        print(f"edge-agent optimize: {exc}", file=sys.stderr)
        return EXIT_FAILED
    data = result.pop("_model_bytes")
    print(_table(result))
    if args.report is not None:
        _write_atomically(args.report, (json.dumps(result, indent=1) + "\n").encode())
    if not result["accepted"]:
        drop = result["validation"]["accuracy_drop"]
        print(
            f"edge-agent optimize: accuracy dropped by {drop:.4f} > --max-accuracy-drop "
            f"{args.max_accuracy_drop}; {args.out} not written",
            file=sys.stderr,
        )
        return EXIT_FAILED
    _write_atomically(args.out, data)
    return EXIT_OK
