"""Converging: bringing each model to the version the control plane wants on this device.

For one model whose desired version is not what it should be:
  already installed here -> serve it (a control-plane rollback; the lifecycle's rollback path)
  else: below the rollback floor? -> reject
        GetManifest -> parse release.json, expired? -> reject; the variant this device runs;
        its signature against the trusted keys, its size
        installed here already, unrecorded (a cut after the install's rename) -> adopt it
        else: intent recorded -> each file fetched (sync/fetch.py) -> assembled -> digests,
        names and graph contract -> ModelManager.load_release (staged in the repository,
        built, warmed and checked, installed by rename, activated)
        floor := max(floor, version), persisted

Transient failures (control plane unreachable, transfer cut, disk full) are reported "retrying"
and tried again after the sync's backoff; a rejected release is reported "failed" and not tried
again until the desired state changes. The serving versions are never touched by a failure.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import grpc

from edge_agent._proto import fleet_pb2 as pb
from edge_agent.common import failpoints
from edge_agent.common.device_blobs import DeviceBlobs
from edge_agent.common.layout import VARIANT_FILE
from edge_agent.errors import DiskFull, EdgeAgentError, ReleaseRejected
from edge_agent.fleet import signing
from edge_agent.fleet.release import (
    DEFAULT_VARIANT,
    Release,
    check_directory,
    check_fresh,
    is_installed_in,
    parse_release,
)
from edge_agent.observability.logging import get_logger
from edge_agent.runtime.session import likely_provider
from edge_agent.settings import Settings
from edge_agent.sync.calls import ControlPlaneCalls
from edge_agent.sync.fetch import ReleaseFetcher
from edge_agent.sync.onloop import ManagerOnLoop
from edge_agent.sync.reports import Reporter
from edge_agent.sync.state import SyncState

log = get_logger(__name__)

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


class Converger:
    def __init__(
        self,
        settings: Settings,
        calls: ControlPlaneCalls,
        manager: ManagerOnLoop,
        state: SyncState,
        blobs: DeviceBlobs,
        fetcher: ReleaseFetcher,
        reporter: Reporter,
        stop: threading.Event,
    ) -> None:
        assert settings.state_dir is not None
        self._settings = settings
        self._root = settings.state_dir / "sync"
        self._keys = [Path(k) for k in settings.trusted_keys]
        self._calls = calls
        self._manager = manager
        self._state = state
        self._blobs = blobs
        self._fetcher = fetcher
        self._reporter = reporter
        self._stop = stop
        self._rejected: dict[str, int] = {}  # model -> version rejected for good
        self.unreachable = False  # the last converge lost the control plane

    def converge(self, desired: pb.DesiredState) -> bool:
        """Bring every model to its desired version; False when a transient failure means the
        whole should be tried again soon."""
        settled = True
        self.unreachable = False
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
                self.unreachable |= reason == "unreachable"
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
        self._reporter.count_failure(reason)
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
        self._reporter.report(model, version, state, f"{reason}: {message}")
        return not transient

    def _converge_model(self, model: str, version: int) -> None:
        directory = self._manager.repository / model / str(version)
        if version in self._state.installed.get(model, []) and directory.is_dir():
            self._serve_installed(model, version)
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
        manifest = self._calls.manifest(model, version)
        release = self._verified(model, version, manifest)
        digests = [f.sha256 for f in release.files]
        # Installed here already, unrecorded: a power cut between the install's rename and its
        # record. The files are the signed ones (checked by digest): served, not installed again.
        if directory.is_dir() and is_installed_in(release, manifest.release_json, directory):
            self._manager.adopt(model, version)
            self._recorded(model, version, digests)
            log.info("sync.recognised_installed", model=model, version=version)
            self._reporter.report_arrived(model, version)
            return
        # The intent first: across a restart, this release's blobs are kept and all others go.
        self._state.intend(model, version, digests)
        self._reporter.report(model, version, "downloading")
        fetched = self._download_and_install(model, version, release, manifest, digests)
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
        self._reporter.report_arrived(model, version)

    def _serve_installed(self, model: str, version: int) -> None:
        if self._manager.serving(model) != version:  # e.g. the control plane rolled it back
            self._manager.serve_only_up_to(model, version)
            log.info("sync.serving_installed", model=model, version=version)
        self._settled(model)
        self._reporter.report_arrived(model, version)

    def _verified(self, model: str, version: int, manifest: pb.Manifest) -> Release:
        """The release this device will install: the manifest's, for this model and version,
        not expired, in the variant this device runs, signed by a trusted key, not too big.
        Verified before a byte of the blobs moves: the signature vouches for release.json (the
        manifest's bytes) and for every file it lists; what arrives later is checked against
        it."""
        release = parse_release(manifest.release_json)
        if (release.model, release.version) != (model, version):
            raise ReleaseRejected(
                "format",
                f"asked for {model} v{version}, the manifest is for "
                f"{release.model} v{release.version}",
            )
        check_fresh(release)
        release, signature = self._choose_variant(release, manifest)
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
        return release

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

    def _download_and_install(
        self,
        model: str,
        version: int,
        release: Release,
        manifest: pb.Manifest,
        digests: list[str],
    ) -> int:
        """Fetch, assemble and hand the release over; the bytes downloaded. What a failure
        leaves of its blobs: kept for a transient one (the retry resumes), else dropped."""
        try:
            return self._fetch_check_load(model, version, release, manifest)
        except (ReleaseRejected, EdgeAgentError) as exc:
            if DiskFull.caused(exc):
                # Nothing of this attempt stays on a full disk; all of it is fetched again
                # once there is room (the free-space check says how much before that).
                self._blobs.discard(digests)
            elif not (isinstance(exc, ReleaseRejected) and exc.reason in TRANSIENT):
                self._blobs.discard(digests)  # refused for good: its blobs go at once
                self._settled(model)
            raise

    def _fetch_check_load(
        self, model: str, version: int, release: Release, manifest: pb.Manifest
    ) -> int:
        """Fetch what is missing, assemble, check and load the release; the bytes downloaded.
        A full disk at any step raises DiskFull."""
        staged: Path | None = None
        try:
            sources, fetched = self._fetcher.fetch_all(release, manifest.blobs)
            failpoints.reach("sync.downloaded")
            staged = self._fetcher.assemble(release, manifest.release_json, sources)
            failpoints.reach("sync.assembled")
            # Every file against its signed digest, the exact file set, the graph contract.
            check_directory(release, staged)
            check_fresh(release)
            # Unsigned, written after the checks: which variant this version directory holds.
            (staged / VARIANT_FILE).write_text(release.variant + "\n")
            # The manager moves the files into the repository's staging (a copy when the state
            # dir is on another filesystem).
            self._manager.load_release(model, version, staged)
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
        self._blobs.discard(digests)  # now in the repository
        self._blobs.retain(self._state.needed())

    def _settled(self, model: str) -> None:
        if model in self._state.pending:
            self._state.settle(model)
            self._blobs.retain(self._state.needed())
