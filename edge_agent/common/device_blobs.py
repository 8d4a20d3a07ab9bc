"""The device's content-addressed blobs, with downloads that resume: what the sync fetches for a
release (sync/) and what local training fetches for a task's global weights (learn/), below both.
(The control plane's store of published blobs is another thing: controlplane/blobs.py.)

    STATE_DIR/sync/blobs/<sha256>          complete, verified blobs
    STATE_DIR/sync/partial/<sha256>.part   a download in progress: verified chunks only

A download appends a chunk only after it matches its chunk digest, so a partial file is always a
prefix of good chunks; after a restart it is re-checked (pages not yet on disk at a power cut read
back as zeros) and the download resumes at the first bad or missing chunk. A corrupt chunk is
refetched alone, never the file. The server is cut off at the declared size, whatever it sends.

The device keeps only what is still to be installed: the sync discards a release's blobs once it
is in the repository, and `retain` (at start and after each install) drops every blob and partial
download that no pending release and no running training needs (`hold`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from edge_agent.errors import ReleaseRejected

# A source of blob bytes: (digest, offset) -> pieces of the blob from `offset` on.
Fetch = Callable[[str, int], Iterable[bytes]]
MAX_CORRUPT_CHUNKS = 5  # per download: then the blob is reported as bad


class BandwidthLimit:
    """Sleeps as needed to keep the average rate at or below `bytes_per_second` (0: no limit)."""

    def __init__(self, bytes_per_second: int, sleep: Callable[[float], object] = time.sleep):
        self._rate = bytes_per_second
        self._sleep = sleep
        self._start = time.monotonic()
        self._bytes = 0

    def spend(self, count: int) -> None:
        if self._rate <= 0:
            return
        self._bytes += count
        ahead = self._bytes / self._rate - (time.monotonic() - self._start)
        if ahead > 0:
            self._sleep(ahead)


class DeviceBlobs:
    """The blobs on this device (`root`/blobs) and the downloads in progress (`root`/partial)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.partial = root / "partial"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.partial.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}  # digest -> holders (the sync and training threads)

    def path(self, digest: str) -> Path:
        return self.blobs / digest

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def discard(self, digests: Iterable[str]) -> None:
        """Remove these blobs, complete or partial."""
        for digest in digests:
            self.path(digest).unlink(missing_ok=True)
            (self.partial / f"{digest}.part").unlink(missing_ok=True)

    @contextlib.contextmanager
    def hold(self, digest: str) -> Iterator[None]:
        """Keep `digest` from `retain` while the block runs (a download and its use)."""
        with self._lock:
            self._held[digest] = self._held.get(digest, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._held[digest] -= 1
                if not self._held[digest]:
                    del self._held[digest]

    def retain(self, needed: Iterable[str]) -> int:
        """Remove every blob and partial download not in `needed` and not held; the bytes freed.
        Anything else found in its folders (a temporary file of a cut write) goes too."""
        with self._lock:
            keep = {*needed, *self._held}
        freed = 0
        for folder, suffix in ((self.blobs, ""), (self.partial, ".part")):
            for path in folder.iterdir():
                digest = path.name.removesuffix(suffix) if path.name.endswith(suffix) else ""
                if digest in keep and path.is_file():
                    continue
                with contextlib.suppress(OSError):
                    freed += path.stat().st_size
                    path.unlink()
        return freed

    def _good_prefix(self, part: Path, size: int, chunk_size: int, chunks: list[str]) -> int:
        """Length of the verified chunks at the start of `part`; truncates the rest."""
        if not part.exists():
            return 0
        good = 0
        with open(part, "r+b") as f:
            for expected in chunks:
                data = f.read(min(chunk_size, size - good))
                if not data or hashlib.sha256(data).hexdigest() != expected:
                    break
                good += len(data)
            f.truncate(good)
        return good

    def download(
        self,
        digest: str,
        size: int,
        chunk_size: int,
        chunks: list[str],
        fetch: Fetch,
        received: Callable[[int], None],
        limit: BandwidthLimit,
    ) -> Path:
        """Fetch the blob (resuming a partial download) and move it among the complete blobs.
        Raises ReleaseRejected("digest") when chunks keep arriving corrupt or the whole does not
        match; transport errors (grpc.RpcError) pass through with the good prefix kept for next
        time."""
        if chunk_size <= 0 or len(chunks) != -(-size // chunk_size):
            raise ReleaseRejected("format", f"blob {digest}: chunk table does not fit its size")
        part = self.partial / f"{digest}.part"
        offset = self._good_prefix(part, size, chunk_size, chunks)
        corrupt = 0
        with open(part, "ab") as out:
            while offset < size:
                before = offset
                try:
                    offset = self._stream(
                        out, digest, size, chunk_size, chunks, offset, fetch, received, limit
                    )
                except _CorruptChunk:
                    offset = out.tell()
                    corrupt += 1
                    if corrupt > MAX_CORRUPT_CHUNKS:
                        raise ReleaseRejected(
                            "digest", f"blob {digest}: chunks keep failing their digests"
                        ) from None
                    continue
                if offset == before:  # the stream ended without a byte: a truncated transfer
                    raise ReleaseRejected(
                        "transfer", f"blob {digest}: the server ended the stream at {offset}/{size}"
                    )
            out.flush()
            os.fsync(out.fileno())
        hasher = hashlib.sha256()
        with open(part, "rb") as f:
            while data := f.read(1 << 20):
                hasher.update(data)
        if hasher.hexdigest() != digest:
            part.unlink()
            raise ReleaseRejected("digest", f"blob {digest}: content does not match its digest")
        os.replace(part, self.path(digest))
        return self.path(digest)

    @staticmethod
    def _stream(
        out: BinaryIO,
        digest: str,
        size: int,
        chunk_size: int,
        chunks: list[str],
        offset: int,
        fetch: Fetch,
        received: Callable[[int], None],
        limit: BandwidthLimit,
    ) -> int:
        """One streaming call from `offset`; appends each verified chunk. Returns the offset
        reached when the stream ends (or the declared size, cutting off anything beyond)."""
        buffer = bytearray()
        pieces = fetch(digest, offset)
        try:
            for data in pieces:
                received(len(data))
                limit.spend(len(data))
                buffer += data
                while offset < size:
                    want = min(chunk_size, size - offset)
                    if len(buffer) < want:
                        break
                    piece = bytes(buffer[:want])
                    del buffer[:want]
                    if hashlib.sha256(piece).hexdigest() != chunks[offset // chunk_size]:
                        raise _CorruptChunk
                    out.write(piece)
                    offset += want
                if offset >= size:
                    break  # anything more than declared is not read
            return offset
        finally:
            _close(pieces)


class _CorruptChunk(Exception):
    pass


def _close(pieces: Iterable[bytes]) -> None:
    cancel = getattr(pieces, "cancel", None)
    if cancel is not None:
        cancel()
