"""The `edge-agent` command: `serve` runs the daemon, `infer` calls one, `models` manages its
models; `control-plane serve` runs the fleet's control plane, `publish` / `keygen` / `fleet`
release models to it and steer rollouts."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sqlite3
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edge_agent.common.exits import EXIT_CONFIG, EXIT_OK
from edge_agent.controlplane import defaults as cp_defaults
from edge_agent.errors import ConfigError
from edge_agent.fleet.commands import Commands, add_actions
from edge_agent.settings import (
    CONTROL_MODES,
    FRONT_ENDS,
    LOG_FORMATS,
    LOG_LEVELS,
    SWAP_POLICIES,
    TRAIN_WHEN,
    Settings,
)

# `serve`'s flags, in the order --help lists them: (flag, help, argparse options). Each sets the
# setting its argparse dest names (`_serve`; the flag's own name but for --trusted-key), so none
# has a default of its own: an unset flag leaves the file's, the environment's or the built-in
# value.
_VALUE: Mapping[str, Any] = {}
_SWITCH: Mapping[str, Any] = {"action": "store_const", "const": True, "default": None}
SERVE_FLAGS: tuple[tuple[str, str, Mapping[str, Any]], ...] = (
    ("--model-repository", "model repository directory (default: shipped models/)", _VALUE),
    ("--grpc-address", f"HOST:PORT for gRPC (default {Settings.grpc_address})", _VALUE),
    ("--metrics-address", f"HOST:PORT for metrics (default {Settings.metrics_address})", _VALUE),
    ("--log-level", "|".join(LOG_LEVELS), _VALUE),
    ("--log-format", "|".join(LOG_FORMATS), _VALUE),
    ("--execution-providers", "comma-separated, e.g. cuda,cpu", _VALUE),
    ("--strict-provider", "refuse to serve a model on CPU when CUDA was asked for", _SWITCH),
    ("--max-message-bytes", "gRPC message size limit, both ways", _VALUE),
    (
        "--allow-shared-memory",
        "serve Triton's system shared memory extension to clients on this host",
        _SWITCH,
    ),
    (
        "--max-concurrent-rpcs",
        f"RPCs in progress at once (default {Settings.max_concurrent_rpcs})",
        _VALUE,
    ),
    (
        "--model-control-mode",
        f"{'|'.join(CONTROL_MODES)} (default {Settings.model_control_mode})",
        _VALUE,
    ),
    (
        "--repository-poll-secs",
        f"poll mode: seconds between scans ({Settings.repository_poll_secs:g})",
        _VALUE,
    ),
    (
        "--load-model",
        "explicit mode: load this model at start ('*' = all); repeatable",
        {"action": "append", "metavar": "NAME"},
    ),
    ("--swap-policy", f"{'|'.join(SWAP_POLICIES)} (default {Settings.swap_policy})", _VALUE),
    ("--state-dir", "directory for state kept across restarts", _VALUE),
    ("--tls-cert", "PEM certificate for the listeners (with --tls-key)", _VALUE),
    ("--tls-key", "PEM private key for the listeners", _VALUE),
    ("--tls-client-ca", "PEM CA: clients must present a cert from it", _VALUE),
    (
        "--control-address",
        f"HOST:PORT or unix:PATH for load/unload ({Settings.control_address})",
        _VALUE,
    ),
    ("--control-token-file", "bearer token the control listener requires", _VALUE),
    (
        "--front-end",
        "the inference listener's gRPC server: aio (default) or sync (thread pool)",
        {"choices": FRONT_ENDS},
    ),
    (
        "--http-address",
        "HOST:PORT for KServe v2 over HTTP/REST (default: off; Triton: 8000)",
        _VALUE,
    ),
    (
        "--http-control-address",
        "HOST:PORT for the HTTP repository endpoints (default: off)",
        _VALUE,
    ),
    ("--control-plane", "HOST:PORT of the control plane to sync from", _VALUE),
    ("--control-plane-ca", "PEM CA to verify a TLS control plane with", _VALUE),
    ("--device-id", "this device's id on the control plane", _VALUE),
    ("--device-token-file", "file holding this device's token", _VALUE),
    (
        "--trusted-key",
        "public key (PEM) whose release signatures are accepted; repeatable",
        {"action": "append", "metavar": "PUBFILE", "dest": "trusted_keys"},
    ),
    ("--sync-interval", f"long-poll wait in seconds (default {Settings.sync_interval:g})", _VALUE),
    ("--sync-bandwidth-limit", "download bytes per second (0: no limit)", _VALUE),
    (
        "--learn",
        "take part in the control plane's learning tasks (needs edge-agent[learn])",
        _SWITCH,
    ),
    (
        "--train-when",
        "idle: local training pauses while serving is busy (default); always: it does not",
        {"choices": TRAIN_WHEN},
    ),
)


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """How `infer` and `models` reach a listener with TLS or a token."""
    parser.add_argument("--tls-ca", help="PEM CA to verify a TLS listener with")
    parser.add_argument("--tls-cert", help="PEM client certificate (mTLS)")
    parser.add_argument("--tls-key", help="PEM client key (mTLS)")
    parser.add_argument("--token-file", help="bearer token (the control listener's)")


def _parser() -> argparse.ArgumentParser:
    from edge_agent.compress.cli import add_arguments as add_optimize
    from edge_agent.compress.cli import add_distill_arguments
    from edge_agent.fleet.cli import add_arguments as add_fleet
    from edge_agent.learn.cli import add_arguments as add_learning

    parser = argparse.ArgumentParser(prog="edge-agent", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_serve(commands)
    _add_control_plane(commands)
    add_fleet(commands)
    add_optimize(commands)
    add_distill_arguments(commands)
    add_learning(commands)
    _add_infer(commands)
    _add_models(commands)
    return parser


def _add_serve(commands: Commands) -> None:
    serve = commands.add_parser("serve", help="run the inference daemon")
    serve.add_argument("--config", type=Path, help="TOML settings file (also EDGE_AGENT_CONFIG)")
    for flag, text, options in SERVE_FLAGS:
        serve.add_argument(flag, help=text, **options)


def _add_control_plane(commands: Commands) -> None:
    actions = add_actions(commands, "control-plane", "run the fleet's control plane")
    cp = actions.add_parser(
        "serve",
        help="serve the fleet protocol (runs until SIGTERM)",
        description="Serve the fleet protocol: releases, rollouts and device state in "
        "DATA_DIR/registry.sqlite, blobs in DATA_DIR/blobs/, the publisher token in "
        "DATA_DIR/publisher.token (created on first start, mode 0600). Runs in the foreground "
        "until SIGTERM/SIGINT.",
    )
    cp.add_argument("--data-dir", required=True, type=Path, help="state directory (created)")
    cp.add_argument(
        "--address", default=cp_defaults.ADDRESS, help=f"HOST:PORT ({cp_defaults.ADDRESS})"
    )
    cp.add_argument(
        "--database",
        default="",
        metavar="URL",
        help="postgresql://USER@HOST:PORT/DB shared by replicas (default: SQLite in DATA_DIR); "
        "its password from PGPASSWORD or ~/.pgpass, never in the URL",
    )
    cp.add_argument(
        "--blob-store",
        default="",
        metavar="URL",
        help="s3://BUCKET/PREFIX?endpoint=URL (default: DATA_DIR/blobs); credentials from "
        "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a credentials file",
    )
    cp.add_argument(
        "--dashboard-address",
        default="",
        metavar="HOST:PORT",
        help="serve the read-only fleet dashboard here (default: off); the publisher token "
        "logs in (Bearer header or the login form)",
    )
    cp.add_argument(
        "--publisher-token-file",
        type=Path,
        help="the publisher token (replicas share one; default DATA_DIR/publisher.token, "
        "created on first start)",
    )
    cp.add_argument(
        "--max-failure-share",
        type=float,
        default=cp_defaults.MAX_FAILURE_SHARE,
        help="pause a rollout once more than this share of its devices fail "
        f"(default {cp_defaults.MAX_FAILURE_SHARE})",
    )
    _add_control_plane_keys(cp)
    _add_control_plane_limits(cp)
    cp.add_argument("--log-level", default="info", help="|".join(LOG_LEVELS))
    cp.add_argument("--log-format", default="auto", help="|".join(LOG_FORMATS))


def _add_control_plane_keys(cp: argparse.ArgumentParser) -> None:
    """TLS, the keys releases are checked and learned releases signed with, and /metrics."""
    cp.add_argument("--tls-cert", type=Path, help="PEM certificate (with --tls-key)")
    cp.add_argument("--tls-key", type=Path, help="PEM private key (with --tls-cert)")
    cp.add_argument("--tls-client-ca", type=Path, help="PEM CA: clients need a cert from it")
    cp.add_argument(
        "--trusted-key",
        action="append",
        type=Path,
        default=[],
        metavar="PUBFILE",
        help="publisher public key (PEM): releases must be signed by one (recommended); repeatable",
    )
    cp.add_argument("--metrics-address", default="", help="HOST:PORT for /metrics (default: off)")
    cp.add_argument(
        "--metrics-per-device",
        action="store_true",
        help="also each device's health counters on /metrics (a series per device)",
    )
    cp.add_argument(
        "--learning-key",
        type=Path,
        help="P-256 private key (PEM) that signs learned releases; without it learning tasks "
        "are refused. Devices must trust its public key (--trusted-key) explicitly",
    )


def _add_control_plane_limits(cp: argparse.ArgumentParser) -> None:
    """What one replica and one caller may cost it."""
    cp.add_argument(
        "--max-blob-bytes",
        type=int,
        default=cp_defaults.MAX_BLOB_BYTES,
        help=f"largest blob upload ({cp_defaults.MAX_BLOB_BYTES >> 30} GiB)",
    )
    cp.add_argument(
        "--max-connections",
        type=int,
        default=cp_defaults.MAX_CONNECTIONS,
        help=f"connections in total ({cp_defaults.MAX_CONNECTIONS}; lowered to fit the file "
        "descriptor limit)",
    )
    cp.add_argument(
        "--max-concurrent-rpcs",
        type=int,
        default=cp_defaults.MAX_CONCURRENT_RPCS,
        help=f"calls in flight at once, held long-polls included: about one per device "
        f"({cp_defaults.MAX_CONCURRENT_RPCS}); beyond it a call answers RESOURCE_EXHAUSTED",
    )
    cp.add_argument(
        "--max-connections-per-peer",
        type=int,
        default=cp_defaults.MAX_CONNECTIONS_PER_PEER,
        help=f"connections per client address ({cp_defaults.MAX_CONNECTIONS_PER_PEER}; devices "
        "behind one NAT share an address)",
    )
    cp.add_argument(
        "--device-rate",
        type=float,
        default=cp_defaults.DEVICE_RATE,
        help=f"calls per second per device ({cp_defaults.DEVICE_RATE:g})",
    )
    cp.add_argument(
        "--publisher-rate",
        type=float,
        default=cp_defaults.PUBLISHER_RATE,
        help=f"calls per second, publisher ({cp_defaults.PUBLISHER_RATE:g})",
    )
    cp.add_argument(
        "--upload-idle-seconds",
        type=float,
        default=cp_defaults.UPLOAD_IDLE_SECONDS,
        help="an upload that sends nothing for this long is cut off "
        f"({cp_defaults.UPLOAD_IDLE_SECONDS:g})",
    )


def _add_infer(commands: Commands) -> None:
    infer = commands.add_parser("infer", help="send one inference request to an agent")
    infer.add_argument("--url", default="127.0.0.1:8001", help="HOST:PORT of the agent")
    infer.add_argument("--model", required=True, help="the model to call")
    infer.add_argument("--version", default="", help="its version (default: the newest ready)")
    infer.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME=FILE.npy",
        required=True,
        help="an input tensor from a .npy file; repeat for each input",
    )
    infer.add_argument(
        "--output",
        action="append",
        default=[],
        metavar="NAME",
        help="request only these outputs (default: all)",
    )
    infer.add_argument("--output-dir", type=Path, help="save each output as NAME.npy here")
    infer.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    add_connection_arguments(infer)


def _add_models(commands: Commands) -> None:
    models = commands.add_parser(
        "models", help="list, load, unload or roll back models of a running agent"
    )
    models.add_argument(
        "action",
        choices=["list", "load", "unload", "rollback"],
        help="list: every model with its version and state; load, unload: --model; rollback: "
        "--model serves its newest older version on disk, and the one that served is withdrawn",
    )
    models.add_argument(
        "--url", default="127.0.0.1:8003", help="HOST:PORT of the agent's control listener"
    )
    add_connection_arguments(models)
    models.add_argument("--model", help="the model (all but list)")
    models.add_argument("--config", type=Path, help="load: a JSON model config to apply")
    models.add_argument(
        "--file",
        action="append",
        default=[],
        metavar="VERSION/NAME=PATH",
        help="load: push a model file inline, e.g. 2/model.onnx=./model.onnx; repeatable",
    )
    models.add_argument(
        "--timeout", type=float, default=300.0, help="seconds (default 300: loads take time)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "control-plane":
        return _control_plane(args)
    if args.command in ("optimize", "distill"):
        from edge_agent.compress.cli import run as optimize

        return optimize(args)
    if args.command in ("examples", "learn"):
        from edge_agent.learn.cli import run as run_learning

        return run_learning(args.command, args)
    if args.command in ("publish", "keygen", "fleet"):
        from edge_agent.fleet.cli import run

        return run(args.command, args)
    from edge_agent.client import run_infer, run_models

    return run_infer(args) if args.command == "infer" else run_models(args)


def _serve(args: argparse.Namespace) -> int:
    from edge_agent.settings import load_settings

    flags = {
        "model_repository": args.model_repository,
        "grpc_address": args.grpc_address,
        "metrics_address": args.metrics_address,
        "log_level": args.log_level,
        "log_format": args.log_format,
        "execution_providers": args.execution_providers,
        "strict_provider": args.strict_provider,
        "max_message_bytes": args.max_message_bytes,
        "max_concurrent_rpcs": args.max_concurrent_rpcs,
        "model_control_mode": args.model_control_mode,
        "repository_poll_secs": args.repository_poll_secs,
        "load_model": args.load_model,
        "swap_policy": args.swap_policy,
        "state_dir": args.state_dir,
        "control_plane": args.control_plane,
        "control_plane_ca": args.control_plane_ca,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_client_ca": args.tls_client_ca,
        "control_address": args.control_address,
        "http_address": args.http_address,
        "front_end": args.front_end,
        "http_control_address": args.http_control_address,
        "control_token_file": args.control_token_file,
        "device_id": args.device_id,
        "device_token_file": args.device_token_file,
        "trusted_keys": args.trusted_keys,
        "sync_interval": args.sync_interval,
        "sync_bandwidth_limit": args.sync_bandwidth_limit,
        "learn": args.learn,
        "train_when": args.train_when,
        "allow_shared_memory": args.allow_shared_memory,
    }
    try:
        settings = load_settings(args.config, flags=flags)
    except ConfigError as exc:
        print(f"edge-agent: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    from edge_agent.agent import Agent
    from edge_agent.observability.logging import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    try:
        asyncio.run(Agent(settings, lambda: load_settings(args.config, flags=flags)).run())
    except ConfigError as exc:  # e.g. the listener cannot bind (the agent logged it)
        print(f"edge-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK


def _control_plane(args: argparse.Namespace) -> int:
    from edge_agent.controlplane.server import ControlPlane, ControlPlaneSettings
    from edge_agent.observability.logging import configure_logging, get_logger

    if args.log_level not in LOG_LEVELS or args.log_format not in LOG_FORMATS:
        print("edge-agent: invalid --log-level or --log-format", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(args.log_level, args.log_format)
    defaults = ControlPlaneSettings(data_dir=args.data_dir)
    settings = dataclasses.replace(
        defaults,
        address=args.address,
        max_failure_share=args.max_failure_share,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        trusted_keys=tuple(args.trusted_key),
        metrics_address=args.metrics_address,
        metrics_per_device=args.metrics_per_device,
        learning_key=args.learning_key,
        database=args.database,
        blob_store=args.blob_store,
        publisher_token_file=args.publisher_token_file,
        dashboard_address=args.dashboard_address,
        # The idle and first-call timeouts have no flag: ControlPlaneSettings' own apply.
        connections=dataclasses.replace(
            defaults.connections,
            max_connections=args.max_connections,
            max_connections_per_peer=args.max_connections_per_peer,
            max_concurrent_rpcs=args.max_concurrent_rpcs,
        ),
        service=dataclasses.replace(
            defaults.service,
            max_blob_bytes=args.max_blob_bytes,
            device_rate=args.device_rate,
            publisher_rate=args.publisher_rate,
            upload_idle_seconds=args.upload_idle_seconds,
        ),
    )
    try:
        asyncio.run(ControlPlane(settings).run())
    except (ConfigError, OSError, sqlite3.Error) as exc:
        get_logger("edge_agent").error("controlplane.start_failed", error=str(exc))
        print(f"edge-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
