"""The reference pages in docs/reference/ are generated from the code (scripts/gen_reference.py)
and must match it: a setting, flag, exit code or metric changed without regenerating them fails
here (tests/test_metrics_reference.py also checks the metrics page against real scrapes). And
they leave nothing blank: every argument of every command has help, every setting a comment,
every setting with a serve flag shows that flag."""

from __future__ import annotations

import argparse
import functools
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def generator() -> ModuleType:
    """scripts/gen_reference.py as a module: the same walk over the parsers as the pages."""
    spec = importlib.util.spec_from_file_location(
        "gen_reference", ROOT / "scripts" / "gen_reference.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def arg_name(action: argparse.Action) -> str:
    return action.option_strings[0] if action.option_strings else action.dest


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


def table_rows(text: str) -> list[list[str]]:
    """The cells of every table row of a page that names something in its first cell."""
    lines = [line for line in text.splitlines() if line.startswith("| `")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]


def test_every_argument_of_every_command_has_help() -> None:
    gen = generator()
    missing = [
        f"{command} {arg_name(action)}"
        for command, parser in gen.parsers()
        for action in gen.arguments(parser)
        if not gen.help_text(parser, action).strip()
    ]
    assert not missing, f"arguments without help: {missing}"


def test_the_cli_page_shows_help_as_argparse_prints_it_with_the_choices() -> None:
    gen = generator()
    page = gen.cli_page()
    assert "%%" not in page and "%(" not in page
    assert "PCT% of the devices" in page
    with_choices = [
        (command, action)
        for command, parser in gen.parsers()
        for action in gen.arguments(parser)
        if action.choices is not None
    ]
    assert {(command, arg_name(a)) for command, a in with_choices} >= {
        ("edge-agent models", "action"),
        ("edge-agent optimize", "--mode"),
        ("edge-agent serve", "--front-end"),
    }
    for command, action in with_choices:
        section = page[page.index(f"## `{command}`\n") :]
        first = f"| `{arg_name(action)}`"
        line = next(line for line in section.splitlines() if line.startswith(first))
        shown = "one of " + ", ".join(f"`{choice}`" for choice in action.choices)
        assert line.rstrip(" |").endswith(shown), (command, line)


def test_every_setting_is_described_and_shows_its_flag() -> None:
    gen = generator()
    rows = table_rows(gen.settings_page())
    assert rows and all(len(cells) == 6 for cells in rows)
    undescribed = [cells[0] for cells in rows if not cells[-1]]
    assert not undescribed, f"settings without a comment in edge_agent/settings.py: {undescribed}"
    assert [cells[3] for cells in rows if cells[0] == "`trusted_keys`"] == ["`--trusted-key`"]
    serve = dict(gen.parsers())["edge-agent serve"]
    flags = {a.option_strings[0] for a in gen.arguments(serve)} - {"--config"}
    assert {cells[3].strip("`") for cells in rows if cells[3] != "—"} == flags


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
