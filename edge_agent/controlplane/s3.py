"""Blobs in an S3-compatible bucket (`--blob-store s3://BUCKET/PREFIX?endpoint=URL`), through
boto3 (the reference S3 client; any server that speaks S3: AWS, SeaweedFS, MinIO, Ceph RGW).

Credentials come from boto3's standard chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or a
credentials file named by AWS_SHARED_CREDENTIALS_FILE), never from a flag, and are never logged.
A blob's object is `PREFIX/sha256/<2 hex>/<digest>`, written once it is checked (blobs.py
SpooledWriter): a PUT, or a multipart upload that becomes visible only when completed. Reads
are ranged GETs, so a device resumes at any offset on any replica.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, BinaryIO, cast
from urllib.parse import parse_qs, urlsplit

from edge_agent.controlplane.blobs import BlobWriter, SpooledWriter
from edge_agent.errors import ConfigError, InvalidArgument, Unavailable
from edge_agent.observability.logging import get_logger

log = get_logger(__name__)


def parse_s3_url(url: str) -> tuple[str, str, str, str]:
    """s3://BUCKET[/PREFIX][?endpoint=URL&region=R] -> (bucket, prefix ending in '/' or '',
    endpoint or '', region)."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ConfigError(f"--blob-store: expected s3://BUCKET/PREFIX?endpoint=URL, got {url!r}")
    if "@" in parts.netloc:
        raise ConfigError(
            "--blob-store: put no credentials in the URL; use AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or a credentials file)"
        )
    query = parse_qs(parts.query)
    unknown = set(query) - {"endpoint", "region"}
    if unknown:
        raise ConfigError(f"--blob-store: unknown parameters {sorted(unknown)}")
    endpoint = query.get("endpoint", [""])[0]
    if endpoint and urlsplit(endpoint).scheme not in ("http", "https"):
        raise ConfigError(f"--blob-store: endpoint must be an http(s) URL, got {endpoint!r}")
    prefix = parts.path.strip("/")
    return (
        parts.netloc,
        f"{prefix}/" if prefix else "",
        endpoint,
        query.get("region", ["us-east-1"])[0],
    )


class _RangeReader(io.RawIOBase):
    """A read-only file over one object: seek, then reads as ranged GETs."""

    def __init__(self, store: S3BlobStore, key: str, size: int) -> None:
        self._store = store
        self._key = key
        self._size = size
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position

    def read(self, size: int | None = -1) -> bytes:
        end = self._size if size is None or size < 0 else min(self._size, self._position + size)
        if end <= self._position:
            return b""
        data = self._store.get_range(self._key, self._position, end - 1)
        self._position += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class S3BlobStore:
    def __init__(self, url: str, spool: Path) -> None:
        try:
            import boto3
            import botocore.config
            import botocore.exceptions
        except ImportError as exc:
            raise ConfigError(
                "--blob-store s3:// needs boto3: pip install 'edge-agent[scale]'"
            ) from exc
        self._errors = botocore.exceptions
        self.bucket, self.prefix, endpoint, region = parse_s3_url(url)
        self.url = url
        self._client = boto3.client(
            "s3",
            endpoint_url=endpoint or None,
            region_name=region,
            config=botocore.config.Config(
                s3={"addressing_style": "path"},  # most self-hosted servers want path style
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
                max_pool_connections=16,
            ),
        )
        # Blobs are content-addressed and never change: a size learnt once (HEAD, or our own
        # upload) saves a HEAD on every later read. Bounded; an eviction only costs a HEAD.
        self._sizes: dict[str, int] = {}
        self._spool = spool
        spool.mkdir(parents=True, exist_ok=True)
        for leftover in spool.iterdir():  # uploads cut off by a crash
            leftover.unlink(missing_ok=True)
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except (self._errors.BotoCoreError, self._errors.ClientError) as exc:
            raise ConfigError(f"--blob-store {self.describe()}: {self._reason(exc)}") from exc

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    @staticmethod
    def _reason(exc: Exception) -> str:
        # botocore's messages name the operation and the code, never the secret key.
        return str(exc).strip()[:300]

    def total_bytes(self) -> int:
        total = 0
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=f"{self.prefix}sha256/"
            )
            for listing in pages:
                total += sum(int(o["Size"]) for o in listing.get("Contents", []))
        except (self._errors.BotoCoreError, self._errors.ClientError) as exc:
            raise Unavailable(f"blob store: {self._reason(exc)}") from exc
        return total

    def key(self, digest: str) -> str:
        return f"{self.prefix}sha256/{digest[:2]}/{digest}"

    def _known_size(self, digest: str) -> int | None:
        size = self._sizes.get(digest)
        if size is not None:
            return size
        head = self._head(digest)
        if head is None:
            return None
        if len(self._sizes) >= 100_000:
            self._sizes.clear()
        size = self._sizes[digest] = int(head["ContentLength"])
        return size

    def _head(self, digest: str) -> dict[str, Any] | None:
        try:
            head: dict[str, Any] = self._client.head_object(
                Bucket=self.bucket, Key=self.key(digest)
            )
            return head
        except self._errors.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise Unavailable(f"blob store: {self._reason(exc)}") from exc
        except self._errors.BotoCoreError as exc:
            raise Unavailable(f"blob store: {self._reason(exc)}") from exc

    def exists(self, digest: str) -> bool:
        return self._known_size(digest) is not None

    def size(self, digest: str) -> int:
        size = self._known_size(digest)
        if size is None:
            raise FileNotFoundError(self.key(digest))
        return size

    def writer(self, digest: str, size: int) -> BlobWriter:
        return SpooledWriter(self._spool, digest, size, self._upload)

    def _upload(self, temporary: Path, digest: str) -> None:
        size = temporary.stat().st_size
        try:
            # upload_file: one PUT, or a multipart upload above its threshold (8 MiB) that the
            # server shows only once completed.
            self._client.upload_file(str(temporary), self.bucket, self.key(digest))
        except (self._errors.BotoCoreError, self._errors.ClientError) as exc:
            raise Unavailable(f"blob store: upload failed: {self._reason(exc)}") from exc
        stored = self._head(digest)
        if stored is None or int(stored["ContentLength"]) != size:
            raise InvalidArgument(f"blob {digest}: the store holds another size than was written")
        self._sizes[digest] = size

    def open(self, digest: str) -> BinaryIO:
        size = self._known_size(digest)
        if size is None:
            raise FileNotFoundError(self.key(digest))
        reader = _RangeReader(self, self.key(digest), size)
        return cast(BinaryIO, reader)  # read, seek, close: all GetBlob and learning use

    def get_range(self, key: str, first: int, last: int) -> bytes:
        try:
            answer = self._client.get_object(
                Bucket=self.bucket, Key=key, Range=f"bytes={first}-{last}"
            )
            data: bytes = answer["Body"].read()
            return data
        except (self._errors.BotoCoreError, self._errors.ClientError) as exc:
            raise Unavailable(f"blob store: {self._reason(exc)}") from exc
