"""The agent's sync task: a thread of its own, off the inference path.

    long-poll WatchDesiredState (carrying the last reports: sync/reports.py, and how the
    device serves: sync/health.py)
      -> bring each model to its desired version (sync/converge.py: fetch, verify, assemble,
         hand over to the lifecycle's hot-swap path)
      -> the learning tasks of the answer go to the participant (learn/participant.py)

With the control plane unreachable, or a converge that failed for a transient reason, it backs off
exponentially with full jitter, fails over to the next control-plane address and asks again.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import threading

import grpc

from edge_agent.common.device_blobs import DeviceBlobs
from edge_agent.fleet import auth
from edge_agent.fleet.connect import FailoverStub, channel_credentials
from edge_agent.learn.examples import ExampleStore
from edge_agent.learn.participant import Participant
from edge_agent.learn.process import Pacing
from edge_agent.observability.logging import get_logger
from edge_agent.repository.lifecycle import ModelManager
from edge_agent.settings import Settings
from edge_agent.sync.calls import ControlPlaneCalls
from edge_agent.sync.converge import RETRYABLE_CODES, Converger
from edge_agent.sync.fetch import ASSEMBLY, ReleaseFetcher
from edge_agent.sync.health import HealthReporter
from edge_agent.sync.onloop import ManagerOnLoop
from edge_agent.sync.reports import Reporter, SyncStats
from edge_agent.sync.state import STATE_FILE, SyncState

log = get_logger(__name__)

BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 60.0


class Syncer:
    def __init__(
        self,
        settings: Settings,
        manager: ModelManager,
        loop: asyncio.AbstractEventLoop,
        examples: ExampleStore | None = None,
    ) -> None:
        assert settings.state_dir is not None and settings.device_token_file is not None
        self._settings = settings
        root = settings.state_dir / "sync"
        root.mkdir(parents=True, exist_ok=True)
        # What a cut left: an assembled copy (made again from the blobs) and blobs no pending
        # release needs (an install recorded just before the cut, a release no longer wanted).
        shutil.rmtree(root / ASSEMBLY, ignore_errors=True)
        blobs = DeviceBlobs(root)
        state = SyncState(root / STATE_FILE)
        freed = blobs.retain(state.needed())
        if freed:
            log.info("sync.store_cleaned", bytes_freed=freed)
        meta = auth.metadata(auth.read_token(settings.device_token_file), settings.device_id)
        credentials = channel_credentials(
            settings.control_plane_ca, settings.tls_cert, settings.tls_key
        )
        self._calls = ControlPlaneCalls(FailoverStub(settings.control_plane, credentials), meta)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sync", daemon=True)
        on_loop = ManagerOnLoop(manager, loop)
        self._reporter = Reporter(on_loop, state)
        self._health = HealthReporter(manager.versions, settings.state_dir)
        self.stats: SyncStats = self._reporter.stats
        fetcher = ReleaseFetcher(
            root,
            self._calls,
            blobs,
            state,
            manager.repository,
            settings.sync_bandwidth_limit,
            self._stop,
            self._reporter.count_bytes,
        )
        self._converger = Converger(
            settings, self._calls, on_loop, state, blobs, fetcher, self._reporter, self._stop
        )
        self.participant: Participant | None = None
        if settings.learn and examples is not None:
            self.participant = Participant(
                self._calls.stub,
                self._calls.metadata,
                blobs,
                examples,
                manager.repository,
                on_loop.serving,
                root,
                manager.activity,
                Pacing(
                    settings.train_when, settings.train_quiet_ms / 1000, settings.min_train_share
                ),
            )

    def start(self) -> None:
        self._thread.start()
        if self.participant is not None:
            self.participant.start()

    def stop(self) -> None:
        self._stop.set()
        if self.participant is not None:
            self.participant.stop()
        self._calls.close()  # cancels the long-poll in flight
        self._thread.join(timeout=10)

    def _run(self) -> None:
        revision = ""
        attempt = 0
        connected = False
        while not self._stop.is_set():
            try:
                desired = self._calls.watch(
                    revision,
                    self._settings.sync_interval,
                    self._reporter.reports(),
                    self._health.report(),
                )
            except grpc.RpcError as exc:
                if self._stop.is_set():
                    return
                self._reporter.count_failure("unreachable")
                log.warning(
                    "sync.unreachable",
                    control_plane=self._calls.address,
                    code=exc.code().name,
                    error=exc.details(),
                )
                connected = False
                attempt += 1
                if exc.code() in RETRYABLE_CODES:
                    self._fail_over(attempt)
                self._stop.wait(self._backoff(attempt))
                continue
            if not connected:  # the first answer, and the first after an outage
                connected = True
                log.info(
                    "sync.connected",
                    control_plane=self._calls.address,
                    device_id=self._settings.device_id,
                    desired={t.model: int(t.version) for t in desired.models},
                )
            self._reporter.answered()
            if self.participant is not None:
                self.participant.assign(desired.learning)
            if self._converger.converge(desired):
                revision, attempt = desired.revision, 0
            else:
                revision = ""  # ask again at once after the backoff: the cause may be gone
                attempt += 1
                if self._converger.unreachable:  # a download cut: the next replica resumes it
                    self._fail_over(attempt)
                self._stop.wait(self._backoff(attempt))

    def _fail_over(self, attempt: int) -> None:
        address = self._calls.fail_over()
        if address is not None:
            log.warning("sync.fail_over", control_plane=address, attempt=attempt)

    @staticmethod
    def _backoff(attempt: int) -> float:
        """Exponential with full jitter: spreads a fleet's retries after an outage."""
        return random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** min(attempt, 10)))
