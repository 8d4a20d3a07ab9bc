"""The pure pieces of the hardening: which reports a control plane keeps, the rate
buckets, gRPC peer strings and /proc addresses, size-checked deserializers, and external data
that hides outside the graph's initializers."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_agent._proto import fleet_pb2 as pb
from edge_agent.controlplane.service import MAX_REPORTS, TokenBucket, accept_reports
from edge_agent.errors import ModelLoadError, ReleaseRejected
from edge_agent.fleet import auth
from edge_agent.fleet.release import build_release, check_graph_contract, parse_release
from edge_agent.rpc.connections import ConnectionLimits, _decode, fit_to_fd_limit, parse_peer
from edge_agent.rpc.wire import Malformed, lenient
from edge_agent.runtime.external_data import validate_external_data


def report(model: str, state: str = "serving", **fields: object) -> pb.ModelReport:
    return pb.ModelReport(model=model, state=state, **fields)  # type: ignore[arg-type]


def test_only_reports_about_the_desired_models_are_kept() -> None:
    reports = [
        report("a", target_version=2, error="x" * 5000, variant="v" * 100),
        report("a", "failed"),  # a second one for the same model
        report("b"),  # not desired
        report("c", "exploded"),  # no such state
        report("c", serving_version=2**64 - 1),  # not a version we store
    ]
    kept, ignored = accept_reports(reports, {"a": 2, "c": 1})
    assert [(r.model, r.state) for r in kept] == [("a", "serving")]
    assert len(kept[0].error) == 1000 and len(kept[0].variant) == 40
    assert ignored == 4
    many = [report(f"m{i}") for i in range(MAX_REPORTS + 1000)]
    kept, ignored = accept_reports(many, {"m0": 1})
    assert len(kept) == 1 and ignored == MAX_REPORTS + 999  # the tail is not even looked at


def test_token_bucket() -> None:
    bucket = TokenBucket(rate=2, burst=3, now=0)
    assert [bucket.take(0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.5) and not bucket.take(0.5)  # 2 a second
    assert [bucket.take(100) for _ in range(4)] == [True, True, True, False]  # capped at 3


@pytest.mark.parametrize(
    ("peer", "parsed"),
    [
        ("ipv4:127.0.0.2:5000", ("127.0.0.2", 5000)),
        ("ipv6:[::1]:6000", ("::1", 6000)),
        ("ipv6:%5B::1%5D:6001", ("::1", 6001)),
        ("ipv6:[::ffff:10.0.0.7]:7", ("10.0.0.7", 7)),
        ("unix:/run/edge.sock", None),
        ("ipv4:nonsense", None),
    ],
)
def test_peer_strings(peer: str, parsed: tuple[str, int] | None) -> None:
    assert parse_peer(peer) == parsed


def test_proc_net_addresses() -> None:
    assert _decode("0100007F:1F91") == ("127.0.0.1", 8081)
    assert _decode("00000000000000000000000001000000:0050") == ("::1", 80)
    assert _decode("0000000000000000FFFF00000200007F:0050") == ("127.0.0.2", 80)


def test_caps_fit_the_descriptor_limit() -> None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    base = ConnectionLimits(
        max_connections=0,
        max_connections_per_peer=256,
        idle_seconds=300.0,
        first_request_seconds=10.0,
        max_concurrent_rpcs=512,
    )
    fitted = fit_to_fd_limit(dataclasses.replace(base, max_connections=10**9), listeners=2)
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)  # raised to the hard limit if it could
    assert 16 <= fitted.max_connections <= max(16, (soft - 256) // 2)
    assert fit_to_fd_limit(dataclasses.replace(base, max_connections=8), 2).max_connections == 8


def test_requests_over_their_size_are_not_parsed() -> None:
    parse = lenient(pb.WatchRequest, max_bytes=100)
    small = pb.WatchRequest(known_revision="r").SerializeToString()
    assert parse(small) == pb.WatchRequest(known_revision="r")
    big = parse(pb.WatchRequest(reports=[report("x" * 200)]).SerializeToString())
    assert isinstance(big, Malformed) and "over its limit of 100" in big.reason
    assert isinstance(parse(b"\xff\xff\xff"), Malformed)


def test_release_json_bounds() -> None:
    with pytest.raises(ReleaseRejected, match="not JSON"):
        parse_release(b"[" * 100_000)  # deep nesting: a RecursionError inside json
    with pytest.raises(ReleaseRejected, match="over"):
        parse_release(b" " * (2 << 20))
    for version in (2**63, 0, -1):
        document = {"format": 1, "model": "m", "version": version}
        with pytest.raises(ReleaseRejected, match="version"):
            parse_release(json.dumps(document).encode())


def _external(tensor: TensorProto, location: str) -> None:
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location


def _with_hidden_external(kind: str, location: str) -> onnx.ModelProto:
    """A model whose only external tensor sits where graph.initializer does not show it."""
    import numpy as np

    value = numpy_helper.from_array(np.ones(4, np.float32), "c")
    _external(value, location)
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    if kind == "attribute":
        graph = helper.make_graph(
            [helper.make_node("Constant", [], ["y"], value=value)], "g", [], [out]
        )
        return helper.make_model(graph)
    if kind == "sparse":
        indices = numpy_helper.from_array(np.arange(4, dtype=np.int64), "i")
        sparse = helper.make_sparse_tensor(value, indices, [4])
        graph = helper.make_graph(
            [helper.make_node("Constant", [], ["y"], sparse_value=sparse)], "g", [], [out]
        )
        return helper.make_model(graph)
    body = helper.make_node("Constant", [], ["z"], value=value)
    function = helper.make_function("local", "f", [], ["z"], [body], [helper.make_opsetid("", 17)])
    graph = helper.make_graph([helper.make_node("f", [], ["y"], domain="local")], "g", [], [out])
    return helper.make_model(
        graph,
        functions=[function],
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
    )


@pytest.mark.parametrize("kind", ["attribute", "sparse", "function"])
def test_external_data_outside_the_initializers_is_checked(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    onnx.save(_with_hidden_external(kind, "../../etc/passwd"), path)
    with pytest.raises(ModelLoadError, match="not a plain file name"):
        validate_external_data(path)


@pytest.mark.parametrize("kind", ["attribute", "sparse", "function"])
def test_a_release_graph_keeps_external_data_in_its_initializers(kind: str, tmp_path: Path) -> None:
    import modelgen

    release = build_release(modelgen.mlp(tmp_path / "m.onnx", 1), "mlp", 1, tmp_path / "r")
    graph = tmp_path / "hidden.onnx"
    onnx.save(_with_hidden_external(kind, release.files[0].path), graph)
    with pytest.raises(ReleaseRejected, match="outside the graph's initializers"):
        check_graph_contract(release, graph)


@pytest.mark.parametrize(
    ("value", "token"),
    [
        ("Bearer abc", "abc"),
        (b"Bearer abc", "abc"),
        ("bearer  abc ", "abc"),
        ("BEARER abc", "abc"),
        ("abc", ""),  # a bare token is not a bearer credential
        ("Basic YWJj", ""),
        ("Bearer", ""),
        ("", ""),
    ],
)
def test_one_bearer_parser_for_every_listener(value: str | bytes, token: str) -> None:
    assert auth.bearer_token(value) == token
    assert auth.bearer([("authorization", value), ("x-device-id", b"d1")]) == (token, "d1")
