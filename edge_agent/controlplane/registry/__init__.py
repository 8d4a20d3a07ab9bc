"""The control plane's state: devices and their tokens, releases and their blobs, rollouts and
the desired state they make, devices' reports, learning tasks and their updates.

`Registry` (protocol.py) is what the service needs; `SqlRegistry` (sql.py) keeps it in a SQL
database: one SQLite file in WAL mode (the embedded default, `SqliteRegistry`) or PostgreSQL
(database.py), with a versioned schema (schema.py). It is made of one part per aggregate, each
in its module; rollouts.py holds the one rule that decides a device's version of each model.
Everything is imported from here.
"""

from edge_agent.controlplane.registry.devices import Device
from edge_agent.controlplane.registry.protocol import Registry
from edge_agent.controlplane.registry.releases import BlobInfo, StoredRelease
from edge_agent.controlplane.registry.reports import (
    FAILED,
    HISTORY_DAYS,
    HISTORY_ROWS,
    INSTALLED_STATES,
    Report,
)
from edge_agent.controlplane.registry.rollouts import (
    ACTIVE,
    CANARY,
    FLEET,
    GROUP,
    PAUSED,
    PENDING,
    ROLLED_BACK,
    SUPERSEDED,
    Rollout,
    canary_cohort,
    revision,
)
from edge_agent.controlplane.registry.schema import MIGRATIONS, SCHEMA, migrate
from edge_agent.controlplane.registry.sql import POSTGRES_THREADS, SqliteRegistry, SqlRegistry
from edge_agent.controlplane.registry.tasks import (
    APPLIED,
    BUFFERED,
    RUNNING,
    STOPPED,
    LearningTaskRow,
    UpdateRow,
    VersionRow,
)

__all__ = [
    "ACTIVE",
    "APPLIED",
    "BUFFERED",
    "CANARY",
    "FAILED",
    "FLEET",
    "GROUP",
    "HISTORY_DAYS",
    "HISTORY_ROWS",
    "INSTALLED_STATES",
    "MIGRATIONS",
    "PAUSED",
    "PENDING",
    "POSTGRES_THREADS",
    "ROLLED_BACK",
    "RUNNING",
    "SCHEMA",
    "STOPPED",
    "SUPERSEDED",
    "BlobInfo",
    "Device",
    "LearningTaskRow",
    "Registry",
    "Report",
    "Rollout",
    "SqlRegistry",
    "SqliteRegistry",
    "StoredRelease",
    "UpdateRow",
    "VersionRow",
    "canary_cohort",
    "migrate",
    "revision",
]
