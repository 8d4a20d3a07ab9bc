"""The reference pages in docs/reference/ are generated from the code (scripts/gen_reference.py)
and must match it: a setting, flag, exit code or metric changed without regenerating them fails
here (tests/test_metrics_reference.py also checks the metrics page against real scrapes)."""

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


def row(page: str, name: str) -> list[str]:
    """The cells of the table row of `name` (a setting or a metric) on a reference page."""
    text = (ROOT / "docs" / "reference" / page).read_text()
    (line,) = [line for line in text.splitlines() if line.startswith(f"| `{name}` |")]
    return [cell.strip() for cell in line.strip("|").split(" | ")]


def test_a_comment_over_a_group_of_settings_describes_each_of_them() -> None:
    hygiene = "Connection hygiene, per listener"
    for name in ("max_connections", "max_connections_per_peer", "connection_idle_seconds"):
        assert row("settings.md", name)[-1].startswith(hygiene), name
    assert row("settings.md", "max_elements_per_request")[-1].startswith("Elements one input")
    # A field that only follows a comment about another one does not inherit it, and a
    # trailing comment is the field's own.
    assert "Prometheus" not in row("settings.md", "log_level")[-1]
    assert row("settings.md", "control_plane_ca")[-1] == (
        "TLS to the control plane, verified with this CA"
    )


def test_the_metrics_reference_names_metrics_with_their_type_and_labels() -> None:
    _, kind, labels, exposed, _ = row("metrics.md", "nv_inference_request_failure")
    assert kind == "untyped" and exposed == "always"
    assert labels == "`model`, `version`, `reason` (`REJECTED`, `CANCELED`, `BACKEND`, `OTHER`)"
    _, kind, labels, _, _ = row("metrics.md", "edge_agent_rejected_requests_total")
    assert kind == "counter" and labels.startswith("`model`, `version`, `cause` (`queue_full`")
    _, kind, labels, _, _ = row("metrics.md", "edge_agent_batch_size")
    assert kind == "histogram" and labels.startswith("`model`, `version`; buckets `le`: 1, 2, 4")
    _, kind, labels, exposed, _ = row("metrics.md", "edge_agent_sync_model_version")
    assert (kind, labels, exposed) == ("gauge", "`model`, `kind`", "with `--control-plane`")
    _, kind, labels, exposed, _ = row("metrics.md", "edge_agent_controlplane_device_requests_total")
    assert (kind, labels) == ("counter", "`device`, `model`, `version`")
    assert exposed == "with `--metrics-per-device`"
    _, kind, labels, _, _ = row(
        "metrics.md", "edge_agent_controlplane_fleet_request_duration_seconds"
    )
    assert kind == "histogram" and labels.startswith("`model`, `version`, `group`; buckets")
