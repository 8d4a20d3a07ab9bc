"""What the device tells the control plane about each model on its next long-poll (a ModelReport:
installed, serving and target versions, the state of the sync, the last error) and the sync's
numbers for the metrics collector."""

from __future__ import annotations

import dataclasses
import threading
import time

from edge_agent._proto import fleet_pb2 as pb
from edge_agent.repository.version import read_variant
from edge_agent.sync.onloop import ManagerOnLoop
from edge_agent.sync.state import SyncState


@dataclasses.dataclass
class SyncStats:
    """Read by the metrics collector (observability/metrics.py)."""

    bytes_total: int = 0
    failures: dict[str, int] = dataclasses.field(default_factory=dict)
    last_success: float = 0.0
    installed: dict[str, int] = dataclasses.field(default_factory=dict)
    serving: dict[str, int] = dataclasses.field(default_factory=dict)


class Reporter:
    def __init__(self, manager: ManagerOnLoop, state: SyncState) -> None:
        self._manager = manager
        self._state = state
        self._reports: dict[str, pb.ModelReport] = {}
        self._lock = threading.Lock()  # the metrics thread reads the stats
        self.stats = SyncStats(installed={m: max(v) for m, v in state.installed.items() if v})

    def reports(self) -> list[pb.ModelReport]:
        """The latest report of each model, for the next long-poll."""
        return list(self._reports.values())

    def report(self, model: str, version: int, state: str, error: str = "") -> None:
        serving = self._manager.serving(model)
        installed = max(self._state.installed.get(model, [0]))
        with self._lock:
            self.stats.serving[model] = serving
            if installed:
                self.stats.installed[model] = installed
        self._reports[model] = pb.ModelReport(
            model=model,
            installed_version=installed,
            serving_version=serving,
            target_version=version,
            state=state,
            error=error,
            variant=read_variant(self._manager.repository / model / str(serving))
            if serving
            else "",
        )

    def report_arrived(self, model: str, version: int) -> None:
        """`version` is installed: "serving" when it serves, else "installed"."""
        serving = self._manager.serving(model) == version
        self.report(model, version, "serving" if serving else "installed")

    def count_failure(self, reason: str) -> None:
        with self._lock:
            self.stats.failures[reason] = self.stats.failures.get(reason, 0) + 1

    def count_bytes(self, count: int) -> None:
        with self._lock:
            self.stats.bytes_total += count

    def answered(self) -> None:
        """The control plane answered a long-poll."""
        with self._lock:
            self.stats.last_success = time.time()
