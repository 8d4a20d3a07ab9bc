"""The reference pages in docs/reference/ are generated from the code (scripts/gen_reference.py)
and must match it: a setting, flag or exit code changed without regenerating them fails here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_reference_pages_match_the_code(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_reference.py"), str(tmp_path)],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    committed = ROOT / "docs" / "reference"
    for page in sorted(tmp_path.iterdir()):
        stale = (committed / page.name).read_text() != page.read_text()
        assert not stale, f"docs/reference/{page.name} is stale: run scripts/gen_reference.py"
    names = {p.name for p in committed.iterdir()}
    assert names == {p.name for p in tmp_path.iterdir()}, names


def test_the_reference_names_every_setting_and_command() -> None:
    settings = (ROOT / "docs" / "reference" / "settings.md").read_text()
    for name in ("grpc_address", "max_concurrent_rpcs", "control_plane", "sync_interval"):
        assert f"| `{name}` |" in settings
    commands = (ROOT / "docs" / "reference" / "cli.md").read_text()
    for command in (
        "edge-agent serve",
        "edge-agent control-plane serve",
        "edge-agent fleet target",
    ):
        assert f"## `{command}`" in commands
    assert "`--max-p99-ratio`" in commands and "`78` a configuration error" in commands
