"""ruff and mypy, as configured in pyproject.toml, are clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_layers_point_one_way() -> None:
    """common/ imports no subsystem; repository/, runtime/, scheduling/ and compress/ never import
    the API layer above them (they share the codec and file writes through common/)."""
    import ast

    rules = {
        "common": ("edge_agent.",),
        "repository": ("edge_agent.api", "edge_agent.compress", "edge_agent.sync"),
        "runtime": ("edge_agent.api", "edge_agent.repository"),
        "scheduling": ("edge_agent.api", "edge_agent.repository"),
        "compress": ("edge_agent.api", "edge_agent.repository"),
    }
    allowed = ("edge_agent.errors", "edge_agent.observability", "edge_agent._proto")
    broken = []
    for package, forbidden in rules.items():
        for path in (ROOT / "edge_agent" / package).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    module = node.module
                    own = package == "common" and module.startswith("edge_agent.common")
                    if module.startswith(forbidden) and not module.startswith(allowed) and not own:
                        broken.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not broken, broken
