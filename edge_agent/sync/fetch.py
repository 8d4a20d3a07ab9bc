"""A release's files brought onto the device: each from the device's blobs, from an installed
version that holds the same content, or downloaded (resumable, chunk-verified, rate-limited:
common/device_blobs.py); then assembled into STATE_DIR/sync/staging/<model>-<version>/ for the
checks that come before the install."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from edge_agent._proto import fleet_pb2 as pb
from edge_agent.common.device_blobs import BandwidthLimit, DeviceBlobs
from edge_agent.errors import DiskFull, ReleaseRejected
from edge_agent.fleet.release import CHUNK_SIZE, RELEASE_JSON, Release, parse_release
from edge_agent.sync.calls import ControlPlaneCalls
from edge_agent.sync.state import SyncState

ASSEMBLY = "staging"  # STATE_DIR/sync/staging/<model>-<version>: a release being assembled
FREE_SPACE_RESERVE = 64 << 20  # bytes left free on the state dir's filesystem after a download


class ReleaseFetcher:
    def __init__(
        self,
        root: Path,
        calls: ControlPlaneCalls,
        blobs: DeviceBlobs,
        state: SyncState,
        repository: Path,
        bandwidth_limit: int,
        stop: threading.Event,
        received: Callable[[int], None],
    ) -> None:
        self._root = root
        self._calls = calls
        self._blobs = blobs
        self._state = state
        self._repository = repository
        self._bandwidth_limit = bandwidth_limit
        self._stop = stop
        self._received = received  # every byte downloaded (the metrics)

    def fetch_all(
        self, release: Release, blobs: Iterable[pb.BlobRef]
    ) -> tuple[dict[str, Path], int]:
        """Where each file of the release is on this device (the device's blobs, or an installed
        version that has the same content), downloading what is nowhere; and the bytes
        downloaded. Content found locally is checked when the release is assembled
        (check_directory)."""
        limit = BandwidthLimit(self._bandwidth_limit)
        sources, missing = self._find(release, {b.digest: b for b in blobs})
        self._check_free_space(sum(r.size for r in missing.values()) + release.size)
        fetched = 0

        def received(count: int) -> None:
            nonlocal fetched
            fetched += count
            self._received(count)

        for entry in release.files:
            ref = missing.pop(entry.sha256, None)
            if ref is None:
                continue
            if self._stop.is_set():
                raise ReleaseRejected("transfer", "stopping")
            sources[entry.sha256] = self._blobs.download(
                entry.sha256,
                entry.size,
                ref.chunk_size,
                list(ref.chunk_digests),
                self._calls.blob,
                received,
                limit,
            )
        return sources, fetched

    def _find(
        self, release: Release, refs: dict[str, pb.BlobRef]
    ) -> tuple[dict[str, Path], dict[str, pb.BlobRef]]:
        """(the files found on the device, the blobs to download) by digest."""
        local = self._installed_files()
        sources: dict[str, Path] = {}
        missing: dict[str, pb.BlobRef] = {}
        for entry in release.files:
            if self._blobs.has(entry.sha256):
                sources[entry.sha256] = self._blobs.path(entry.sha256)
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
        return sources, missing

    def _installed_files(self) -> dict[str, Path]:
        """sha256 -> a file of an installed version with that content (from its release.json)."""
        found: dict[str, Path] = {}
        for model, versions in self._state.installed.items():
            for version in versions:
                directory = self._repository / model / str(version)
                try:
                    release = parse_release((directory / RELEASE_JSON).read_bytes())
                except (OSError, ReleaseRejected):
                    continue
                for entry in release.all_files():  # only the installed variant's exist
                    if (directory / entry.path).is_file():
                        found.setdefault(entry.sha256, directory / entry.path)
        return found

    def _check_free_space(self, needed: int) -> None:
        """The downloads and the assembled copy must fit, with room to spare: a full disk takes
        the serving versions' state with it. Transient ("disk"): retried after the backoff."""
        free = shutil.disk_usage(self._root).free
        if free - needed < FREE_SPACE_RESERVE:
            raise DiskFull(
                self._root, needed + FREE_SPACE_RESERVE, "the release (with the reserve kept free)"
            )

    def assemble(self, release: Release, release_json: bytes, sources: dict[str, Path]) -> Path:
        """A copy of the release's files and its release.json, in a directory of its own."""
        staged = self._root / ASSEMBLY / f"{release.model}-{release.version}"
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
