"""`edge-agent infer` (one request, outputs summarised on stdout) and `edge-agent models` (the
repository RPCs: list, load, unload, rollback).

Errors are one line on stderr with the gRPC status, and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np

from edge_agent._proto import grpc_service_pb2 as pb
from edge_agent._proto import grpc_service_pb2_grpc as pb_grpc
from edge_agent.common.tensors import decode_raw, encode
from edge_agent.errors import ConfigError, InvalidArgument
from edge_agent.fleet import auth
from edge_agent.fleet.connect import channel_credentials, open_channel
from edge_agent.settings import MAX_MESSAGE_BYTES

# Tensors travel both ways, as large as an agent with its default limit takes.
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)


def _load_inputs(specs: list[str]) -> dict[str, np.ndarray]:
    inputs: dict[str, np.ndarray] = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            raise ValueError(f"--input {spec!r}: expected NAME=FILE.npy")
        try:
            inputs[name] = np.load(file, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ValueError(f"--input {name}: cannot read {file}: {exc}") from exc
    return inputs


def build_request(
    model: str, version: str, inputs: dict[str, np.ndarray], outputs: list[str]
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    for name, array in inputs.items():
        datatype, shape, data = encode(array)
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(data)
    for name in outputs:
        request.outputs.add(name=name)
    return request


def summarise(array: np.ndarray) -> str:
    if array.size == 0:
        return "empty"
    if array.dtype == object:
        return f"first={array.reshape(-1)[0]!r}"
    if array.dtype.kind == "b":
        return f"true={int(array.sum())}/{array.size}"
    parts = [f"min={array.min():.6g}", f"max={array.max():.6g}", f"mean={array.mean():.6g}"]
    if array.ndim >= 1 and array.shape[-1] > 1 and array.dtype.kind == "f":
        parts.append(f"argmax={np.argmax(array, axis=-1).reshape(-1)[:8].tolist()}")
    elif array.size <= 8:
        parts.append(f"values={array.reshape(-1).tolist()}")
    return " ".join(parts)


def run_infer(args: argparse.Namespace) -> int:
    try:
        inputs = _load_inputs(args.input)
        request = build_request(args.model, args.version, inputs, args.output)
    except (ValueError, InvalidArgument) as exc:
        print(f"edge-agent infer: {exc}", file=sys.stderr)
        return 2
    try:
        channel = _channel(args)
    except ConfigError as exc:  # unreadable TLS files
        print(f"edge-agent infer: {exc}", file=sys.stderr)
        return 2
    with channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            response = stub.ModelInfer(request, timeout=args.timeout, metadata=_metadata(args))
        except grpc.RpcError as exc:
            print(f"edge-agent infer: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(f"model {response.model_name} version {response.model_version}")
    for tensor, data in zip(response.outputs, response.raw_output_contents, strict=True):
        array = decode_raw(tensor.name, tensor.datatype, list(tensor.shape), data)
        print(f"{tensor.name}  {tensor.datatype}  {list(tensor.shape)}  {summarise(array)}")
        if args.output_dir is not None:
            out_dir = Path(args.output_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            np.save(out_dir / f"{tensor.name}.npy", array)
    return 0


def _channel(args: argparse.Namespace) -> grpc.Channel:
    """Plaintext, or TLS with --tls-ca (and --tls-cert/--tls-key for mTLS)."""

    def path(value: str | None) -> Path | None:
        return Path(value) if value else None

    credentials = channel_credentials(path(args.tls_ca), path(args.tls_cert), path(args.tls_key))
    return open_channel(args.url, credentials, CHANNEL_OPTIONS)


def _metadata(args: argparse.Namespace) -> Sequence[tuple[str, str]]:
    if args.token_file is None:
        return ()
    return auth.metadata(Path(args.token_file).read_text().strip())


def _load_parameters(args: argparse.Namespace) -> dict[str, pb.ModelRepositoryParameter]:
    parameters: dict[str, pb.ModelRepositoryParameter] = {}
    if args.config is not None:
        parameters["config"] = pb.ModelRepositoryParameter(string_param=args.config.read_text())
    for spec in args.file:
        target, sep, source = spec.partition("=")
        if not sep or not target or not source:
            raise ValueError(f"--file {spec!r}: expected VERSION/NAME=PATH")
        parameters[f"file:{target}"] = pb.ModelRepositoryParameter(
            bytes_param=Path(source).read_bytes()
        )
    return parameters


def run_models(args: argparse.Namespace) -> int:
    """`edge-agent models list|load|unload|rollback`: the repository RPCs of a running agent."""
    prog = f"edge-agent models {args.action}"
    if args.action != "list" and not args.model:
        print(f"{prog}: --model is required", file=sys.stderr)
        return 2
    try:
        parameters = _load_parameters(args) if args.action == "load" else {}
        channel = _channel(args)
        meta = _metadata(args)
    except (OSError, ValueError, ConfigError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    with channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            if args.action == "list":
                index = stub.RepositoryIndex(
                    pb.RepositoryIndexRequest(), timeout=args.timeout, metadata=meta
                )
                for model in index.models:
                    print(f"{model.name}\t{model.version or '-'}\t{model.state}\t{model.reason}")
            elif args.action == "unload":
                stub.RepositoryModelUnload(
                    pb.RepositoryModelUnloadRequest(model_name=args.model),
                    timeout=args.timeout,
                    metadata=meta,
                )
            else:
                if args.action == "rollback":
                    parameters = {"rollback": pb.ModelRepositoryParameter(bool_param=True)}
                stub.RepositoryModelLoad(
                    pb.RepositoryModelLoadRequest(model_name=args.model, parameters=parameters),
                    timeout=args.timeout,
                    metadata=meta,
                )
        except grpc.RpcError as exc:
            print(f"{prog}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    if args.action != "list":
        print(f"{args.action}: {args.model}: done")
    return 0
