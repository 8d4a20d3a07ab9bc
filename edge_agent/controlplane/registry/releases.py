"""Releases and the blobs they are made of. A release (model, version) is immutable: published
again with the same content it is a no-op, with other content it is refused. A blob's chunk
digests are kept so that a device can resume and verify a download chunk by chunk."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping

from edge_agent.controlplane.database import Database
from edge_agent.errors import FailedPrecondition


@dataclasses.dataclass(frozen=True)
class BlobInfo:
    digest: str
    size: int
    chunk_size: int
    chunk_digests: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class StoredRelease:
    release_json: bytes
    signature: bytes  # of the default variant
    digests: list[str]  # every variant's blobs
    variant_signatures: dict[str, bytes]


def release_exists(db: Database, model: str, version: int) -> bool:
    found = db.execute(
        "SELECT 1 AS found FROM releases WHERE model = ? AND version = ?", (model, version)
    ).first()
    return found is not None


class ReleaseRecords:
    _db: Database  # the registry's database (SqlRegistry)

    def blob(self, digest: str) -> BlobInfo | None:
        row = self._db.execute(
            "SELECT size, chunk_size, chunk_digests FROM blobs WHERE digest = ?", (digest,)
        ).first()
        if row is None:
            return None
        chunks = tuple(json.loads(row["chunk_digests"]))
        return BlobInfo(digest, int(row["size"]), int(row["chunk_size"]), chunks)

    def add_blob(self, info: BlobInfo) -> None:
        self._db.execute(
            "INSERT INTO blobs VALUES (?, ?, ?, ?) ON CONFLICT (digest) DO UPDATE SET "
            "size = excluded.size, chunk_size = excluded.chunk_size, "
            "chunk_digests = excluded.chunk_digests",
            (info.digest, info.size, info.chunk_size, json.dumps(list(info.chunk_digests))),
        )

    def add_release(
        self,
        model: str,
        version: int,
        release_json: bytes,
        signature: bytes,
        digests: set[str],
        variant_signatures: Mapping[str, bytes] | None = None,
    ) -> None:
        existing = self.release(model, version)
        variant_signatures = dict(variant_signatures or {})
        if existing is not None:
            same = (existing.release_json, existing.signature, existing.variant_signatures)
            if same == (release_json, signature, variant_signatures):
                return  # published again, identical: nothing to do
            raise FailedPrecondition(
                f"release {model} v{version} already exists with other content; versions are "
                "immutable, publish a new version"
            )
        signatures = json.dumps({k: v.hex() for k, v in variant_signatures.items()})
        with self._db.transaction():
            self._db.execute(
                "INSERT INTO releases VALUES (?, ?, ?, ?, ?, ?)",
                (model, version, release_json, signature, time.time(), signatures),
            )
            self._db.executemany(
                "INSERT INTO release_blobs VALUES (?, ?, ?)",
                [(model, version, d) for d in sorted(digests)],
            )

    def release(self, model: str, version: int) -> StoredRelease | None:
        row = self._db.execute(
            "SELECT release_json, signature, variant_signatures FROM releases "
            "WHERE model = ? AND version = ?",
            (model, version),
        ).first()
        if row is None:
            return None
        blobs = self._db.execute(
            "SELECT digest FROM release_blobs WHERE model = ? AND version = ? ORDER BY digest",
            (model, version),
        ).all()
        variants = json.loads(row["variant_signatures"])
        return StoredRelease(
            release_json=bytes(row["release_json"]),
            signature=bytes(row["signature"]),
            digests=[str(b["digest"]) for b in blobs],
            variant_signatures={k: bytes.fromhex(v) for k, v in variants.items()},
        )

    def newest_version(self, model: str) -> int:
        row = self._db.execute(
            "SELECT MAX(version) AS newest FROM releases WHERE model = ?", (model,)
        ).first()
        return int(row["newest"] or 0) if row else 0
