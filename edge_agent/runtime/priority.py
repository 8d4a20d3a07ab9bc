"""Build new versions at a lower CPU priority than serving (Linux thread nice values).

A swap builds and warms a session while the old version serves; on a busy device the two fight
for the same cores and serving latency pays. The loader thread runs at `loader_nice` above the
process's nice value, and so do the ONNX Runtime threads a build spawns (threads inherit the nice
value of their creator). Before the new version may serve, those spawned threads are set back to
the process's nice value, so the new version serves at full priority.

Setting a thread back to a lower nice value needs root, CAP_SYS_NICE, or RLIMIT_NICE (systemd:
`LimitNICE=`) allowing it. Where it is not allowed, nothing is lowered at all (serving threads
stuck at a low priority would be worse than loads competing): `Priority.enabled` is False and
the agent logs why once.
"""

from __future__ import annotations

import contextlib
import os
import resource
import threading
from collections.abc import Iterator
from pathlib import Path

_TASKS = Path("/proc/self/task")


def thread_ids() -> set[int]:
    try:
        return {int(name) for name in os.listdir(_TASKS)}
    except OSError:
        return set()


def _restorable(base: int, raised: int) -> str | None:
    """None when a thread at `raised` may go back to `base`, else why not."""
    if not hasattr(os, "setpriority") or not _TASKS.is_dir():
        return "per-thread nice values need Linux"
    if os.geteuid() == 0:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    # RLIMIT_NICE r allows nice values down to 20 - r.
    if soft == resource.RLIM_INFINITY or 20 - soft <= base:
        return None
    return f"RLIMIT_NICE is {soft}: threads could not return to nice {base} (LimitNICE=)"


class Priority:
    def __init__(self, loader_nice: int) -> None:
        linux = hasattr(os, "getpriority")
        self.base = os.getpriority(os.PRIO_PROCESS, os.getpid()) if linux else 0
        self.loader = min(self.base + loader_nice, 19)
        self.disabled_reason = None if loader_nice else "loader_nice is 0"
        if self.disabled_reason is None:
            self.disabled_reason = _restorable(self.base, self.loader)

    @property
    def enabled(self) -> bool:
        return self.disabled_reason is None

    def lower_this_thread(self) -> None:
        """The loader thread's initializer."""
        if self.enabled:
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.loader)

    @contextlib.contextmanager
    def spawned(self) -> Iterator[set[int]]:
        """Collects the threads started while the block runs (the session's pools)."""
        before = thread_ids()
        spawned: set[int] = set()
        try:
            yield spawned
        finally:
            spawned |= thread_ids() - before

    def restore(self, tids: set[int]) -> None:
        if not self.enabled:
            return
        for tid in tids:
            # Gone already (ProcessLookupError) or refused: either way nothing more to do.
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, tid, self.base)
