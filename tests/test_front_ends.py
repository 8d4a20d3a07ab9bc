"""The sync front end (front_end = "sync", api/sync_front.py) keeps every guarantee of the
asyncio one: the serving, concurrency (queues, deadlines, priorities, statistics), bad-input,
lifecycle (swaps under load fail nothing), shared memory and unix socket suites run again, as
they are, against agents started with EDGE_AGENT_FRONT_END=sync."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable

from conftest import ROOT, Daemon

SUITES = [
    "tests/test_serving.py",
    "tests/test_concurrency.py",
    "tests/test_bad_input.py",
    "tests/test_inline_and_warmup.py",
    "tests/test_lifecycle.py",
    "tests/test_shared_memory.py",
    "tests/test_unix_socket.py",
]
# Inline execution on the event loop, and its demotion, belong to the asyncio front end: on the
# sync one an idle model runs on the handler thread, never on the loop.
ASYNCIO_ONLY = "not inline_is_decided_by_the_graph"


def test_the_serving_suites_pass_on_the_sync_front_end() -> None:
    # A short base directory: the unix socket tests' paths must fit AF_UNIX's 108 bytes.
    base = tempfile.mkdtemp(prefix="ea-fe-")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         "--basetemp", base, "-k", ASYNCIO_ONLY, *SUITES],
        cwd=ROOT,
        env={**os.environ, "EDGE_AGENT_FRONT_END": "sync"},
        capture_output=True,
        text=True,
        timeout=1500,
    )  # fmt: skip
    shutil.rmtree(base, ignore_errors=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout


def test_the_setting_reaches_the_agent(start_daemon: Callable[..., Daemon]) -> None:
    agent = start_daemon(
        "--model-repository", str(ROOT / "models"), "--execution-providers", "cpu",
        env={"EDGE_AGENT_FRONT_END": "sync"},
    ).wait_started()  # fmt: skip
    assert agent.named("agent.started")[0]["front_end"] == "sync"
    default = start_daemon(
        "--model-repository", str(ROOT / "models"), "--execution-providers", "cpu"
    ).wait_started()  # fmt: skip
    assert default.named("agent.started")[0]["front_end"] in ("aio", "sync")
