"""The registry on a SQL database: one object, made of one part per aggregate.

Each part (devices, releases, rollouts, reports, learning tasks) is a class that owns its
tables' SQL and works on the one shared `Database`; `SqlRegistry` inherits them all. Thin mixins
rather than composition: the service and the parameter server call one flat surface of some
forty methods (`Registry`), and composing would mean writing each of those signatures a second
time only to forward it. Where one part needs another's tables (a rollout asks for a device's
group), it calls a plain function of that part's module with the database, not a method of a
sibling mixin, so each part reads on its own.
"""

from __future__ import annotations

from pathlib import Path

from edge_agent.controlplane.database import Database, SqliteDatabase
from edge_agent.controlplane.registry.devices import DeviceRecords
from edge_agent.controlplane.registry.health import HealthRecords
from edge_agent.controlplane.registry.releases import ReleaseRecords
from edge_agent.controlplane.registry.reports import ReportRecords
from edge_agent.controlplane.registry.rollouts import RolloutRecords
from edge_agent.controlplane.registry.schema import migrate
from edge_agent.controlplane.registry.tasks import LearningRecords

POSTGRES_THREADS = 4  # registry threads (and pool connections) on PostgreSQL


class SqlRegistry(
    DeviceRecords, ReleaseRecords, RolloutRecords, ReportRecords, LearningRecords, HealthRecords
):
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


class SqliteRegistry(SqlRegistry):
    """The embedded default: one SQLite file."""

    def __init__(self, path: Path) -> None:
        super().__init__(SqliteDatabase(path))
