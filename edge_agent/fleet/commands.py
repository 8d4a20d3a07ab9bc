"""What the command-line tools share: a group of ACTION subcommands, the flags that reach the
control plane, the one-line error report, JSON answers and aligned tables.

`edge-agent fleet`, `learn`, `examples` and `control-plane` are built from these, so that their
flags read and fail the same way.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeAlias

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from edge_agent.common.exits import EXIT_FAILED
from edge_agent.errors import EdgeAgentError

# What `add_subparsers` returns (argparse keeps the class private).
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def add_actions(commands: Commands, name: str, text: str) -> Commands:
    """`edge-agent NAME ACTION ...`: the command and the group its actions are added to."""
    parser = commands.add_parser(name, help=text)
    return parser.add_subparsers(dest="action", required=True, metavar="ACTION")


def add_remote_arguments(
    parser: argparse.ArgumentParser,
    address_help: str = "HOST:PORT of the control plane",
    token_help: str = "file holding the publisher token (the control plane's "
    "DATA_DIR/publisher.token)",
    ca_help: str = "PEM CA: TLS to the control plane",
) -> None:
    """How a publisher command reaches the control plane, and --json for its answer."""
    parser.add_argument("--control-plane", required=True, help=address_help)
    parser.add_argument("--token-file", required=True, type=Path, help=token_help)
    parser.add_argument("--control-plane-ca", type=Path, help=ca_help)
    parser.add_argument("--json", action="store_true", help="print the answer as JSON")


def print_json(message: Message) -> None:
    print(json_format.MessageToJson(message, preserving_proto_field_name=True))


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns as wide as their widest cell, so values line up under their headers."""
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]
    lines = [headers, *rows]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def report_failures(
    command: str,
    action: Callable[[], int],
    expected: tuple[type[Exception], ...] = (EdgeAgentError, OSError),
) -> int:
    """Run `action`; a gRPC error or one of `expected` becomes one line on stderr and exit 1."""
    try:
        return action()
    except grpc.RpcError as exc:
        print(f"edge-agent {command}: {exc.code().name}: {exc.details()}", file=sys.stderr)
    except expected as exc:
        print(f"edge-agent {command}: {exc}", file=sys.stderr)
    return EXIT_FAILED
