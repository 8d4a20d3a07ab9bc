"""The publisher's side of the fleet protocol: `edge-agent publish`, `keygen` and `fleet ...`.

`open_channel` is the one place a fleet channel is made (the agent's sync uses it too), so TLS
credentials, when they come, are added here once.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import grpc

from edge_agent._proto import fleet_pb2 as pb
from edge_agent._proto import fleet_pb2_grpc as pb_grpc
from edge_agent.errors import ConfigError, EdgeAgentError
from edge_agent.fleet import auth, signing
from edge_agent.fleet.release import (
    CHUNK_SIZE,
    DEFAULT_LIFETIME_SECONDS,
    RELEASE_JSON,
    build_release,
    parse_release,
    variant_dir,
)

EXIT_OK, EXIT_FAILED = 0, 1
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 4 * CHUNK_SIZE),
]


def channel_credentials(
    ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials | None:
    """TLS to the control plane when `ca` is given (the server is verified with it); `cert` and
    `key` are our identity for mTLS."""
    if ca is None:
        return None
    try:
        return grpc.ssl_channel_credentials(
            root_certificates=ca.read_bytes(),
            private_key=key.read_bytes() if key is not None else None,
            certificate_chain=cert.read_bytes() if cert is not None else None,
        )
    except OSError as exc:
        raise ConfigError(f"cannot read a TLS file: {exc}") from exc


def open_channel(address: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    if credentials is not None:
        return grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def _upload_chunks(digest: str, path: Path) -> Iterator[pb.UploadBlobRequest]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        first = True
        while True:
            data = f.read(CHUNK_SIZE)
            if first or data:
                yield pb.UploadBlobRequest(digest=digest if first else "", size=size, data=data)
            first = False
            if not data:
                return


def upload_release(
    stub: pb_grpc.FleetServiceStub,
    meta: Sequence[tuple[str, str]],
    directory: Path,
    signature: bytes,
    target: pb.SetTargetRequest,
    activate: bool,
    timeout: float,
    variant_signatures: Mapping[str, bytes] | None = None,
) -> tuple[pb.RegisterReleaseResponse, int]:
    """Upload the blobs of a release (`directory` and its variants' directories beside it) that
    the control plane lacks, then register it (and target it when `activate`). Returns the
    answer and the bytes uploaded."""
    release_json = (directory / RELEASE_JSON).read_bytes()
    release = parse_release(release_json)
    digests = sorted({f.sha256 for f in release.all_files()})
    missing = set(
        stub.MissingBlobs(
            pb.MissingBlobsRequest(digests=digests), metadata=meta, timeout=timeout
        ).missing
    )
    uploaded = 0
    for name in release.variant_names():
        for entry in release.select(name).files:
            if entry.sha256 in missing:
                chunks = _upload_chunks(entry.sha256, variant_dir(directory, name) / entry.path)
                stub.UploadBlob(chunks, metadata=meta, timeout=timeout)
                missing.discard(entry.sha256)
                uploaded += entry.size
    request = pb.RegisterReleaseRequest(
        release_json=release_json,
        signature=signature,
        activate=activate,
        target=target,
        variant_signatures=dict(variant_signatures or {}),
    )
    return stub.RegisterRelease(request, metadata=meta, timeout=timeout), uploaded


def publish(args: argparse.Namespace) -> int:
    meta = auth.metadata(auth.read_token(args.token_file))
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch) / "release"
        variants = dict(args.variant or [])
        release = build_release(
            args.model_file, args.model, args.version, directory, args.expires_in, None, variants
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
            )
    names = ",".join(release.variant_names())
    print(
        f"published {release.model} v{release.version}: {len(release.files)} files, "
        f"{release.size} bytes, uploaded {uploaded} bytes, variants {names}"
    )
    if response.HasField("rollout"):
        _print_rollout(response.rollout)
    return EXIT_OK


def _target(args: argparse.Namespace) -> pb.SetTargetRequest:
    target = pb.SetTargetRequest(model=args.model, version=args.version, scope=pb.FLEET)
    if getattr(args, "group", None):
        target.scope, target.group = pb.GROUP, args.group
    elif getattr(args, "canary", None) is not None:
        target.scope, target.canary_percent = pb.CANARY, args.canary
    return target


def _print_rollout(r: pb.RolloutStatus) -> None:
    scope = pb.TargetScope.Name(r.scope).lower()
    where = {"group": f" group={r.group}", "canary": f" canary={r.canary_percent:g}%"}.get(
        scope, ""
    )
    print(
        f"rollout {r.id}: {r.model} v{r.version} {scope}{where} {r.state} "
        f"devices={','.join(r.devices) or '-'} failed={r.failed}"
        + (f" ({r.reason})" if r.reason else "")
    )


def keygen(args: argparse.Namespace) -> int:
    signing.generate_keypair(args.private_key, args.public_key)
    print(f"wrote {args.private_key} (keep it secret) and {args.public_key} (give it to devices)")
    return EXIT_OK


def fleet(args: argparse.Namespace) -> int:
    if args.action == "add-device":
        from edge_agent.controlplane.server import add_device

        if args.data_dir is None or args.device_id is None or args.token_file is None:
            raise ConfigError("add-device needs --data-dir, --device-id and --token-file")
        add_device(args.data_dir, args.device_id, args.group or "", args.token_file)
        print(f"device {args.device_id} enrolled; its token is in {args.token_file}")
        return EXIT_OK
    if args.control_plane is None or args.token_file is None:
        raise ConfigError(f"fleet {args.action} needs --control-plane and --token-file")
    meta = auth.metadata(auth.read_token(args.token_file))
    with open_channel(args.control_plane, channel_credentials(args.control_plane_ca)) as channel:
        stub = pb_grpc.FleetServiceStub(channel)
        if args.action == "status":
            _print_status(stub.FleetStatus(pb.FleetStatusRequest(), metadata=meta, timeout=30))
        elif args.action == "target":
            if args.model is None or args.version is None:
                raise ConfigError("fleet target needs --model and --version")
            _print_rollout(stub.SetTarget(_target(args), metadata=meta, timeout=30))
        else:
            if args.model is None:
                raise ConfigError(f"fleet {args.action} needs --model")
            action = getattr(pb.ControlRolloutRequest, args.action.upper())
            request = pb.ControlRolloutRequest(model=args.model, action=action)
            _print_rollout(stub.ControlRollout(request, metadata=meta, timeout=30))
    return EXIT_OK


def _print_status(status: pb.FleetStatusResponse) -> None:
    print(
        f"{'DEVICE':<20} {'GROUP':<10} {'LAST SEEN':<20} MODELS (serving/installed/desired)  ERROR"
    )
    for d in status.devices:
        seen = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d.last_seen))
            if d.last_seen
            else "never"
        )
        desired = {t.model: t.version for t in d.desired}
        models = {r.model: r for r in d.models}
        parts = []
        for name in sorted(set(desired) | set(models)):
            r = models.get(name)
            serving = r.serving_version if r else 0
            installed = r.installed_version if r else 0
            state = r.state if r else "-"
            parts.append(f"{name}={serving}/{installed}/{desired.get(name, '-')} {state}")
        print(
            f"{d.device_id:<20} {d.group or '-':<10} {seen:<20} {' '.join(parts) or '-'}  "
            f"{d.last_error or '-'}"
        )
    for r in status.rollouts:
        _print_rollout(r)


def run(command: str, args: argparse.Namespace) -> int:
    """publish / keygen / fleet: errors become one line on stderr and a non-zero exit."""
    try:
        return {"publish": publish, "keygen": keygen, "fleet": fleet}[command](args)
    except grpc.RpcError as exc:
        print(f"edge-agent {command}: {exc.code().name}: {exc.details()}", file=sys.stderr)
    except (EdgeAgentError, OSError) as exc:
        print(f"edge-agent {command}: {exc}", file=sys.stderr)
    return EXIT_FAILED


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


def add_arguments(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    pub = commands.add_parser("publish", help="split, sign and publish a model version")
    pub.add_argument("model_file", type=Path, metavar="MODEL.onnx")
    pub.add_argument("--model", required=True)
    pub.add_argument("--version", required=True, type=int)
    pub.add_argument("--control-plane", required=True, help="HOST:PORT")
    pub.add_argument("--signing-key", required=True, type=Path, help="P-256 private key (PEM)")
    pub.add_argument("--token-file", required=True, type=Path, help="the publisher token")
    pub.add_argument("--control-plane-ca", type=Path, help="PEM CA: TLS to the control plane")
    pub.add_argument("--no-activate", action="store_true", help="register only, target nothing")
    where = pub.add_mutually_exclusive_group()
    where.add_argument("--group", help="target one device group")
    where.add_argument("--canary", type=float, metavar="PCT", help="target PCT%% of the devices")
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

    key = commands.add_parser("keygen", help="make a P-256 signing key pair")
    key.add_argument("--private-key", required=True, type=Path)
    key.add_argument("--public-key", required=True, type=Path)

    fl = commands.add_parser("fleet", help="enroll devices, show and steer rollouts")
    fl.add_argument(
        "action", choices=["add-device", "status", "target", "pause", "resume", "rollback"]
    )
    fl.add_argument("--control-plane", help="HOST:PORT (all but add-device)")
    fl.add_argument("--token-file", type=Path, help="publisher token; add-device: where to write")
    fl.add_argument("--data-dir", type=Path, help="add-device: the control plane's data dir")
    fl.add_argument("--control-plane-ca", type=Path, help="PEM CA: TLS to the control plane")
    fl.add_argument("--device-id")
    fl.add_argument("--model")
    fl.add_argument("--version", type=int)
    where = fl.add_mutually_exclusive_group()
    where.add_argument("--group", help="add-device: the device's group; target: a group")
    where.add_argument("--canary", type=float, metavar="PCT")
