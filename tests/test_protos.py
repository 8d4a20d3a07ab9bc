"""The committed stubs match protos/, and our protocol matches Triton's field for field."""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUBS = ROOT / "edge_agent" / "_proto"

# Dumps (message, field, number, type) of a generated module. Run in a subprocess per module:
# ours and tritonclient's cannot share one process (see edge_agent/_proto/__init__.py).
DUMP = """
import importlib, json, sys
from google.protobuf import descriptor_pb2
fields, methods = [], []
for mod in sys.argv[1:]:
    proto = descriptor_pb2.FileDescriptorProto()
    importlib.import_module(mod).DESCRIPTOR.CopyToProto(proto)
    def walk(messages, prefix):
        for m in messages:
            for f in m.field:
                fields.append([prefix + m.name, f.name, f.number, f.type, f.label, f.type_name])
            walk(m.nested_type, prefix + m.name + ".")
    walk(proto.message_type, proto.package + ".")
    for e in proto.enum_type:
        fields += [[proto.package + "." + e.name, v.name, v.number, 0, 0, ""] for v in e.value]
    for s in proto.service:
        methods += [[s.name, m.name, m.input_type, m.output_type, m.client_streaming,
                     m.server_streaming] for m in s.method]
print(json.dumps({"fields": fields, "methods": methods}))
"""


def dump(*modules: str) -> dict[str, list[list[object]]]:
    out = subprocess.run(
        [sys.executable, "-c", DUMP, *modules], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_committed_stubs_match_protos(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "scripts/generate_protos.py", str(tmp_path)], check=True, cwd=ROOT
    )
    generated = sorted(
        p.relative_to(tmp_path / "edge_agent" / "_proto")
        for p in (tmp_path / "edge_agent" / "_proto").glob("*_pb2*")
    )
    committed = sorted(p.relative_to(STUBS) for p in STUBS.glob("*_pb2*"))
    assert generated == committed
    stale = [
        str(p)
        for p in generated
        if not filecmp.cmp(tmp_path / "edge_agent" / "_proto" / p, STUBS / p, shallow=False)
    ]
    assert not stale, f"regenerate with: python scripts/generate_protos.py ({stale})"


# Our additions; a client that does not know a field skips it on the wire.
EXTENSIONS = {
    ("inference.ModelMetadataResponse", "parameters"),
    ("inference.ModelMetadataResponse.ParametersEntry", "key"),
    ("inference.ModelMetadataResponse.ParametersEntry", "value"),
}


def test_wire_compatible_with_tritonclient() -> None:
    ours = dump("edge_agent._proto.grpc_service_pb2", "edge_agent._proto.model_config_pb2")
    theirs = dump("tritonclient.grpc.service_pb2", "tritonclient.grpc.model_config_pb2")
    their_fields = {tuple(f[:2]): f for f in theirs["fields"]}
    assert len(ours["fields"]) > 250  # the whole ModelConfig and every message we serve
    for field in ours["fields"]:
        if tuple(field[:2]) in EXTENSIONS:
            if not str(field[0]).endswith("Entry"):
                assert field[2] >= 100  # far from any number Triton may take
            continue
        assert their_fields.get(tuple(field[:2])) == field, field
    their_methods = {m[1]: m for m in theirs["methods"]}
    for method in ours["methods"]:
        assert their_methods[method[1]] == method
