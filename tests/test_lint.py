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


def _imports(path: Path, module: str) -> list[str]:
    """Every edge_agent module `path` imports, anywhere in the file (lazy imports too): for
    `from X import Y`, X.Y when that is a module, else X."""
    import ast

    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                is_module = (ROOT / (full.replace(".", "/") + ".py")).exists() or (
                    ROOT / full.replace(".", "/")
                ).is_dir()
                found.append(full if is_module else base)
    return [name for name in found if name == "edge_agent" or name.startswith("edge_agent.")]


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted((ROOT / "edge_agent").rglob("*.py")):
        relative = path.relative_to(ROOT).with_suffix("")
        parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
        modules[".".join(parts)] = path
    return modules


def test_layers_point_one_way() -> None:
    """Every import in edge_agent/ follows edge_agent/layers.py: down, or within its own entry."""
    from edge_agent import layers

    broken = []
    for module, path in _modules().items():
        if layers.entry_of(module) is None:
            broken.append(f"{module}: not in the layer table")
            continue
        for imported in _imports(path, module):
            why = layers.violation(module, imported)
            if why:
                broken.append(why)
    assert not broken, "\n".join(sorted(set(broken)))


def test_only_the_progress_module_imports_rich() -> None:
    """The terminal display is one module: compression, training and the upload stream take
    plain callbacks, and nothing else pays rich's import (lazy imports counted too)."""
    import ast

    importers = set()
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            if any(name == "rich" or name.startswith("rich.") for name in names):
                importers.add(module)
    assert importers == {"edge_agent.common.progress"}


def test_layer_rules_catch_what_they_forbid() -> None:
    from edge_agent import layers

    assert layers.violation("edge_agent.agent", "edge_agent.fleet.cli")  # the publisher CLI
    assert layers.violation("edge_agent.controlplane.server", "edge_agent.api.servicer")
    assert layers.violation("edge_agent.learn.participant", "edge_agent.sync.syncer")
    assert layers.violation("edge_agent.common.files", "edge_agent.settings")
    assert layers.violation("edge_agent.sync.converge", "edge_agent.api.dataplane")  # siblings
    assert layers.violation("edge_agent.nowhere", "edge_agent.errors")
    assert layers.violation("edge_agent.scheduling.queues", "edge_agent.observability.metrics")
    assert not layers.violation("edge_agent.scheduling.queues", "edge_agent.observability.logging")
    assert not layers.violation("edge_agent.api.http", "edge_agent.api.dataplane")
    assert not layers.violation("edge_agent.repository.version", "edge_agent")  # __version__


def test_readme_shows_the_layers() -> None:
    from edge_agent import layers

    assert layers.table() in (ROOT / "docs" / "architecture.md").read_text()
