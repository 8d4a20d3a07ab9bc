"""The control plane's state: releases, blobs' chunk digests, devices, rollouts, reports.

`Registry` is what the service needs; `SqlRegistry` keeps it in a SQL database: one SQLite file
in WAL mode (the embedded default, `SqliteRegistry`) or PostgreSQL (database.py), with a
versioned schema (`MIGRATIONS`).

Desired state: for each model, the newest rollout that reaches the device decides its version.
A rollout reaches the fleet, a group, or a fixed canary cohort (chosen when it is created: the
ceil(p% of n) devices first in sha256(model/version/device) order, so the choice is stable and
spread). A paused rollout keeps only the devices that already run it; a rolled-back one reaches
nobody, so its devices fall back to the rollout before it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from edge_agent.controlplane.database import Database, SqliteDatabase, postgres_schema
from edge_agent.errors import (
    Aborted,
    AlreadyExists,
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from edge_agent.observability.logging import get_logger

log = get_logger(__name__)

FLEET, GROUP, CANARY = "fleet", "group", "canary"
ACTIVE, PAUSED, ROLLED_BACK = "active", "paused", "rolled_back"
# Shown, never stored: active or paused, but newer rollouts decide every device it reaches.
SUPERSEDED = "superseded"
FAILED = "failed"
PENDING = "pending"  # a device of a rollout that has reported nothing about its version yet
# Report history kept per device and model (prune): the newest rows, none older than the days.
HISTORY_ROWS = 100
POSTGRES_THREADS = 4  # registry threads (and pool connections) on PostgreSQL
HISTORY_DAYS = 30
INSTALLED_STATES = ("installed", "serving")

SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    digest TEXT PRIMARY KEY, size INTEGER NOT NULL, chunk_size INTEGER NOT NULL,
    chunk_digests TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS releases (
    model TEXT NOT NULL, version INTEGER NOT NULL, release_json BLOB NOT NULL,
    signature BLOB NOT NULL, created REAL NOT NULL,
    variant_signatures TEXT NOT NULL DEFAULT '{}', PRIMARY KEY (model, version));
CREATE TABLE IF NOT EXISTS release_blobs (
    model TEXT NOT NULL, version INTEGER NOT NULL, digest TEXT NOT NULL,
    PRIMARY KEY (model, version, digest));
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY, token_hash TEXT NOT NULL, grp TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL, last_seen REAL NOT NULL DEFAULT 0, last_error TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS devices_by_token ON devices (token_hash);
CREATE TABLE IF NOT EXISTS rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, model TEXT NOT NULL, version INTEGER NOT NULL,
    scope TEXT NOT NULL, grp TEXT NOT NULL DEFAULT '', canary_percent REAL NOT NULL DEFAULT 0,
    state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS cohorts (
    rollout_id INTEGER NOT NULL, device_id TEXT NOT NULL, PRIMARY KEY (rollout_id, device_id));
CREATE TABLE IF NOT EXISTS reports (
    device_id TEXT NOT NULL, model TEXT NOT NULL, installed_version INTEGER NOT NULL,
    serving_version INTEGER NOT NULL, target_version INTEGER NOT NULL, state TEXT NOT NULL,
    error TEXT NOT NULL, updated REAL NOT NULL, variant TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (device_id, model));
CREATE TABLE IF NOT EXISTS install_failures (
    device_id TEXT NOT NULL, model TEXT NOT NULL, version INTEGER NOT NULL, error TEXT NOT NULL,
    at REAL NOT NULL, PRIMARY KEY (device_id, model, version));
CREATE INDEX IF NOT EXISTS release_blobs_by_digest ON release_blobs (digest);
CREATE TABLE IF NOT EXISTS learning_tasks (
    id INTEGER PRIMARY KEY AUTOINCREMENT, model TEXT NOT NULL, base_version INTEGER NOT NULL,
    spec BLOB NOT NULL, validation BLOB NOT NULL, shapes TEXT NOT NULL, state TEXT NOT NULL,
    global_version INTEGER NOT NULL, global_digest TEXT NOT NULL, round INTEGER NOT NULL,
    base_accuracy REAL NOT NULL, counters TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS learning_devices (
    task_id INTEGER NOT NULL, device_id TEXT NOT NULL, PRIMARY KEY (task_id, device_id));
CREATE TABLE IF NOT EXISTS learning_updates (
    task_id INTEGER NOT NULL, update_id TEXT NOT NULL, device_id TEXT NOT NULL,
    base_global INTEGER NOT NULL, examples INTEGER NOT NULL, digest TEXT NOT NULL,
    state TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (task_id, update_id));
CREATE TABLE IF NOT EXISTS learning_versions (
    task_id INTEGER NOT NULL, version INTEGER NOT NULL, digest TEXT NOT NULL,
    accuracy REAL NOT NULL, accepted INTEGER NOT NULL, released INTEGER NOT NULL,
    updates INTEGER NOT NULL, at REAL NOT NULL, PRIMARY KEY (task_id, version));
CREATE TABLE IF NOT EXISTS history (
    device_id TEXT NOT NULL, model TEXT NOT NULL, at REAL NOT NULL, target_version INTEGER,
    serving_version INTEGER, state TEXT NOT NULL, error TEXT NOT NULL);
"""


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


@dataclasses.dataclass(frozen=True)
class Report:
    model: str
    installed_version: int
    serving_version: int
    target_version: int
    state: str
    error: str
    variant: str = ""


@dataclasses.dataclass(frozen=True)
class Device:
    device_id: str
    group: str
    last_seen: float
    last_error: str
    reports: tuple[Report, ...]


@dataclasses.dataclass(frozen=True)
class Rollout:
    id: int
    model: str
    version: int
    scope: str
    group: str
    canary_percent: float
    state: str
    reason: str
    devices: tuple[str, ...]  # the devices it reaches (paused: would reach)
    failed: int
    # Of `devices`, how many are in each state for this version (serving, installed,
    # downloading, retrying, failed; PENDING: nothing reported about it yet).
    device_states: Mapping[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class LearningTaskRow:
    id: int
    model: str
    base_version: int
    spec: bytes  # a serialized LearningSpec (validation set left out)
    validation: bytes
    shapes: dict[str, list[int]]  # the trainable tensors
    state: str
    global_version: int
    global_digest: str
    round: int
    base_accuracy: float
    counters: dict[str, int]
    devices: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class UpdateRow:
    update_id: str
    device_id: str
    base_global: int
    examples: int
    digest: str
    at: float = 0.0  # when it arrived


@dataclasses.dataclass(frozen=True)
class VersionRow:
    version: int
    digest: str
    accuracy: float
    accepted: bool
    released: int
    updates: int
    at: float


class Registry(Protocol):
    threads: int

    def add_device(self, device_id: str, group: str, token_hash: str) -> None: ...
    def token_hash(self, device_id: str) -> str | None: ...
    def device_with_token(self, token_hash: str) -> str | None: ...
    def enroll(self, devices: Sequence[tuple[str, str, str]], rotate: bool) -> None: ...
    def revoke(self, device_id: str) -> None: ...
    def blob(self, digest: str) -> BlobInfo | None: ...
    def add_blob(self, info: BlobInfo) -> None: ...
    def add_release(
        self,
        model: str,
        version: int,
        release_json: bytes,
        signature: bytes,
        digests: set[str],
        variant_signatures: Mapping[str, bytes] | None = None,
    ) -> None: ...
    def release(self, model: str, version: int) -> StoredRelease | None: ...
    def set_target(
        self, model: str, version: int, scope: str, group: str, canary_percent: float
    ) -> Rollout: ...
    def control(self, model: str, action: str) -> Rollout: ...
    def rollouts(self) -> list[Rollout]: ...
    def desired(self, device_id: str) -> dict[str, int]: ...
    def record(self, device_id: str, reports: Iterable[Report], now: float) -> list[Report]: ...
    def touch(self, seen: Mapping[str, float]) -> None: ...
    def notify(self, payload: str) -> None: ...
    def size_bytes(self) -> int: ...
    def auto_pause(self, max_failure_share: float) -> list[Rollout]: ...
    def devices(self, after: str = "", limit: int | None = None) -> list[Device]: ...
    def may_fetch_release(self, device_id: str, model: str, version: int) -> bool: ...
    def may_fetch_blob(self, device_id: str, digest: str) -> bool: ...
    def prune(self, now: float) -> int: ...
    def newest_version(self, model: str) -> int: ...
    def reach(
        self, scope: str, group: str, canary_percent: float, model: str, version: int
    ) -> list[str]: ...
    def add_task(
        self,
        model: str,
        base_version: int,
        spec: bytes,
        validation: bytes,
        shapes: Mapping[str, list[int]],
        devices: Iterable[str],
        base_accuracy: float,
        global_digest: str,
    ) -> int: ...
    def tasks(self, task_id: int = 0, validation: bool = True) -> list[LearningTaskRow]: ...
    def set_task_state(self, task_id: int, state: str) -> None: ...
    def running_tasks(self) -> list[tuple[int, bytes, int]]: ...
    def device_tasks(self, device_id: str) -> list[LearningTaskRow]: ...
    def count(self, task_id: int, **increments: int) -> None: ...
    def add_update(self, task_id: int, update: UpdateRow, state: str, now: float) -> bool: ...
    def buffered(self, task_id: int) -> list[UpdateRow]: ...
    def update_state(self, task_id: int, update_id: str) -> str | None: ...
    def active_devices(self, task_id: int, since: float) -> int: ...
    def optimizer_state(self, task_id: int, version: int) -> str | None: ...
    def advance(
        self,
        task_id: int,
        applied: list[str],
        version: VersionRow,
        counters: Mapping[str, int],
        optimizer_digest: str = "",
        dropped: Mapping[str, str] | None = None,
        expected_round: int | None = None,
    ) -> None: ...
    def set_released(self, task_id: int, version: int, model_version: int) -> None: ...
    def versions(self, task_id: int) -> list[VersionRow]: ...


def revision(desired: Mapping[str, int], learning: Iterable[object] = ()) -> str:
    """Changes whenever a device's desired state does: its versions, or its learning rounds."""
    text = json.dumps([sorted(desired.items()), sorted(map(str, learning))])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def canary_cohort(model: str, version: int, devices: list[str], percent: float) -> list[str]:
    def rank(device: str) -> str:
        return hashlib.sha256(f"{model}/{version}/{device}".encode()).hexdigest()

    count = math.ceil(len(devices) * percent / 100)
    return sorted(sorted(devices, key=rank)[:count])


def _schema_v1(db: Database) -> None:
    schema = SCHEMA if db.dialect == "sqlite" else postgres_schema(SCHEMA)
    for statement in schema.split(";"):
        if statement.strip():
            db.execute(statement)
    if db.dialect == "sqlite":  # a registry made before versioning and before reports' variant
        columns = {r[1] for r in db.execute("PRAGMA table_info(reports)")}
        if "variant" not in columns:
            db.execute("ALTER TABLE reports ADD COLUMN variant TEXT NOT NULL DEFAULT ''")


def _schema_v2(db: Database) -> None:
    """The server optimizer's state per accepted global version of a learning task."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS learning_optimizer (task_id INTEGER NOT NULL, "
        "version INTEGER NOT NULL, digest TEXT NOT NULL, PRIMARY KEY (task_id, version))"
    )


# The schema's history: MIGRATIONS[n - 1] brings a database from version n - 1 to n. Append,
# never edit: a database records the version it has reached (table schema_version).
MIGRATIONS: tuple[Callable[[Database], None], ...] = (_schema_v1, _schema_v2)


def migrate(db: Database) -> int:
    """Create or bring the schema up to date, once even with several replicas starting together
    (the decision lock); returns the version reached. A newer schema than this code knows is
    refused: an older control plane must not write to it."""
    with db.transaction(decision=True):
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
        current = int(row[0] or 0) if row else 0
        if current > len(MIGRATIONS):
            raise ConfigError(
                f"the database's schema is version {current}, newer than this control plane's "
                f"{len(MIGRATIONS)}: upgrade edge-agent"
            )
        for version in range(current + 1, len(MIGRATIONS) + 1):
            MIGRATIONS[version - 1](db)
            db.execute("INSERT INTO schema_version VALUES (?)", (version,))
            log.info("registry.migrated", schema_version=version, dialect=db.dialect)
    return len(MIGRATIONS)


class SqlRegistry:
    """The registry on a SQL database (database.py: SQLite or PostgreSQL). Used by one thread
    of a process at a time (the control plane's registry thread); several processes may share
    a PostgreSQL database."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self.schema_version = migrate(db)
        # Threads that may use it at once: SQLite's one connection wants one.
        self.threads = 1 if db.dialect == "sqlite" else POSTGRES_THREADS

    @property
    def database(self) -> Database:
        return self._db

    def size_bytes(self) -> int:
        return self._db.size_bytes()

    def notify(self, payload: str) -> None:
        """Tell the other replicas that desired state changed (database.Database.notify)."""
        self._db.notify(payload)

    def close(self) -> None:
        self._db.close()

    # -- devices --------------------------------------------------------------------------------

    def add_device(self, device_id: str, group: str, token_hash: str) -> None:
        """Enroll a device, or give an enrolled one a new token (and group)."""
        self._db.execute(
            "INSERT INTO devices (device_id, token_hash, grp, created) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (device_id) DO UPDATE SET token_hash = excluded.token_hash, "
            "grp = excluded.grp",
            (device_id, token_hash, group, time.time()),
        )

    def token_hash(self, device_id: str) -> str | None:
        row = self._db.execute(
            "SELECT token_hash FROM devices WHERE device_id = ?", (device_id,)
        ).fetchone()
        return None if row is None else str(row[0])

    def enroll(self, devices: Sequence[tuple[str, str, str]], rotate: bool) -> None:
        """(device id, group, token hash) each, in one transaction: new devices, or (rotate)
        enrolled ones given new tokens and groups. Nothing is written if one does not fit."""
        with self._db.transaction():
            for device_id, group, token_hash in devices:
                exists = self.token_hash(device_id) is not None
                if exists != rotate:
                    state = "already enrolled" if exists else "not enrolled"
                    raise (FailedPrecondition if rotate else AlreadyExists)(
                        f"device {device_id!r} is {state}"
                        + ("" if rotate else " (rotate its token with rotate=true)")
                    )
                self._db.execute(
                    "INSERT INTO devices (device_id, token_hash, grp, created) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (device_id) DO UPDATE SET token_hash = excluded.token_hash, "
                    "grp = excluded.grp",
                    (device_id, token_hash, group, time.time()),
                )

    def revoke(self, device_id: str) -> None:
        with self._db.transaction():
            if self.token_hash(device_id) is None:
                raise NotFound(f"no device {device_id!r}")
            self._db.execute("DELETE FROM devices WHERE device_id = ?", (device_id,))
            self._db.execute("DELETE FROM reports WHERE device_id = ?", (device_id,))

    def device_with_token(self, token_hash: str) -> str | None:
        """The device holding this token (to tell a device token from an unknown one)."""
        row = self._db.execute(
            "SELECT device_id FROM devices WHERE token_hash = ?", (token_hash,)
        ).fetchone()
        return None if row is None else str(row[0])

    def _device_ids(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT device_id FROM devices ORDER BY device_id")]

    # -- blobs and releases ---------------------------------------------------------------------

    def blob(self, digest: str) -> BlobInfo | None:
        row = self._db.execute(
            "SELECT size, chunk_size, chunk_digests FROM blobs WHERE digest = ?", (digest,)
        ).fetchone()
        if row is None:
            return None
        return BlobInfo(digest, row[0], row[1], tuple(json.loads(row[2])))

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
        with self._db.transaction():
            self._db.execute(
                "INSERT INTO releases VALUES (?, ?, ?, ?, ?, ?)",
                (
                    model,
                    version,
                    release_json,
                    signature,
                    time.time(),
                    json.dumps({k: v.hex() for k, v in variant_signatures.items()}),
                ),
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
        ).fetchone()
        if row is None:
            return None
        digests = [
            r[0]
            for r in self._db.execute(
                "SELECT digest FROM release_blobs WHERE model = ? AND version = ? ORDER BY digest",
                (model, version),
            )
        ]
        variants = {k: bytes.fromhex(v) for k, v in json.loads(row[2]).items()}
        return StoredRelease(bytes(row[0]), bytes(row[1]), digests, variants)

    # -- rollouts -------------------------------------------------------------------------------

    def set_target(
        self, model: str, version: int, scope: str, group: str, canary_percent: float
    ) -> Rollout:
        if self.release(model, version) is None:
            raise NotFound(f"no release {model} v{version}")
        if scope == GROUP and not group:
            raise InvalidArgument("a group target needs a group")
        if scope == CANARY and not 0 < canary_percent <= 100:
            raise InvalidArgument(f"canary percent must lie in (0, 100], got {canary_percent}")
        if scope not in (FLEET, GROUP, CANARY):
            raise InvalidArgument(f"unknown target scope {scope!r}")
        with self._db.transaction(decision=True):
            row = self._db.execute(
                "INSERT INTO rollouts (model, version, scope, grp, canary_percent, state, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (model, version, scope, group, canary_percent, ACTIVE, time.time()),
            ).fetchone()
            rollout_id = int(row[0]) if row else 0
            if scope == CANARY:
                cohort = canary_cohort(model, version, self._device_ids(), canary_percent)
                self._db.executemany(
                    "INSERT INTO cohorts VALUES (?, ?)", [(rollout_id, d) for d in cohort]
                )
        return self._rollout(rollout_id)

    def control(self, model: str, action: str) -> Rollout:
        """pause / resume / rollback the newest rollout of `model` that is not rolled back."""
        row = self._db.execute(
            "SELECT id, state FROM rollouts WHERE model = ? AND state != ? ORDER BY id DESC",
            (model, ROLLED_BACK),
        ).fetchone()
        if row is None:
            raise NotFound(f"no rollout of model {model!r} to {action}")
        rollout_id, state = row
        new_state = {"pause": PAUSED, "resume": ACTIVE, "rollback": ROLLED_BACK}.get(action)
        if new_state is None:
            raise InvalidArgument(f"unknown rollout action {action!r}")
        if action == "resume" and state != PAUSED:
            raise FailedPrecondition(f"rollout {rollout_id} of {model} is {state}, not paused")
        self._db.execute(
            "UPDATE rollouts SET state = ?, reason = ? WHERE id = ?",
            (new_state, f"{action} by the publisher", rollout_id),
        )
        return self._rollout(rollout_id)

    def _group(self, device_id: str) -> str | None:
        """One device's group (None: not enrolled), without reading every device: a rollout
        asks this once per device and blob."""
        row = self._db.execute("SELECT grp FROM devices WHERE device_id = ?", (device_id,))
        found = row.fetchone()
        return None if found is None else str(found[0])

    def _groups(self) -> dict[str, str]:
        return {r[0]: r[1] for r in self._db.execute("SELECT device_id, grp FROM devices")}

    def _rollout_from(
        self,
        row: tuple[Any, ...],
        devices: list[str],
        reports: Mapping[tuple[str, str], tuple[int, int, str]],
        failures: set[tuple[str, str, int]],
        superseded: bool = False,
    ) -> Rollout:
        rollout_id, model, version, scope, group, percent, state, reason = row
        model, version = str(model), int(version)
        counts: dict[str, int] = {}
        for device in devices:  # how many of its devices are in each state for its version
            serving, target, status = reports.get((device, model), (0, 0, PENDING))
            if target != version:
                status = "serving" if serving == version else PENDING
            counts[status] = counts.get(status, 0) + 1
        return Rollout(
            id=int(rollout_id),
            model=model,
            version=version,
            scope=str(scope),
            group=str(group),
            canary_percent=float(percent),
            state=SUPERSEDED if superseded else str(state),
            reason=str(reason),
            devices=tuple(devices),
            # Devices that failed to install this version (and have not installed it since).
            failed=sum(1 for d in devices if (d, model, version) in failures),
            device_states=counts,
        )

    _COLUMNS = "id, model, version, scope, grp, canary_percent, state, reason"

    def _rollout(self, rollout_id: int) -> Rollout:
        return next(r for r in self.rollouts() if r.id == rollout_id)

    def rollouts(self) -> list[Rollout]:
        """Every rollout with the devices it reaches and their states: a handful of queries
        (every table read once), then O(devices x rollouts) work in memory."""
        groups = self._groups()
        rows = self._db.execute(f"SELECT {self._COLUMNS} FROM rollouts ORDER BY id").fetchall()
        cohorts: dict[int, list[str]] = {}
        for rollout_id, device in self._db.execute(
            "SELECT rollout_id, device_id FROM cohorts ORDER BY device_id"
        ):
            cohorts.setdefault(int(rollout_id), []).append(str(device))
        reports = {
            (str(r[0]), str(r[1])): (int(r[2]), int(r[3]), str(r[4]))
            for r in self._db.execute(
                "SELECT device_id, model, serving_version, target_version, state FROM reports"
            )
        }
        failures = {
            (str(r[0]), str(r[1]), int(r[2]))
            for r in self._db.execute("SELECT device_id, model, version FROM install_failures")
        }
        everyone = sorted(groups)
        reach: dict[int, list[str]] = {}
        for row in rows:
            rollout_id, scope, group = int(row[0]), row[3], row[4]
            if scope == FLEET:
                reach[rollout_id] = everyone
            elif scope == GROUP:
                reach[rollout_id] = [d for d in everyone if groups[d] == group]
            else:
                reach[rollout_id] = [d for d in cohorts.get(rollout_id, []) if d in groups]
        reach_sets = {rid: set(devices) for rid, devices in reach.items()}
        deciding: set[int] = set()
        for device in everyone:
            chosen: dict[str, int] = {}
            for row in rows:  # the newest rollout reaching the device decides, per model
                rollout_id, model, version, state = int(row[0]), str(row[1]), int(row[2]), row[6]
                if state == ROLLED_BACK or device not in reach_sets[rollout_id]:
                    continue
                serving = reports.get((device, model), (0, 0, ""))[0]
                if state == PAUSED and serving != version:
                    continue  # a paused rollout reaches no one new
                chosen[model] = rollout_id
            deciding.update(chosen.values())
        newest = {str(r[1]): int(r[0]) for r in rows if r[6] != ROLLED_BACK}
        return [
            self._rollout_from(
                r,
                reach[int(r[0])],
                reports,
                failures,
                superseded=r[6] != ROLLED_BACK
                and int(r[0]) not in deciding
                and newest[str(r[1])] != int(r[0]),
            )
            for r in rows
        ]

    def desired(self, device_id: str) -> dict[str, int]:
        """model -> version for one device. Costs O(rollouts), not O(devices): every waiting
        long-poll asks this when a change reaches it."""
        row = self._db.execute("SELECT grp FROM devices WHERE device_id = ?", (device_id,))
        found = row.fetchone()
        if found is None:
            return {}
        group = str(found[0])
        running = {
            (str(r[0]), int(r[1]))
            for r in self._db.execute(
                "SELECT model, serving_version FROM reports WHERE device_id = ?", (device_id,)
            )
        }
        cohorts = {
            int(r[0])
            for r in self._db.execute(
                "SELECT rollout_id FROM cohorts WHERE device_id = ?", (device_id,)
            )
        }
        desired: dict[str, int] = {}
        for rollout_id, model, version, scope, grp, _, state, _ in self._db.execute(
            f"SELECT {self._COLUMNS} FROM rollouts WHERE state != ? ORDER BY id", (ROLLED_BACK,)
        ):
            reaches = (
                scope == FLEET
                or (scope == GROUP and grp == group)
                or (scope == CANARY and int(rollout_id) in cohorts)
            )
            if not reaches or (state == PAUSED and (str(model), int(version)) not in running):
                continue  # a paused rollout reaches no one new
            desired[str(model)] = int(version)
        return desired

    def auto_pause(self, max_failure_share: float) -> list[Rollout]:
        """Pause every active rollout where more than `max_failure_share` of the devices it
        reaches report a failed install of its version."""
        # A decision: taken once, under the lock, even when reports of several devices reach
        # several replicas at the same moment (the second sees the rollout paused already).
        paused_ids = []
        with self._db.transaction(decision=True):
            for rollout in self.rollouts():
                if rollout.state != ACTIVE or not rollout.devices:
                    continue
                if rollout.failed / len(rollout.devices) > max_failure_share:
                    reason = (
                        f"auto-paused: {rollout.failed} of {len(rollout.devices)} devices "
                        f"failed to install (limit {max_failure_share:.0%})"
                    )
                    self._db.execute(
                        "UPDATE rollouts SET state = ?, reason = ? WHERE id = ?",
                        (PAUSED, reason, rollout.id),
                    )
                    paused_ids.append(rollout.id)
        return [self._rollout(i) for i in paused_ids]

    # -- reports --------------------------------------------------------------------------------

    def record(self, device_id: str, reports: Iterable[Report], now: float) -> list[Report]:
        """Store what differs in the device's reports from what it reported before, and
        returns those with a new state (a device repeats its reports on every poll, and a poll
        that brings nothing new writes nothing: no write, no fsync per poll). That the device was
        seen is written in batches (`touch`)."""
        stored = {
            str(r[0]): tuple(r[1:])
            for r in self._db.execute(
                "SELECT model, installed_version, serving_version, target_version, state, error, "
                "variant FROM reports WHERE device_id = ?",
                (device_id,),
            )
        }
        fresh = [
            r
            for r in reports
            if stored.get(r.model)
            != (r.installed_version, r.serving_version, r.target_version, r.state, r.error,
                r.variant)
        ]  # fmt: skip
        # The last error stays until another replaces it: a device that failed and went back
        # to its old version still shows why.
        errors = [f"{r.model} v{r.target_version}: {r.error}" for r in fresh if r.error]
        if not fresh:
            return []
        changed = []
        with self._db.transaction():
            for r in fresh:
                before = stored.get(r.model)
                self._db.execute(
                    "INSERT INTO reports VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (device_id, model) DO UPDATE SET "
                    "installed_version = excluded.installed_version, "
                    "serving_version = excluded.serving_version, "
                    "target_version = excluded.target_version, state = excluded.state, "
                    "error = excluded.error, updated = excluded.updated, "
                    "variant = excluded.variant",
                    (device_id, r.model, r.installed_version, r.serving_version,
                     r.target_version, r.state, r.error, now, r.variant),
                )  # fmt: skip
                if r.state == FAILED:
                    self._db.execute(
                        "INSERT INTO install_failures VALUES (?, ?, ?, ?, ?) "
                        "ON CONFLICT (device_id, model, version) DO UPDATE SET "
                        "error = excluded.error, at = excluded.at",
                        (device_id, r.model, r.target_version, r.error, now),
                    )
                elif r.state in INSTALLED_STATES:
                    self._db.execute(
                        "DELETE FROM install_failures WHERE device_id = ? AND model = ? "
                        "AND version = ?",
                        (device_id, r.model, r.target_version),
                    )
                if before is None or before[1:5] != (
                    r.serving_version,
                    r.target_version,
                    r.state,
                    r.error,
                ):
                    changed.append(r)
                    self._db.execute(
                        "INSERT INTO history VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (device_id, r.model, now, r.target_version, r.serving_version, r.state,
                         r.error),
                    )  # fmt: skip
            if errors:
                self._db.execute(
                    "UPDATE devices SET last_error = ? WHERE device_id = ?",
                    ("; ".join(errors), device_id),
                )
            self._db.execute(
                "UPDATE devices SET last_seen = ? WHERE device_id = ?", (now, device_id)
            )
        return changed

    def touch(self, seen: Mapping[str, float]) -> None:
        """When devices were last seen, many in one transaction (batched by the service: one
        write per interval, not one per poll)."""
        if seen:
            with self._db.transaction():
                self._db.executemany(
                    "UPDATE devices SET last_seen = ? WHERE device_id = ? AND last_seen < ?",
                    [(at, device, at) for device, at in seen.items()],
                )

    # -- what a device may read ------------------------------------------------------------------

    # A rollout reaches a device: the fleet, its group, or its canary cohort. Rolled back and
    # paused ones count too: a device may read what was sent to it.
    _REACHES = (
        "(r.scope = 'fleet' OR (r.scope = 'group' AND r.grp = ?) OR (r.scope = 'canary' AND "
        "EXISTS (SELECT 1 FROM cohorts c WHERE c.rollout_id = r.id AND c.device_id = ?)))"
    )

    def may_fetch_release(self, device_id: str, model: str, version: int) -> bool:
        group = self._group(device_id)
        if group is None:
            return False
        row = self._db.execute(
            f"SELECT 1 FROM rollouts r WHERE r.model = ? AND r.version = ? AND {self._REACHES} "
            "LIMIT 1",
            (model, version, group, device_id),
        ).fetchone()
        return row is not None

    def may_fetch_blob(self, device_id: str, digest: str) -> bool:
        group = self._group(device_id)
        if group is None:
            return False
        row = self._db.execute(
            "SELECT 1 FROM release_blobs b JOIN rollouts r ON r.model = b.model AND "
            f"r.version = b.version WHERE b.digest = ? AND {self._REACHES} LIMIT 1",
            (digest, group, device_id),
        ).fetchone()
        if row is not None:
            return True
        # A learning task's global weights: for the devices taking part in it.
        row = self._db.execute(
            "SELECT 1 FROM learning_versions v JOIN learning_devices d ON d.task_id = v.task_id "
            "WHERE v.digest = ? AND d.device_id = ? LIMIT 1",
            (digest, device_id),
        ).fetchone()
        return row is not None

    # -- housekeeping ---------------------------------------------------------------------------

    def prune(self, now: float) -> int:
        """Bound what devices' reports leave behind: history older than HISTORY_DAYS or beyond
        the newest HISTORY_ROWS per device and model, failures older than HISTORY_DAYS, reports
        of devices no longer enrolled. Returns the rows removed."""
        cutoff = now - HISTORY_DAYS * 86400
        removed = 0
        rowid = self._db.rowid
        with self._db.transaction():
            for sql, args in (
                ("DELETE FROM history WHERE at < ?", (cutoff,)),
                (
                    f"DELETE FROM history WHERE {rowid} IN (SELECT {rowid} FROM (SELECT "
                    f"{rowid}, ROW_NUMBER() OVER (PARTITION BY device_id, model ORDER BY at "
                    "DESC) AS n FROM history) AS ranked WHERE n > ?)",
                    (HISTORY_ROWS,),
                ),
                ("DELETE FROM install_failures WHERE at < ?", (cutoff,)),
                ("DELETE FROM reports WHERE device_id NOT IN (SELECT device_id FROM devices)", ()),
            ):
                removed += self._db.execute(sql, args).rowcount
        return removed

    # -- learning -------------------------------------------------------------------------------

    def newest_version(self, model: str) -> int:
        row = self._db.execute(
            "SELECT MAX(version) FROM releases WHERE model = ?", (model,)
        ).fetchone()
        return int(row[0] or 0) if row else 0

    def reach(
        self, scope: str, group: str, canary_percent: float, model: str, version: int
    ) -> list[str]:
        """The devices a target with this scope would reach now."""
        groups = self._groups()
        if scope == FLEET:
            return sorted(groups)
        if scope == GROUP:
            return sorted(d for d, g in groups.items() if g == group)
        return canary_cohort(model, version, sorted(groups), canary_percent)

    def add_task(
        self,
        model: str,
        base_version: int,
        spec: bytes,
        validation: bytes,
        shapes: Mapping[str, list[int]],
        devices: Iterable[str],
        base_accuracy: float,
        global_digest: str,
    ) -> int:
        now = time.time()
        with self._db.transaction():
            row = self._db.execute(
                "INSERT INTO learning_tasks (model, base_version, spec, validation, shapes, "
                "state, global_version, global_digest, round, base_accuracy, created) "
                "VALUES (?, ?, ?, ?, ?, 'running', 0, ?, 0, ?, ?) RETURNING id",
                (model, base_version, spec, validation, json.dumps(dict(shapes)), global_digest,
                 base_accuracy, now),
            ).fetchone()  # fmt: skip
            task_id = int(row[0]) if row else 0
            self._db.executemany(
                "INSERT INTO learning_devices VALUES (?, ?)", [(task_id, d) for d in devices]
            )
            self._db.execute(
                "INSERT INTO learning_versions VALUES (?, 0, ?, ?, 1, ?, 0, ?)",
                (task_id, global_digest, base_accuracy, base_version, now),
            )
        return task_id

    def tasks(self, task_id: int = 0, validation: bool = True) -> list[LearningTaskRow]:
        """Tasks (all, or one); without `validation` their validation sets are left unread
        (b""): a device's long-poll reads its tasks, and a set may be 64 MiB."""
        column = "validation" if validation else "NULL"
        rows = self._db.execute(
            f"SELECT id, model, base_version, spec, {column}, shapes, state, global_version, "
            "global_digest, round, base_accuracy, counters FROM learning_tasks "
            "WHERE ? = 0 OR id = ? ORDER BY id",
            (task_id, task_id),
        ).fetchall()
        out = []
        for r in rows:
            devices = tuple(
                d[0]
                for d in self._db.execute(
                    "SELECT device_id FROM learning_devices WHERE task_id = ? ORDER BY device_id",
                    (r[0],),
                )
            )
            out.append(
                LearningTaskRow(
                    int(r[0]), str(r[1]), int(r[2]), bytes(r[3]), bytes(r[4] or b""),
                    json.loads(r[5]), str(r[6]), int(r[7]), str(r[8]), int(r[9]), float(r[10]),
                    json.loads(r[11]),
                    devices,
                )
            )  # fmt: skip
        return out

    def set_task_state(self, task_id: int, state: str) -> None:
        self._db.execute("UPDATE learning_tasks SET state = ? WHERE id = ?", (state, task_id))

    def running_tasks(self) -> list[tuple[int, bytes, int]]:
        """(id, spec, global version) of the running tasks: without validation sets or devices."""
        return [
            (int(r[0]), bytes(r[1]), int(r[2]))
            for r in self._db.execute(
                "SELECT id, spec, global_version FROM learning_tasks WHERE state = 'running' "
                "ORDER BY id"
            )
        ]

    def device_tasks(self, device_id: str) -> list[LearningTaskRow]:
        ids = [
            r[0]
            for r in self._db.execute(
                "SELECT t.id FROM learning_tasks t JOIN learning_devices d ON d.task_id = t.id "
                "WHERE d.device_id = ? AND t.state = 'running' ORDER BY t.id",
                (device_id,),
            )
        ]
        return [t for i in ids for t in self.tasks(i, validation=False)]

    def count(self, task_id: int, **increments: int) -> None:
        # A read-modify-write of the counters: under the lock, or two replicas lose counts.
        with self._db.transaction(decision=True):
            row = self._db.execute(
                "SELECT counters FROM learning_tasks WHERE id = ?", (task_id,)
            ).fetchone()
            counters = json.loads(row[0]) if row else {}
            for key, value in increments.items():
                counters[key] = counters.get(key, 0) + value
            self._db.execute(
                "UPDATE learning_tasks SET counters = ? WHERE id = ?",
                (json.dumps(counters), task_id),
            )

    def add_update(self, task_id: int, update: UpdateRow, state: str, now: float) -> bool:
        """Record an update; False when its id was seen before (it is not recorded again)."""
        cursor = self._db.execute(
            "INSERT INTO learning_updates VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (task_id, update.update_id, update.device_id, update.base_global, update.examples,
             update.digest, state, now),
        )  # fmt: skip
        return cursor.rowcount == 1

    def update_state(self, task_id: int, update_id: str) -> str | None:
        row = self._db.execute(
            "SELECT state FROM learning_updates WHERE task_id = ? AND update_id = ?",
            (task_id, update_id),
        ).fetchone()
        return None if row is None else str(row[0])

    def buffered(self, task_id: int) -> list[UpdateRow]:
        return [
            UpdateRow(str(r[0]), str(r[1]), int(r[2]), int(r[3]), str(r[4]), float(r[5]))
            for r in self._db.execute(
                "SELECT update_id, device_id, base_global, examples, digest, at FROM "
                "learning_updates WHERE task_id = ? AND state = 'buffered' ORDER BY at",
                (task_id,),
            )
        ]

    def active_devices(self, task_id: int, since: float) -> int:
        """How many devices sent an update (counted or not) to the task since `since`."""
        row = self._db.execute(
            "SELECT COUNT(DISTINCT device_id) FROM learning_updates WHERE task_id = ? AND at >= ?",
            (task_id, since),
        ).fetchone()
        return int(row[0]) if row else 0

    def optimizer_state(self, task_id: int, version: int) -> str | None:
        """The digest of the server optimizer's state after global `version` (None: none yet)."""
        row = self._db.execute(
            "SELECT digest FROM learning_optimizer WHERE task_id = ? AND version = ?",
            (task_id, version),
        ).fetchone()
        return None if row is None else str(row[0])

    def advance(
        self,
        task_id: int,
        applied: list[str],
        version: VersionRow,
        counters: Mapping[str, int],
        optimizer_digest: str = "",
        dropped: Mapping[str, str] | None = None,
        expected_round: int | None = None,
    ) -> None:
        """One aggregation, all or nothing: the updates it used are applied, those it dropped
        (id -> state) take their state, the candidate is recorded, the round advances, and an
        accepted candidate becomes the global weights, with the server optimizer's state after
        it (`optimizer_digest`). With `expected_round`, a task whose round moved on since it was
        read (another replica aggregated from the same global) refuses it (Aborted). A
        crash before this commits leaves the updates buffered, to be aggregated again. Under
        the decision lock: of two replicas aggregating the same buffer, the second is refused
        (Aborted), so an aggregation is decided once."""
        with self._db.transaction(decision=True):
            marks = ", ".join("?" * len(applied))
            still = self._db.execute(
                "SELECT COUNT(*) FROM learning_updates WHERE task_id = ? AND state = 'buffered' "
                f"AND update_id IN ({marks})",
                (task_id, *applied),
            ).fetchone()
            taken = self._db.execute(
                "SELECT 1 FROM learning_versions WHERE task_id = ? AND version = ?",
                (task_id, version.version),
            ).fetchone()
            if (still[0] if still else 0) != len(applied) or taken is not None:
                raise Aborted("these updates were aggregated already (by another replica)")
            self._db.executemany(
                "UPDATE learning_updates SET state = 'applied' WHERE task_id = ? AND "
                "update_id = ? AND state = 'buffered'",
                [(task_id, u) for u in applied],
            )
            self._db.execute(
                "INSERT INTO learning_versions VALUES (?, ?, ?, ?, ?, 0, ?, ?)",
                (task_id, version.version, version.digest, version.accuracy,
                 int(version.accepted), version.updates, version.at),
            )  # fmt: skip
            if expected_round is None:
                self._db.execute(
                    "UPDATE learning_tasks SET round = round + 1 WHERE id = ?", (task_id,)
                )
            elif (
                self._db.execute(
                    "UPDATE learning_tasks SET round = round + 1 WHERE id = ? AND round = ?",
                    (task_id, expected_round),
                ).rowcount
                != 1
            ):
                raise Aborted("the task moved on since it was read (aggregated elsewhere)")
            if dropped:
                self._db.executemany(
                    "UPDATE learning_updates SET state = ? WHERE task_id = ? AND update_id = ? "
                    "AND state = 'buffered'",
                    [(state, task_id, u) for u, state in dropped.items()],
                )
            if version.accepted:
                self._db.execute(
                    "UPDATE learning_tasks SET global_version = ?, global_digest = ? WHERE id = ?",
                    (version.version, version.digest, task_id),
                )
                if optimizer_digest:
                    self._db.execute(
                        "INSERT INTO learning_optimizer VALUES (?, ?, ?)",
                        (task_id, version.version, optimizer_digest),
                    )
            row = self._db.execute(
                "SELECT counters FROM learning_tasks WHERE id = ?", (task_id,)
            ).fetchone()
            merged = json.loads(row[0]) if row else {}
            for key, value in counters.items():
                merged[key] = merged.get(key, 0) + value
            self._db.execute(
                "UPDATE learning_tasks SET counters = ? WHERE id = ?", (json.dumps(merged), task_id)
            )

    def set_released(self, task_id: int, version: int, model_version: int) -> None:
        self._db.execute(
            "UPDATE learning_versions SET released = ? WHERE task_id = ? AND version = ?",
            (model_version, task_id, version),
        )

    def versions(self, task_id: int) -> list[VersionRow]:
        return [
            VersionRow(int(r[0]), str(r[1]), float(r[2]), bool(r[3]), int(r[4]), int(r[5]), r[6])
            for r in self._db.execute(
                "SELECT version, digest, accuracy, accepted, released, updates, at FROM "
                "learning_versions WHERE task_id = ? ORDER BY version",
                (task_id,),
            )
        ]

    def devices(self, after: str = "", limit: int | None = None) -> list[Device]:
        """Devices in id order, those after `after`, at most `limit` (a page)."""
        out: list[Device] = []
        sql = "SELECT device_id, grp, last_seen, last_error FROM devices WHERE device_id > ? "
        sql += "ORDER BY device_id" + (" LIMIT ?" if limit is not None else "")
        args: tuple[object, ...] = (after, limit) if limit is not None else (after,)
        rows = self._db.execute(sql, args).fetchall()
        if not rows:
            return out
        # The page's reports in one query (the page is a range of ids), not one per device: the
        # dashboard and FleetStatus read whole pages of 1,000.
        reports: dict[str, list[Report]] = {}
        for device_id, *fields in self._db.execute(
            "SELECT device_id, model, installed_version, serving_version, target_version, state, "
            "error, variant FROM reports WHERE device_id >= ? AND device_id <= ? "
            "ORDER BY device_id, model",
            (rows[0][0], rows[-1][0]),
        ):
            reports.setdefault(str(device_id), []).append(Report(*fields))
        for device_id, group, last_seen, last_error in rows:
            found = tuple(reports.get(device_id, ()))
            out.append(Device(device_id, group, last_seen, last_error, found))
        return out


class SqliteRegistry(SqlRegistry):
    """The embedded default: one SQLite file."""

    def __init__(self, path: Path) -> None:
        super().__init__(SqliteDatabase(path))
