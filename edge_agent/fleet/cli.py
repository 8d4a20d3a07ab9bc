"""The publisher's side of the fleet protocol: `edge-agent publish`, `keygen` and `fleet ...`.

A command-line module: the agent never imports it. How a channel to the control plane is made
lives in fleet/connect.py (shared with the agent's sync); what the commands share in
fleet/commands.py.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from edge_agent._proto import fleet_pb2 as pb
from edge_agent._proto import fleet_pb2_grpc as pb_grpc
from edge_agent.common.exits import EXIT_OK
from edge_agent.common.layout import CONFIG_FILE, GOLDEN_FILE, WARMUP_DIR
from edge_agent.common.progress import NULL, Progress, progress
from edge_agent.controlplane.canary import Analysis
from edge_agent.errors import ConfigError
from edge_agent.fleet import auth, signing
from edge_agent.fleet.commands import (
    Commands,
    add_actions,
    add_remote_arguments,
    print_json,
    report_failures,
    table,
)
from edge_agent.fleet.connect import channel_credentials, open_channel, upload_missing
from edge_agent.fleet.release import (
    DEFAULT_LIFETIME_SECONDS,
    RELEASE_JSON,
    build_release,
    parse_release,
    variant_dir,
)

# Every fleet command's call but publish's (which uploads, and takes --timeout), in seconds.
CALL_TIMEOUT = 30
STATUS_PAGE_TIMEOUT = 60


def upload_release(
    stub: pb_grpc.FleetServiceStub,
    meta: Sequence[tuple[str, str]],
    directory: Path,
    signature: bytes,
    target: pb.SetTargetRequest,
    activate: bool,
    timeout: float,
    variant_signatures: Mapping[str, bytes] | None = None,
    shown: Progress = NULL,
) -> tuple[pb.RegisterReleaseResponse, int]:
    """Upload the blobs of a release (`directory` and its variants' directories beside it) that
    the control plane lacks, then register it (and target it when `activate`). Returns the
    answer and the bytes uploaded. `shown` displays the upload's bytes (on a terminal)."""
    release_json = (directory / RELEASE_JSON).read_bytes()
    release = parse_release(release_json)
    # Each blob once, even where variants share one, in the order they go.
    files = {
        entry.sha256: variant_dir(directory, name) / entry.path
        for name in release.variant_names()
        for entry in release.select(name).files
    }
    what = f"uploading {release.model} v{release.version}"
    uploaded = upload_missing(stub, meta, files, shown, what, timeout)
    shown.phase("registering the release")
    request = pb.RegisterReleaseRequest(
        release_json=release_json,
        signature=signature,
        activate=activate,
        target=target,
        variant_signatures=dict(variant_signatures or {}),
    )
    return stub.RegisterRelease(request, metadata=meta, timeout=timeout), uploaded


def release_extras(
    model_file: Path,
    config: Path | None,
    golden: Path | None,
    warmup: Path | None,
    model: str,
) -> dict[str, Path]:
    """The files a release carries beside the graph: what was given, else, when `model_file`
    sits in a repository layout (<repo>/<model>/<version>/model.onnx), the model's config.pbtxt
    and warmup/ and the version's golden.npz found there."""
    version_dir = model_file.resolve().parent
    in_repository = version_dir.name.isdigit()
    model_dir = version_dir.parent
    if config is None and in_repository and (model_dir / CONFIG_FILE).is_file():
        config = model_dir / CONFIG_FILE
    if golden is None and in_repository and (version_dir / GOLDEN_FILE).is_file():
        golden = version_dir / GOLDEN_FILE
    if warmup is None and in_repository and (model_dir / WARMUP_DIR).is_dir():
        warmup = model_dir / WARMUP_DIR
    extras: dict[str, Path] = {}
    if config is not None:
        _check_config(config, model)
        extras[CONFIG_FILE] = config
    if golden is not None:
        extras[GOLDEN_FILE] = golden
    if warmup is not None:
        if not warmup.is_dir():
            raise ConfigError(f"--warmup {warmup}: not a directory")
        for path in sorted(warmup.iterdir()):
            if not path.is_file() or path.is_symlink():
                raise ConfigError(f"{path}: warmup/ may hold plain files only")
            extras[f"{WARMUP_DIR}/{path.name}"] = path
    return extras


def _check_config(path: Path, model: str) -> None:
    """A config.pbtxt that will not load on the devices is refused here, not on every device."""
    from google.protobuf import text_format

    from edge_agent._proto import model_config_pb2 as mc

    try:
        config = text_format.Parse(path.read_text(), mc.ModelConfig())
    except (OSError, UnicodeDecodeError, text_format.ParseError) as exc:
        raise ConfigError(f"config {path}: {exc}") from exc
    if config.name and config.name != model:
        raise ConfigError(
            f"config {path} names the model {config.name!r}; publishing it as {model!r} would "
            f"fail to load on every device (publish --model {config.name} or edit the name)"
        )


def publish(args: argparse.Namespace) -> int:
    meta = auth.metadata(auth.read_token(args.token_file))
    extras = release_extras(args.model_file, args.config, args.golden, args.warmup, args.model)
    # Progress (a terminal's, never with --json) ends before the answer is printed below.
    with progress(enabled=not args.json) as shown, tempfile.TemporaryDirectory() as scratch:
        shown.phase("splitting and signing the release")
        directory = Path(scratch) / "release"
        variants = dict(args.variant or [])
        release = build_release(
            args.model_file,
            args.model,
            args.version,
            directory,
            args.expires_in,
            None,
            variants,
            extras,
        )
        signature = signing.sign_directory(directory, args.signing_key)
        variant_signatures = {
            name: signing.sign_directory(variant_dir(directory, name), args.signing_key)
            for name in variants
        }
        credentials = channel_credentials(args.control_plane_ca)
        with open_channel(args.control_plane, credentials) as channel:
            response, uploaded = upload_release(
                pb_grpc.FleetServiceStub(channel),
                meta,
                directory,
                signature,
                _target(args),
                not args.no_activate,
                args.timeout,
                variant_signatures,
                shown,
            )
    if args.json:
        print_json(response)
        return EXIT_OK
    parts = []
    for name in release.variant_names():
        files = release.select(name).files
        parts.append(f"{name} {len(files)} files {sum(f.size for f in files):,} B")
    carried = ", ".join(sorted(extras)) or "no config"
    print(
        f"published {release.model} v{release.version}: {'; '.join(parts)} ({carried}); "
        f"uploaded {uploaded:,} B (the rest was on the control plane already)"
    )
    if response.HasField("rollout"):
        print(rollout_line(response.rollout))
    return EXIT_OK


def _target(args: argparse.Namespace) -> pb.SetTargetRequest:
    target = pb.SetTargetRequest(model=args.model, version=args.version, scope=pb.FLEET)
    stages = getattr(args, "stages", None) or []
    canary = getattr(args, "canary", None)
    if getattr(args, "group", None):
        target.scope, target.group = pb.GROUP, args.group
    elif canary is not None or stages:
        target.scope = pb.CANARY
        target.canary_percent = canary if canary is not None else stages[0]
        analysis = target.analysis
        analysis.disabled = bool(getattr(args, "no_canary_analysis", False))
        analysis.stages.extend(stages)
        for name in CANARY_FLAGS:
            value = getattr(args, name, None)
            if value is not None:
                setattr(analysis, name, value)
    return target


# The canary analysis' thresholds that `--NAME` sets (defaults: the control plane's).
CANARY_FLAGS = (
    "max_error_rate_increase",
    "max_p99_ratio",
    "max_memory_ratio",
    "min_requests",
    "bake_seconds",
)


STATE_ORDER = ("serving", "installed", "downloading", "retrying", "failed", "pending")


def _counts(states: Mapping[str, int]) -> str:
    known = [s for s in STATE_ORDER if states.get(s)]
    other = sorted(s for s in states if s not in STATE_ORDER and states[s])
    return ", ".join(f"{s} {states[s]}" for s in [*known, *other]) or "-"


def _scope(r: pb.RolloutStatus) -> str:
    scope = str(pb.TargetScope.Name(r.scope)).lower()
    if scope == "group":
        return f"group {r.group}"
    if scope == "canary":
        return f"canary {r.canary_percent:g}%"
    return scope


def rollout_line(r: pb.RolloutStatus) -> str:
    """One rollout in one line: counts, never the device list (a fleet has thousands); a
    canary's latest verdict with its figures on the next."""
    line = (
        f"rollout {r.id}: {r.model} v{r.version} {_scope(r)} {r.state}: "
        f"{r.device_count} devices ({_counts(r.device_states)})"
        + (f"; {r.reason}" if r.reason else "")
    )
    if r.HasField("verdict") and r.verdict.verdict:
        v = r.verdict
        line += (
            f"\n  canary {v.verdict}: {v.reason}"
            f"\n  canary v{v.canary.version}: {_cohort(v.canary)}"
            f"\n  baseline v{v.baseline.version}: {_cohort(v.baseline)}"
        )
    return line


def _cohort(c: pb.CohortHealth) -> str:
    return (
        f"{c.requests} requests, {c.error_rate:.2%} failed, p99 {c.p99_ms:.1f} ms, "
        f"memory {c.mean_rss_bytes / 2**20:.0f} MiB"
    )


def keygen(args: argparse.Namespace) -> int:
    signing.generate_keypair(args.private_key, args.public_key)
    print(f"wrote {args.private_key} (keep it secret) and {args.public_key} (give it to devices)")
    return EXIT_OK


def fleet(args: argparse.Namespace) -> int:
    if args.action == "add-device" and args.data_dir is not None:
        return _enroll_locally(args)
    if args.action == "add-device":
        return _enroll_remotely(args)
    meta = auth.metadata(auth.read_token(args.token_file))
    with open_channel(args.control_plane, channel_credentials(args.control_plane_ca)) as channel:
        stub = pb_grpc.FleetServiceStub(channel)
        if args.action == "status":
            _show_status(fleet_status(stub, meta, args.rollout or 0), args.rollout, args.json)
            return EXIT_OK
        if args.action == "revoke-device":
            stub.RevokeDevice(
                pb.RevokeDeviceRequest(device_id=args.device_id),
                metadata=meta,
                timeout=CALL_TIMEOUT,
            )
            print(f"device {args.device_id} revoked")
            return EXIT_OK
        if args.action == "target":
            rollout = stub.SetTarget(_target(args), metadata=meta, timeout=CALL_TIMEOUT)
        else:
            action = getattr(pb.ControlRolloutRequest, args.action.upper())
            request = pb.ControlRolloutRequest(model=args.model, action=action)
            rollout = stub.ControlRollout(request, metadata=meta, timeout=CALL_TIMEOUT)
    if args.json:
        print_json(rollout)
    else:
        print(rollout_line(rollout))
    return EXIT_OK


def _enroll_locally(args: argparse.Namespace) -> int:
    """add-device --data-dir: straight into the registry, on the control plane's host."""
    from edge_agent.controlplane.server import add_device

    add_device(args.data_dir, args.device_id, args.group or "", args.device_token_file)
    print(f"device {args.device_id} enrolled; its token is in {args.device_token_file} (0600)")
    return EXIT_OK


def _enroll_remotely(args: argparse.Namespace) -> int:
    """add-device --control-plane: through the API (EnrollDevices), with the publisher token."""
    if args.control_plane is None or args.token_file is None:
        raise ConfigError("add-device needs --data-dir, or --control-plane and --token-file")
    out = args.device_token_file
    if out.exists() or out.is_symlink():
        raise ConfigError(
            f"{out} exists: refusing to overwrite it (it may hold another credential); "
            "choose a new file for the device token"
        )
    meta = auth.metadata(auth.read_token(args.token_file))
    credentials = channel_credentials(args.control_plane_ca)
    with open_channel(args.control_plane, credentials) as channel:
        request = pb.EnrollDevicesRequest(
            devices=[pb.DeviceEnrollment(device_id=args.device_id, group=args.group or "")],
            rotate=args.rotate,
        )
        answer = pb_grpc.FleetServiceStub(channel).EnrollDevices(
            request, metadata=meta, timeout=CALL_TIMEOUT
        )
    auth.write_secret(out, answer.tokens[0].token)
    print(f"device {args.device_id} enrolled; its token is in {out} (0600)")
    return EXIT_OK


def fleet_status(
    stub: pb_grpc.FleetServiceStub, meta: Sequence[tuple[str, str]], rollout_id: int = 0
) -> pb.FleetStatusResponse:
    """The whole fleet status, page after page (or one rollout with its devices)."""
    whole = pb.FleetStatusResponse()
    request = pb.FleetStatusRequest(rollout_id=rollout_id)
    while True:
        page = stub.FleetStatus(request, metadata=meta, timeout=STATUS_PAGE_TIMEOUT)
        whole.devices.extend(page.devices)
        whole.rollouts.extend(page.rollouts)
        if not page.next_page_token:
            return whole
        request.page_token = page.next_page_token


def _show_status(status: pb.FleetStatusResponse, rollout_id: int | None, as_json: bool) -> None:
    if rollout_id is not None:
        found = [r for r in status.rollouts if r.id == rollout_id]
        if not found:
            raise ConfigError(f"no rollout {rollout_id}")
        if as_json:
            print_json(found[0])
            return
        print(rollout_line(found[0]))
        print(f"devices: {', '.join(found[0].devices) or '-'}")
        return
    if as_json:
        print_json(status)
        return
    headers = [
        "DEVICE", "GROUP", "LAST SEEN", "MODEL", "SERVING", "VARIANT", "INSTALLED", "DESIRED",
        "STATE", "LAST ERROR",
    ]  # fmt: skip
    print(table(headers, [row for d in status.devices for row in _device_rows(d)]))
    if status.rollouts:
        print()
        print(
            table(
                ["ROLLOUT", "MODEL", "VERSION", "SCOPE", "STATE", "DEVICES", "BY STATE", "REASON"],
                [
                    [
                        str(r.id),
                        r.model,
                        str(r.version),
                        _scope(r),
                        r.state,
                        str(r.device_count),
                        _counts(r.device_states),
                        r.reason or "-",
                    ]
                    for r in status.rollouts
                ],
            )
        )
        judged = [r for r in status.rollouts if r.HasField("verdict") and r.verdict.verdict]
        if judged:
            print()
            print(
                table(
                    ["ROLLOUT", "COHORT", "VERSION", "REQUESTS", "FAILED", "P99", "MEMORY",
                     "VERDICT"],
                    [
                        [str(r.id) if side == "canary" else "", side, str(c.version),
                         str(c.requests), f"{c.error_rate:.2%}", f"{c.p99_ms:.1f} ms",
                         f"{c.mean_rss_bytes / 2**20:.0f} MiB",
                         r.verdict.verdict if side == "canary" else ""]
                        for r in judged
                        for side, c in (("canary", r.verdict.canary),
                                        ("baseline", r.verdict.baseline))
                    ],
                )
            )  # fmt: skip


def _device_rows(d: pb.DeviceStatus) -> list[list[str]]:
    """One row per model the device runs or should run (one "-" row when neither)."""
    seen = (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d.last_seen)) if d.last_seen else "never"
    )
    desired = {t.model: t.version for t in d.desired}
    reports = {r.model: r for r in d.models}
    rows = []
    for name in sorted(set(desired) | set(reports)) or ["-"]:
        r = reports.get(name)
        rows.append(
            [
                d.device_id,
                d.group or "-",
                seen,
                name,
                str(r.serving_version or "-") if r else "-",
                (r.variant or "-") if r else "-",
                str(r.installed_version or "-") if r else "-",
                str(desired.get(name, "-")),
                (r.state or "-") if r else "-",
                d.last_error or "-",
            ]
        )
    return rows


def run(command: str, args: argparse.Namespace) -> int:
    """publish / keygen / fleet: errors become one line on stderr and a non-zero exit."""
    action = {"publish": publish, "keygen": keygen, "fleet": fleet}[command]
    return report_failures(command, lambda: action(args))


def lifetime(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _variant(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError("expected NAME=MODEL.onnx, e.g. int8=model.int8.onnx")
    return name, Path(path)


def _where(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--group", help="target the devices of this group only")
    where.add_argument(
        "--canary",
        type=float,
        metavar="PCT",
        help="target PCT%% of the devices (a fixed cohort, chosen now); judged on its serving "
        "health against the devices on the version before, rolled back on a regression",
    )
    parser.add_argument(
        "--stages",
        type=_stages,
        metavar="PCT,PCT,...",
        help="a canary's stages, e.g. 5,25,100: each promotes to the next after a healthy "
        "--bake-seconds (the first is the canary percent)",
    )
    canary = parser.add_argument_group("canary analysis (defaults: the control plane's)")
    default = Analysis()
    for flag, kind, text in (
        ("--max-error-rate-increase", float, "failure share above the baseline's"),
        ("--max-p99-ratio", float, "p99 latency over the baseline's"),
        ("--max-memory-ratio", float, "mean resident memory over the baseline's"),
        ("--min-requests", int, "requests before the canary is judged"),
        ("--bake-seconds", float, "a healthy stage's time before it promotes"),
    ):
        value = getattr(default, flag.removeprefix("--").replace("-", "_"))
        canary.add_argument(flag, type=kind, help=f"{text} ({value:g})")
    canary.add_argument("--no-canary-analysis", action="store_true", help="do not judge the canary")


def _stages(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("expected percentages, e.g. 5,25,100") from None


def add_arguments(commands: Commands) -> None:
    _add_publish(commands)
    key = commands.add_parser("keygen", help="make a P-256 signing key pair")
    key.add_argument("--private-key", required=True, type=Path, help="written 0600; never shared")
    key.add_argument("--public-key", required=True, type=Path, help="give it to the devices")
    _add_fleet(commands)


def _add_publish(commands: Commands) -> None:
    pub = commands.add_parser(
        "publish",
        help="split, sign and publish a model version",
        description="Split MODEL.onnx into a release (graph + one file per large weight), "
        "sign it, upload what the control plane lacks, register it and (unless --no-activate) "
        "roll it out. The model's config.pbtxt, warmup/ and golden.npz travel with it: given "
        "by flag, or found beside MODEL.onnx when it sits in a repository layout "
        "(<repo>/<model>/<version>/model.onnx).",
    )
    pub.add_argument("model_file", type=Path, metavar="MODEL.onnx", help="the model to release")
    pub.add_argument("--model", required=True, help="the model's name on the devices")
    pub.add_argument("--version", required=True, type=int, help="the version number (>= 1)")
    pub.add_argument("--signing-key", required=True, type=Path, help="P-256 private key (PEM)")
    add_remote_arguments(pub)
    pub.add_argument("--no-activate", action="store_true", help="register only, target nothing")
    _where(pub)
    pub.add_argument(
        "--config",
        type=Path,
        help="config.pbtxt installed with the version (default: the one of the repository "
        "layout, if any; without one, devices complete the config from the graph)",
    )
    pub.add_argument("--golden", type=Path, help="golden.npz checked before the version serves")
    pub.add_argument("--warmup", type=Path, help="directory of model_warmup input files")
    pub.add_argument(
        "--expires-in",
        type=lifetime,
        default=DEFAULT_LIFETIME_SECONDS,
        help="seconds until devices refuse the release (default one year)",
    )
    pub.add_argument(
        "--variant",
        action="append",
        type=_variant,
        metavar="NAME=MODEL.onnx",
        help="another variant of this version (e.g. int8=model.int8.onnx); repeatable",
    )
    pub.add_argument("--timeout", type=float, default=300.0, help="seconds per call")


def _add_fleet(commands: Commands) -> None:
    actions = add_actions(commands, "fleet", "enroll devices, show and steer rollouts")
    _add_device_action(actions)

    revoke = actions.add_parser(
        "revoke-device", help="remove a device: its token is refused from its next request on"
    )
    revoke.add_argument("--device-id", required=True, help="the device to revoke")
    add_remote_arguments(revoke)

    status = actions.add_parser("status", help="devices, their versions, and rollouts")
    add_remote_arguments(status)
    status.add_argument(
        "--rollout", type=int, metavar="ID", help="one rollout, with the list of its devices"
    )

    target = actions.add_parser("target", help="roll a registered version out")
    target.add_argument("--model", required=True, help="the model to target")
    target.add_argument("--version", required=True, type=int, help="its registered version")
    _where(target)
    add_remote_arguments(target)

    for action, text in (
        ("pause", "pause the model's current rollout (no device starts it)"),
        ("resume", "resume the model's paused rollout"),
        ("rollback", "roll the model's current rollout back (devices return to the one before)"),
    ):
        steer = actions.add_parser(action, help=text, description=text)
        steer.add_argument("--model", required=True, help="the model whose rollout to steer")
        add_remote_arguments(steer)


def _add_device_action(actions: Commands) -> None:
    add = actions.add_parser(
        "add-device",
        help="enroll a device (on the control plane's host)",
        description="Enroll a device, or give an enrolled one a new token: the registry keeps "
        "only the token's hash; the token itself is written to --device-token-file (created "
        "with mode 0600, never overwritten) and goes to the device. On the control plane's "
        "host with --data-dir, or from anywhere through the API with --control-plane and the "
        "publisher's --token-file.",
    )
    where_enroll = add.add_mutually_exclusive_group(required=True)
    where_enroll.add_argument(
        "--data-dir", type=Path, help="the control plane's data dir (on its host)"
    )
    where_enroll.add_argument(
        "--control-plane", help="HOST:PORT: enroll through the API (EnrollDevices)"
    )
    add.add_argument(
        "--token-file", type=Path, help="with --control-plane: the publisher token (read)"
    )
    add.add_argument("--control-plane-ca", type=Path, help="PEM CA: TLS to the control plane")
    add.add_argument(
        "--rotate",
        action="store_true",
        help="with --control-plane: a new token for an enrolled one",
    )
    add.add_argument("--device-id", required=True, help="the device's id (1-128 characters)")
    add.add_argument("--group", help="the device's group (rollouts can target a group)")
    add.add_argument(
        "--device-token-file",
        required=True,
        type=Path,
        help="where to write the new device token (must not exist)",
    )
