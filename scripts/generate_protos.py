"""Generate the Python stubs in edge_agent/_proto from protos/ (never edit the output by hand).

    python scripts/generate_protos.py [OUT_DIR]

Without OUT_DIR the stubs are written into the checkout; tests/test_protos.py writes them to a
temporary directory and fails when they differ from the committed ones.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"


def generate(out_dir: Path) -> list[Path]:
    sources = sorted(PROTOS.rglob("*.proto"))
    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(s.relative_to(PROTOS)) for s in sources),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p for p in out_dir.rglob("*") if p.suffix in {".py", ".pyi"})


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
