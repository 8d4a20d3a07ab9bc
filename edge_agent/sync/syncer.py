"""The agent's sync task: a thread of its own, off the inference path.

    long-poll WatchDesiredState (carrying the last reports)
      -> for each model whose desired version is not what it should be:
         already installed here -> serve it (a control-plane rollback; lifecycle rollback path)
         else: below the rollback floor? -> reject
               GetManifest -> parse release.json, expired? -> reject
               each file: in the store, or in an installed version (copied, checked), or download
               (resumable, chunk-verified, rate-limited)
               assemble STATE_DIR/sync/staging/<model>-<version>/ -> signature against the trusted
               keys -> digests, names and graph contract -> ModelManager.install (staged in the
               repository, built, warmed, renamed in, hot-swapped)
               floor := max(floor, version), persisted
      -> report installed / serving / failed (with reason) on the next poll.

Transient failures (control plane unreachable, transfer cut, disk full) back off exponentially
with full jitter and retry; a rejected release is reported and not retried until the desired
state changes. The serving versions are never touched by a failure.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import shutil
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc

from edge_agent._proto import fleet_pb2 as pb
from edge_agent.common import failpoints
from edge_agent.common.device_blobs import BandwidthLimit, DeviceBlobs
from edge_agent.common.files import write_atomically
from edge_agent.errors import ConfigError, DiskFull, EdgeAgentError, ReleaseRejected
from edge_agent.fleet import auth, signing
from edge_agent.fleet.connect import FailoverStub, channel_credentials
from edge_agent.fleet.release import (
    CHUNK_SIZE,
    DEFAULT_VARIANT,
    RELEASE_JSON,
    VARIANT_FILE,
    Release,
    check_directory,
    check_fresh,
    is_installed_in,
    parse_release,
)
from edge_agent.learn.examples import ExampleStore
from edge_agent.learn.participant import Participant
from edge_agent.learn.process import Pacing
from edge_agent.observability.logging import get_logger
from edge_agent.repository.lifecycle import ModelManager
from edge_agent.repository.version import read_variant
from edge_agent.runtime.session import likely_provider
from edge_agent.settings import Settings

log = get_logger(__name__)
T = TypeVar("T")

# Failures that are retried (reported "retrying", never counted against the release). "digest":
# the signed manifest's chunk digests come from the publisher, so bytes that do not match them
# mean the store or the path is at fault (a corrupt object in the bucket), not the release.
TRANSIENT = frozenset({"unreachable", "transfer", "disk", "disk_full", "internal", "digest"})
RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.ABORTED,
    }
)
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 60.0
STATE_FILE = "state.json"
STAGING = "staging"  # STATE_DIR/sync/staging/<model>-<version>: a release being assembled
FREE_SPACE_RESERVE = 64 << 20  # bytes left free on the state dir's filesystem after a download


@dataclasses.dataclass
class SyncStats:
    """Read by the metrics collector (observability/metrics.py)."""

    bytes_total: int = 0
    failures: dict[str, int] = dataclasses.field(default_factory=dict)
    last_success: float = 0.0
    installed: dict[str, int] = dataclasses.field(default_factory=dict)
    serving: dict[str, int] = dataclasses.field(default_factory=dict)


class SyncState:
    """What must survive a restart: per model the versions installed by sync, the rollback floor
    (the newest version ever installed; nothing older is installed again) and the release being
    fetched (its blobs stay in the store across a restart; every other blob is dropped)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self.floor: dict[str, int] = {}
        self.installed: dict[str, list[int]] = {}
        self.pending: dict[str, tuple[int, list[str]]] = {}  # model -> (version, blob digests)
        if path.exists():
            try:
                data = json.loads(path.read_text())
                self.floor = {str(k): int(v) for k, v in data["floor"].items()}
                self.installed = {
                    str(k): sorted(int(v) for v in vs) for k, vs in data["installed"].items()
                }
                self.pending = {
                    str(k): (int(v), [str(d) for d in ds])
                    for k, (v, ds) in data.get("pending", {}).items()
                }
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                # Refuse to guess a floor: an unreadable state file stops the agent's start
                # (exit 78 with this message; move the file aside to start from nothing).
                raise ConfigError(f"sync state {path} is unreadable: {exc}") from exc

    def add(self, model: str, version: int) -> None:
        """`version` is installed: recorded, and the model has nothing pending (one write)."""
        self.installed[model] = sorted({*self.installed.get(model, []), version})
        self.floor[model] = max(self.floor.get(model, 0), version)
        self.pending.pop(model, None)
        self._save()

    def intend(self, model: str, version: int, digests: Iterable[str]) -> None:
        """Written before the first byte of a release is fetched."""
        entry = (version, sorted(set(digests)))
        if self.pending.get(model) != entry:
            self.pending[model] = entry
            self._save()

    def settle(self, model: str) -> None:
        """The model needs nothing more (its desired version is installed, or was refused)."""
        if self.pending.pop(model, None) is not None:
            self._save()

    def needed(self) -> set[str]:
        return {d for _, digests in self.pending.values() for d in digests}

    def _save(self) -> None:
        state = {"floor": self.floor, "installed": self.installed, "pending": self.pending}
        write_atomically(self._path, json.dumps(state).encode())


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
        self._manager = manager
        self._loop = loop
        self._root = settings.state_dir / "sync"
        self._root.mkdir(parents=True, exist_ok=True)
        # What a cut left: an assembled copy (made again from the store) and blobs no pending
        # release needs (an install recorded just before the cut, a release no longer wanted).
        shutil.rmtree(self._root / STAGING, ignore_errors=True)
        self._store = DeviceBlobs(self._root)
        self._state = SyncState(self._root / STATE_FILE)
        freed = self._store.retain(self._state.needed())
        if freed:
            log.info("sync.store_cleaned", bytes_freed=freed)
        self._keys = [Path(k) for k in settings.trusted_keys]
        self._meta = auth.metadata(auth.read_token(settings.device_token_file), settings.device_id)
        # One or several replicas ("HOST:PORT,HOST:PORT"): calls go to one, the next takes over
        # when it stops answering.
        self._stub = FailoverStub(
            settings.control_plane,
            channel_credentials(settings.control_plane_ca, settings.tls_cert, settings.tls_key),
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sync", daemon=True)
        self._reports: dict[str, pb.ModelReport] = {}
        self._rejected: dict[str, int] = {}  # model -> version rejected for good
        self._unreachable = False  # the last converge lost the control plane
        self._lock = threading.Lock()
        self.stats = SyncStats(installed={m: max(v) for m, v in self._state.installed.items() if v})
        self.participant: Participant | None = None
        if settings.learn and examples is not None:
            self.participant = Participant(
                self._stub,
                self._meta,
                self._store,
                examples,
                manager.repository,
                self._serving,
                self._root,
                manager.activity,
                Pacing(
                    settings.train_when, settings.train_quiet_ms / 1000, settings.min_train_share
                ),
            )

    # -- thread ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        if self.participant is not None:
            self.participant.start()

    def stop(self) -> None:
        self._stop.set()
        if self.participant is not None:
            self.participant.stop()
        self._stub.close()  # cancels the long-poll in flight
        self._thread.join(timeout=10)

    def _run(self) -> None:
        revision = ""
        attempt = 0
        connected = False
        while not self._stop.is_set():
            try:
                desired = self._watch(revision)
            except grpc.RpcError as exc:
                if self._stop.is_set():
                    return
                self._count_failure("unreachable")
                log.warning(
                    "sync.unreachable",
                    control_plane=self._stub.address,
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
                    control_plane=self._stub.address,
                    device_id=self._settings.device_id,
                    desired={t.model: int(t.version) for t in desired.models},
                )
            with self._lock:
                self.stats.last_success = time.time()
            if self.participant is not None:
                self.participant.assign(desired.learning)
            if self._converge(desired):
                revision, attempt = desired.revision, 0
            else:
                revision = ""  # ask again at once after the backoff: the cause may be gone
                attempt += 1
                if self._unreachable:  # a download cut: the next replica resumes it
                    self._fail_over(attempt)
                self._stop.wait(self._backoff(attempt))

    def _fail_over(self, attempt: int) -> None:
        address = self._stub.fail_over()
        if address is not None:
            log.warning("sync.fail_over", control_plane=address, attempt=attempt)

    @staticmethod
    def _backoff(attempt: int) -> float:
        """Exponential with full jitter: spreads a fleet's retries after an outage."""
        return random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** min(attempt, 10)))

    def _watch(self, revision: str) -> pb.DesiredState:
        wait = self._settings.sync_interval
        request = pb.WatchRequest(
            known_revision=revision,
            wait_ms=int(wait * 1000),
            reports=list(self._reports.values()),
        )
        response: pb.DesiredState = self._stub.WatchDesiredState(
            request, metadata=self._meta, timeout=wait + 30
        )
        return response

    def _on_loop(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run a coroutine on the agent's event loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(make(), self._loop).result()

    def _serving(self, model: str) -> int:
        async def read() -> int:
            return self._manager.serving_version(model)

        return self._on_loop(read)

    # -- converging -----------------------------------------------------------------------------

    def _converge(self, desired: pb.DesiredState) -> bool:
        """Bring every model to its desired version; False when a transient failure means the
        whole should be tried again soon."""
        settled = True
        self._unreachable = False
        for target in desired.models:
            model, version = target.model, int(target.version)
            if self._stop.is_set():
                return False
            try:
                self._converge_model(model, version)
            except ReleaseRejected as exc:
                settled &= self._failed(model, version, exc.reason, str(exc))
            except grpc.RpcError as exc:
                reason = "unreachable" if exc.code() in RETRYABLE_CODES else "control_plane"
                self._unreachable |= reason == "unreachable"
                settled &= self._failed(
                    model, version, reason, f"{exc.code().name}: {exc.details()}"
                )
            except DiskFull as exc:
                settled &= self._failed(model, version, "disk_full", str(exc))
            except OSError as exc:
                settled &= self._failed(model, version, "disk", str(exc))
            except EdgeAgentError as exc:  # the version did not load, warm or pass its check
                settled &= self._failed(model, version, "load", str(exc))
            except Exception as exc:  # a bug must not end the sync: logged, retried later
                log.exception("sync.internal_error", model=model, version=version)
                settled &= self._failed(model, version, "internal", repr(exc))
        return settled

    def _failed(self, model: str, version: int, reason: str, message: str) -> bool:
        transient = reason in TRANSIENT
        self._count_failure(reason)
        log.warning(
            "sync.failed",
            model=model,
            version=version,
            reason=reason,
            error=message,
            retry=transient,
        )
        if not transient:
            self._rejected[model] = version
        # Only a rejection is "failed" (it counts towards a rollout's auto-pause); a device
        # that could not reach the control plane or write its disk is "retrying".
        state = "retrying" if transient else "failed"
        self._report(model, version, state, f"{reason}: {message}")
        return not transient

    def _count_failure(self, reason: str) -> None:
        with self._lock:
            self.stats.failures[reason] = self.stats.failures.get(reason, 0) + 1

    def _report(self, model: str, version: int, state: str, error: str = "") -> None:
        serving = self._serving(model)
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

    def _converge_model(self, model: str, version: int) -> None:
        serving = self._serving(model)
        directory = self._manager.repository / model / str(version)
        if version in self._state.installed.get(model, []) and directory.is_dir():
            if serving != version:  # e.g. the control plane rolled a rollout back
                self._on_loop(lambda: self._manager.serve_only_up_to(model, version))
                log.info("sync.serving_installed", model=model, version=version)
            self._settled(model)
            self._report(model, version, self._state_of(model, version))
            return
        if self._rejected.get(model) == version:
            return  # reported; tried again when the desired state changes
        self._rejected.pop(model, None)
        floor = self._state.floor.get(model, 0)
        if version < floor:
            raise ReleaseRejected(
                "rollback", f"version {version} is below the rollback floor {floor} of {model}"
            )
        started = time.monotonic()
        manifest = self._stub.GetManifest(
            pb.GetManifestRequest(model=model, version=version), metadata=self._meta, timeout=60
        )
        release = parse_release(manifest.release_json)
        if (release.model, release.version) != (model, version):
            raise ReleaseRejected(
                "format",
                f"asked for {model} v{version}, the manifest is for "
                f"{release.model} v{release.version}",
            )
        check_fresh(release)
        release, signature = self._choose_variant(release, manifest)
        # Verified before a byte of the blobs moves: the signature vouches for release.json
        # (these bytes) and for every file it lists; what arrives later is checked against it.
        signed = signing.signed_files(signature, self._keys)
        signing.check_signed(
            signed, manifest.release_json, {f.path: f.sha256 for f in release.files}
        )
        if release.size > self._settings.sync_max_release_bytes:
            raise ReleaseRejected(
                "size",
                f"{model} v{version} ({release.variant}) is {release.size} bytes, over "
                f"sync_max_release_bytes {self._settings.sync_max_release_bytes}",
            )
        digests = [f.sha256 for f in release.files]
        # Installed here already, unrecorded: a power cut between the install's rename and its
        # record. The files are the signed ones (checked by digest): served, not installed again.
        if directory.is_dir() and is_installed_in(release, manifest.release_json, directory):
            self._on_loop(lambda: self._manager.adopt(model, version))
            self._recorded(model, version, digests)
            log.info("sync.recognised_installed", model=model, version=version)
            self._report(model, version, self._state_of(model, version))
            return
        # The intent first: across a restart, this release's blobs are kept and all others go.
        self._state.intend(model, version, digests)
        self._report(model, version, "downloading")
        try:
            fetched = self._download_and_install(model, version, release, manifest)
        except (ReleaseRejected, EdgeAgentError) as exc:
            if DiskFull.caused(exc):
                # Nothing of this attempt stays on a full disk; all of it is fetched again
                # once there is room (the free-space check says how much before that).
                self._store.discard(digests)
            elif not (isinstance(exc, ReleaseRejected) and exc.reason in TRANSIENT):
                self._store.discard(digests)  # refused for good: its blobs go at once
                self._settled(model)
            raise
        self._recorded(model, version, digests)
        log.info(
            "sync.installed",
            model=model,
            version=version,
            variant=release.variant,
            bytes_fetched=fetched,
            release_bytes=release.size,
            seconds=round(time.monotonic() - started, 3),
        )
        self._report(model, version, self._state_of(model, version))

    def _download_and_install(
        self, model: str, version: int, release: Release, manifest: pb.Manifest
    ) -> int:
        """Fetch what is missing, assemble, check and install; the bytes downloaded. A full disk
        at any step raises DiskFull."""
        staged: Path | None = None
        try:
            sources, fetched = self._fetch_all(release, manifest.blobs)
            failpoints.reach("sync.downloaded")
            staged = self._assemble(release, manifest.release_json, sources)
            failpoints.reach("sync.assembled")
            # Every file against its signed digest, the exact file set, the graph contract.
            check_directory(release, staged)
            check_fresh(release)
            # Unsigned, written after the checks: which variant this version directory holds.
            (staged / VARIANT_FILE).write_text(release.variant + "\n")
            # The manager moves the files into the repository's staging (one copy when the state
            # dir is on another filesystem).
            self._on_loop(lambda: self._manager.load_release(model, version, staged))
        except OSError as exc:
            if DiskFull.caused(exc):
                raise DiskFull(self._root, release.size, f"{model} v{version}") from exc
            raise
        finally:
            if staged is not None:
                shutil.rmtree(staged, ignore_errors=True)
        return fetched

    def _recorded(self, model: str, version: int, digests: Iterable[str]) -> None:
        """Record the install (which also clears the model's intent), then drop its blobs: a
        cut between the two leaves blobs that the next start's `retain` removes."""
        self._state.add(model, version)
        failpoints.reach("sync.recorded")
        self._store.discard(digests)  # now in the repository
        self._store.retain(self._state.needed())

    def _settled(self, model: str) -> None:
        if model in self._state.pending:
            self._state.settle(model)
            self._store.retain(self._state.needed())

    def _choose_variant(self, release: Release, manifest: pb.Manifest) -> tuple[Release, bytes]:
        """The variant this device will run (by its likely provider and the preference), and its
        signature; only that variant's files are fetched."""
        provider = likely_provider(self._settings.execution_providers)
        preference = (
            self._settings.variant_preference_cuda
            if provider == "cuda"
            else self._settings.variant_preference_cpu
        )
        available = release.variant_names()
        name = next((v for v in preference if v in available), DEFAULT_VARIANT)
        if name == DEFAULT_VARIANT:
            return release, manifest.signature
        signature = manifest.variant_signatures.get(name)
        if not signature:
            raise ReleaseRejected("signature", f"variant {name} has no signature")
        return release.select(name), signature

    def _state_of(self, model: str, version: int) -> str:
        return "serving" if self._serving(model) == version else "installed"

    # -- files ----------------------------------------------------------------------------------

    def _local_files(self) -> dict[str, Path]:
        """sha256 -> a file of an installed version with that content (from its release.json)."""
        found: dict[str, Path] = {}
        for model, versions in self._state.installed.items():
            for version in versions:
                directory = self._manager.repository / model / str(version)
                try:
                    release = parse_release((directory / RELEASE_JSON).read_bytes())
                except (OSError, ReleaseRejected):
                    continue
                for entry in release.all_files():  # only the installed variant's exist
                    if (directory / entry.path).is_file():
                        found.setdefault(entry.sha256, directory / entry.path)
        return found

    def _fetch_all(
        self, release: Release, blobs: Iterable[pb.BlobRef]
    ) -> tuple[dict[str, Path], int]:
        """Where each file of the release is on this device (the store, or an installed version
        that has the same content), downloading what is nowhere; and the bytes downloaded.
        Content found locally is checked when the release is assembled (check_directory)."""
        refs = {b.digest: b for b in blobs}
        local = self._local_files()
        limit = BandwidthLimit(self._settings.sync_bandwidth_limit)
        fetched = 0
        sources: dict[str, Path] = {}

        def received(count: int) -> None:
            nonlocal fetched
            fetched += count
            with self._lock:
                self.stats.bytes_total += count

        missing: dict[str, pb.BlobRef] = {}
        for entry in release.files:
            if self._store.has(entry.sha256):
                sources[entry.sha256] = self._store.path(entry.sha256)
                continue
            installed = local.get(entry.sha256)
            if installed is not None and installed.stat().st_size == entry.size:
                sources[entry.sha256] = installed
                continue
            ref = refs.get(entry.sha256)
            if ref is None or ref.size != entry.size:
                raise ReleaseRejected("format", f"the manifest does not describe {entry.path}")
            if ref.chunk_size != CHUNK_SIZE:  # a chunk is held in memory until its digest checks
                raise ReleaseRejected(
                    "format", f"blob {entry.sha256}: chunk size {ref.chunk_size}, not {CHUNK_SIZE}"
                )
            missing[entry.sha256] = ref
        self._check_free_space(sum(r.size for r in missing.values()) + release.size)
        for entry in release.files:
            ref = missing.pop(entry.sha256, None)
            if ref is None:
                continue
            if self._stop.is_set():
                raise ReleaseRejected("transfer", "stopping")
            sources[entry.sha256] = self._store.download(
                entry.sha256,
                entry.size,
                ref.chunk_size,
                list(ref.chunk_digests),
                self._fetch,
                received,
                limit,
            )
        return sources, fetched

    def _check_free_space(self, needed: int) -> None:
        """The downloads and the assembled copy must fit, with room to spare: a full disk takes
        the serving versions' state with it. Transient ("disk"): retried after the backoff."""
        free = shutil.disk_usage(self._root).free
        if free - needed < FREE_SPACE_RESERVE:
            raise DiskFull(
                self._root, needed + FREE_SPACE_RESERVE, "the release (with the reserve kept free)"
            )

    def _fetch(self, digest: str, offset: int) -> _Pieces:
        call = self._stub.GetBlob(
            pb.GetBlobRequest(digest=digest, offset=offset), metadata=self._meta, timeout=600
        )
        return _Pieces(call)

    def _assemble(self, release: Release, release_json: bytes, sources: dict[str, Path]) -> Path:
        staged = self._root / STAGING / f"{release.model}-{release.version}"
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        try:
            for entry in release.files:
                (staged / entry.path).parent.mkdir(exist_ok=True)
                shutil.copyfile(sources[entry.sha256], staged / entry.path)
            (staged / RELEASE_JSON).write_bytes(release_json)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        return staged


class _Pieces:
    """A GetBlob call as an iterator of bytes that can be cancelled (common/device_blobs.py cuts a
    server off at the declared size)."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._call:
            yield chunk.data

    def cancel(self) -> None:
        self._call.cancel()
