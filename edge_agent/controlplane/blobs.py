"""Content-addressed blob storage. `BlobStore` is what the service needs; `FileBlobStore` keeps
blobs as files under DATA_DIR/blobs/sha256/<2 hex>/<digest>, `S3BlobStore` (s3.py) as objects in
an S3-compatible bucket. Either way a blob is first spooled to a local temporary file and checked
against its digest and size, then made visible at once (a rename; an S3 PUT or completed
multipart upload), so a reader never sees a partial or wrong blob."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Protocol

from edge_agent.errors import InvalidArgument
from edge_agent.fleet.release import CHUNK_SIZE


class BlobWriter(Protocol):
    def write(self, data: bytes) -> None: ...

    def commit(self) -> list[str]:
        """Check digest and size, make the blob visible; returns the chunk digests."""
        ...

    def abort(self) -> None: ...


class BlobStore(Protocol):
    def exists(self, digest: str) -> bool: ...

    def writer(self, digest: str, size: int) -> BlobWriter: ...

    def open(self, digest: str) -> BinaryIO: ...

    def size(self, digest: str) -> int: ...

    def describe(self) -> str:
        """Where the blobs are, for logs (no credentials)."""
        ...

    def total_bytes(self) -> int:
        """What the store holds, for the dashboard."""
        ...


class SpooledWriter:
    """Writes a blob to a temporary file in `spool`, computing its digest and chunk digests on
    the way; `commit` checks them and hands the file to `publish`, which makes it visible."""

    def __init__(
        self, spool: Path, digest: str, size: int, publish: Callable[[Path, str], None]
    ) -> None:
        self._publish = publish
        self._digest = digest
        self._size = size
        self._temporary = spool / f"{digest}.{uuid.uuid4().hex}"
        self._file = open(self._temporary, "xb")  # noqa: SIM115 (closed in commit / abort)
        self._hash = hashlib.sha256()
        self._chunk = hashlib.sha256()
        self._chunk_fill = 0
        self._chunks: list[str] = []
        self._written = 0

    def write(self, data: bytes) -> None:
        if self._written + len(data) > self._size:
            raise InvalidArgument(f"blob {self._digest}: more than the declared {self._size} bytes")
        self._file.write(data)
        self._hash.update(data)
        self._written += len(data)
        view = memoryview(data)
        while view:
            take = min(len(view), CHUNK_SIZE - self._chunk_fill)
            self._chunk.update(view[:take])
            self._chunk_fill += take
            view = view[take:]
            if self._chunk_fill == CHUNK_SIZE:
                self._chunks.append(self._chunk.hexdigest())
                self._chunk, self._chunk_fill = hashlib.sha256(), 0

    def commit(self) -> list[str]:
        try:
            if self._written != self._size:
                raise InvalidArgument(
                    f"blob {self._digest}: got {self._written} bytes, declared {self._size}"
                )
            if self._hash.hexdigest() != self._digest:
                raise InvalidArgument(f"blob {self._digest}: content does not match its digest")
            if self._chunk_fill:
                self._chunks.append(self._chunk.hexdigest())
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._publish(self._temporary, self._digest)
            return self._chunks
        except BaseException:
            self.abort()
            raise
        finally:
            self._temporary.unlink(missing_ok=True)  # published by a copy (S3)

    def abort(self) -> None:
        self._file.close()
        self._temporary.unlink(missing_ok=True)


class FileBlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "tmp").mkdir(parents=True, exist_ok=True)
        for leftover in (root / "tmp").iterdir():  # uploads cut off by a crash
            leftover.unlink(missing_ok=True)

    def path(self, digest: str) -> Path:
        return self.root / "sha256" / digest[:2] / digest

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def writer(self, digest: str, size: int) -> BlobWriter:
        return SpooledWriter(self.root / "tmp", digest, size, self._move_in)

    def _move_in(self, temporary: Path, digest: str) -> None:
        final = self.path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temporary, final)
        fd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def open(self, digest: str) -> BinaryIO:
        return open(self.path(digest), "rb")

    def size(self, digest: str) -> int:
        return self.path(digest).stat().st_size

    def describe(self) -> str:
        return str(self.root)

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.root / "sha256").rglob("*") if p.is_file())
