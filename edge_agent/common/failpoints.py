"""Named points where a test can cut the agent off or hold it: on the install path, to prove that
a power cut or a full disk at that exact step leaves nothing behind; in a model's run, to hold a
request mid-execution for as long as a test needs (a drain that must let it finish), without
depending on how fast the machine computes.

    EDGE_AGENT_FAILPOINT="<point>:kill"           SIGKILL the agent there (a power cut)
    EDGE_AGENT_FAILPOINT="<point>:pause:<file>"   wait there while <file> exists (creating
                                                  <file>.reached on arrival)

The variable is read once, at import (the agent's process reads it at start). Unset (always,
outside tests) a point costs one comparison, on the request path too. The install points, in
order: sync.downloaded, sync.assembled, install.staged, install.renamed, sync.recorded; and
request.executing, on the execution thread at the start of each run of a model version (a model
executed inline would hold the event loop: give it `execution_inline: false`).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

ENVIRONMENT = "EDGE_AGENT_FAILPOINT"
POINTS = (
    "sync.downloaded",  # every blob of the release is in the store
    "sync.assembled",  # the release is assembled in STATE_DIR/sync/staging
    "install.staged",  # built and checked in REPO/.staging, not yet renamed in
    "install.renamed",  # renamed into the repository, not yet recorded by the sync
    "sync.recorded",  # recorded, its blobs not yet dropped from the store
)
REQUEST_EXECUTING = "request.executing"
_SPEC = os.environ.get(ENVIRONMENT, "")


def reach(point: str) -> None:
    if not _SPEC:
        return
    name, _, action = _SPEC.partition(":")
    if name != point:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action.startswith("pause:"):
        flag = Path(action.removeprefix("pause:"))
        Path(f"{flag}.reached").touch()
        while flag.exists():
            time.sleep(0.05)
