"""docs/reference/metrics.md against real scrapes: a control plane and an agent enrolled with
it, with every setting that adds metrics on (state_dir, control_plane, learn, and the control
plane's per-device series), each scraped over plain HTTP after one inference. Every family a
scrape shows must be in the page with the same type, and every family the page lists for that
process must be on the scrape: a metric added, renamed or retyped without regenerating the page
(scripts/gen_reference.py) fails here, and so does a page listing one the process lacks."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Callable
from pathlib import Path

from test_sync import Fleet

import modelgen
from conftest import ROOT, Daemon

PAGE = ROOT / "docs" / "reference" / "metrics.md"
AGENT, CONTROL_PLANE = "## Agent", "## Control plane"


def documented(section: str) -> dict[str, str]:
    """The page's families under `section`: name -> type."""
    text = PAGE.read_text()
    start = text.index(section)
    end = text.find("\n## ", start + 1)
    rows = re.findall(
        r"^\| `([a-z0-9_]+)` \| ([a-z]+) \|", text[start : end if end > 0 else None], re.M
    )
    return dict(rows)


def scrape(port: int) -> dict[str, str]:
    """The families a /metrics shows (its `# TYPE` lines): name -> type."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))


def infer(agent: Daemon) -> None:
    """One request to the shipped digits model over KServe v2 HTTP (JSON)."""
    import numpy as np

    sample = np.load(ROOT / "models" / "digits" / "sample.npy")
    port = agent.named("agent.started")[0]["http_port"]
    body = {
        "inputs": [
            {
                "name": "input",
                "shape": list(sample.shape),
                "datatype": "FP32",
                "data": sample.ravel().tolist(),
            }
        ]
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/models/digits/infer",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert json.load(answer)["model_name"] == "digits"


def test_every_metric_a_real_scrape_shows_is_in_the_reference(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    fleet = Fleet(
        tmp_path, start_daemon, "--metrics-address", "127.0.0.1:0", "--metrics-per-device"
    )
    fleet.add_device("cam-1")
    modelgen.copy_shipped(tmp_path / "repo-cam-1")  # the repository Fleet.agent serves
    agent = fleet.agent("cam-1", "--learn", "--http-address", "127.0.0.1:0").wait_started()
    infer(agent)
    for section, port in (
        (AGENT, agent.named("agent.started")[0]["metrics_port"]),
        (CONTROL_PLANE, fleet.cp.named("controlplane.started")[0]["metrics_port"]),
    ):
        page, scraped = documented(section), scrape(port)
        assert page, f"{section}: no metrics in docs/reference/metrics.md"
        missing = {n: t for n, t in scraped.items() if page.get(n) != t}
        assert not missing, (
            f"{section}: on /metrics but not in docs/reference/metrics.md (or with another "
            f"type): {missing}; run scripts/gen_reference.py"
        )
        absent = sorted(set(page) - set(scraped))
        assert not absent, f"{section}: in the page but not on /metrics: {absent}"
