"""Named points on the install path where a test can cut the agent off or hold it, to prove that
a power cut or a full disk at that exact step leaves nothing behind.

    EDGE_AGENT_FAILPOINT="<point>:kill"           SIGKILL the agent there (a power cut)
    EDGE_AGENT_FAILPOINT="<point>:pause:<file>"   wait there while <file> exists (creating
                                                  <file>.reached on arrival)

Unset (always, outside tests) a point costs one dictionary lookup. The points, in order:
sync.downloaded, sync.assembled, install.staged, install.renamed, sync.recorded.
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


def reach(point: str) -> None:
    spec = os.environ.get(ENVIRONMENT)
    if not spec:
        return
    name, _, action = spec.partition(":")
    if name != point:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action.startswith("pause:"):
        flag = Path(action.removeprefix("pause:"))
        Path(f"{flag}.reached").touch()
        while flag.exists():
            time.sleep(0.05)
