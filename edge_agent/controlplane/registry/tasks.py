"""Learning tasks (the parameter server's state): each task's global weights and round, the
devices taking part, the updates they send (buffered until an aggregation applies or drops
them), and every candidate version an aggregation made.

Read-modify-writes of a task (its counters, an aggregation) take the decision lock: two
replicas must neither lose counts nor apply one buffer twice."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable, Mapping

from edge_agent.controlplane.database import Database, row_to
from edge_agent.errors import Aborted

# A task's states as stored.
RUNNING, STOPPED = "running", "stopped"
# An update's states as stored: waiting for an aggregation, or used by one.
BUFFERED, APPLIED = "buffered", "applied"


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


def takes_part_in_task_of(db: Database, device_id: str, digest: str) -> bool:
    """Whether `digest` is a learning task's global weights (of any version) and the device
    takes part in that task."""
    row = db.execute(
        "SELECT 1 AS found FROM learning_versions v JOIN learning_devices d "
        "ON d.task_id = v.task_id WHERE v.digest = ? AND d.device_id = ? LIMIT 1",
        (digest, device_id),
    ).first()
    return row is not None


class LearningRecords:
    _db: Database  # the registry's database (SqlRegistry)

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
                "VALUES (?, ?, ?, ?, ?, ?, 0, ?, 0, ?, ?) RETURNING id",
                (model, base_version, spec, validation, json.dumps(dict(shapes)), RUNNING,
                 global_digest, base_accuracy, now),
            ).first()  # fmt: skip
            task_id = int(row["id"]) if row else 0
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
        column = "validation" if validation else "NULL AS validation"
        rows = self._db.execute(
            f"SELECT id, model, base_version, spec, {column}, shapes, state, global_version, "
            "global_digest, round, base_accuracy, counters FROM learning_tasks "
            "WHERE ? = 0 OR id = ? ORDER BY id",
            (task_id, task_id),
        ).all()
        return [
            row_to(
                LearningTaskRow,
                row,
                spec=bytes(row["spec"]),
                validation=bytes(row["validation"] or b""),
                shapes=json.loads(row["shapes"]),
                counters=json.loads(row["counters"]),
                devices=self._task_devices(row["id"]),
            )
            for row in rows
        ]

    def _task_devices(self, task_id: int) -> tuple[str, ...]:
        rows = self._db.execute(
            "SELECT device_id FROM learning_devices WHERE task_id = ? ORDER BY device_id",
            (task_id,),
        ).all()
        return tuple(str(r["device_id"]) for r in rows)

    def set_task_state(self, task_id: int, state: str) -> None:
        self._db.execute("UPDATE learning_tasks SET state = ? WHERE id = ?", (state, task_id))

    def running_tasks(self) -> list[tuple[int, bytes, int]]:
        """(id, spec, global version) of the running tasks: without validation sets or devices."""
        rows = self._db.execute(
            "SELECT id, spec, global_version FROM learning_tasks WHERE state = ? ORDER BY id",
            (RUNNING,),
        ).all()
        return [(int(r["id"]), bytes(r["spec"]), int(r["global_version"])) for r in rows]

    def device_tasks(self, device_id: str) -> list[LearningTaskRow]:
        rows = self._db.execute(
            "SELECT t.id FROM learning_tasks t JOIN learning_devices d ON d.task_id = t.id "
            "WHERE d.device_id = ? AND t.state = ? ORDER BY t.id",
            (device_id, RUNNING),
        ).all()
        return [t for r in rows for t in self.tasks(int(r["id"]), validation=False)]

    def count(self, task_id: int, **increments: int) -> None:
        # A read-modify-write of the counters: under the lock, or two replicas lose counts.
        with self._db.transaction(decision=True):
            self._add_to_counters(task_id, increments)

    def _add_to_counters(self, task_id: int, increments: Mapping[str, int]) -> None:
        """Inside a decision transaction (a read-modify-write)."""
        row = self._db.execute(
            "SELECT counters FROM learning_tasks WHERE id = ?", (task_id,)
        ).first()
        counters = json.loads(row["counters"]) if row else {}
        for key, value in increments.items():
            counters[key] = counters.get(key, 0) + value
        self._db.execute(
            "UPDATE learning_tasks SET counters = ? WHERE id = ?", (json.dumps(counters), task_id)
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
        ).first()
        return None if row is None else str(row["state"])

    def buffered(self, task_id: int) -> list[UpdateRow]:
        rows = self._db.execute(
            "SELECT update_id, device_id, base_global, examples, digest, at FROM "
            "learning_updates WHERE task_id = ? AND state = ? ORDER BY at",
            (task_id, BUFFERED),
        ).all()
        return [row_to(UpdateRow, r) for r in rows]

    def active_devices(self, task_id: int, since: float) -> int:
        """How many devices sent an update (counted or not) to the task since `since`."""
        row = self._db.execute(
            "SELECT COUNT(DISTINCT device_id) AS devices FROM learning_updates "
            "WHERE task_id = ? AND at >= ?",
            (task_id, since),
        ).first()
        return int(row["devices"]) if row else 0

    def optimizer_state(self, task_id: int, version: int) -> str | None:
        """The digest of the server optimizer's state after global `version` (None: none yet)."""
        row = self._db.execute(
            "SELECT digest FROM learning_optimizer WHERE task_id = ? AND version = ?",
            (task_id, version),
        ).first()
        return None if row is None else str(row["digest"])

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
            self._claim(task_id, applied, version.version)
            self._db.executemany(
                "UPDATE learning_updates SET state = ? WHERE task_id = ? AND update_id = ? "
                "AND state = ?",
                [(APPLIED, task_id, u, BUFFERED) for u in applied],
            )
            self._db.execute(
                "INSERT INTO learning_versions VALUES (?, ?, ?, ?, ?, 0, ?, ?)",
                (task_id, version.version, version.digest, version.accuracy,
                 int(version.accepted), version.updates, version.at),
            )  # fmt: skip
            self._next_round(task_id, expected_round)
            if dropped:
                self._db.executemany(
                    "UPDATE learning_updates SET state = ? WHERE task_id = ? AND update_id = ? "
                    "AND state = ?",
                    [(state, task_id, u, BUFFERED) for u, state in dropped.items()],
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
            self._add_to_counters(task_id, counters)

    def _claim(self, task_id: int, applied: list[str], version: int) -> None:
        """Refuse (Aborted) an aggregation whose updates are no longer all buffered or whose
        version was recorded already: another replica took it first."""
        marks = ", ".join("?" * len(applied))
        still = self._db.execute(
            "SELECT COUNT(*) AS buffered FROM learning_updates WHERE task_id = ? AND state = ? "
            f"AND update_id IN ({marks})",
            (task_id, BUFFERED, *applied),
        ).first()
        taken = self._db.execute(
            "SELECT 1 AS found FROM learning_versions WHERE task_id = ? AND version = ?",
            (task_id, version),
        ).first()
        if (still["buffered"] if still else 0) != len(applied) or taken is not None:
            raise Aborted("these updates were aggregated already (by another replica)")

    def _next_round(self, task_id: int, expected_round: int | None) -> None:
        advance = "UPDATE learning_tasks SET round = round + 1 WHERE id = ?"
        if expected_round is None:
            self._db.execute(advance, (task_id,))
        elif self._db.execute(f"{advance} AND round = ?", (task_id, expected_round)).rowcount != 1:
            raise Aborted("the task moved on since it was read (aggregated elsewhere)")

    def set_released(self, task_id: int, version: int, model_version: int) -> None:
        self._db.execute(
            "UPDATE learning_versions SET released = ? WHERE task_id = ? AND version = ?",
            (model_version, task_id, version),
        )

    def versions(self, task_id: int) -> list[VersionRow]:
        rows = self._db.execute(
            "SELECT version, digest, accuracy, accepted, released, updates, at FROM "
            "learning_versions WHERE task_id = ? ORDER BY version",
            (task_id,),
        ).all()
        return [row_to(VersionRow, r, accepted=bool(r["accepted"])) for r in rows]
