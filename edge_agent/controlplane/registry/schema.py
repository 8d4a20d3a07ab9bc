"""The registry's tables, one schema text for both dialects (database.py maps the column types),
and the schema's history: a database records the version it has reached, so a control plane
brings an older one up to date and refuses a newer one."""

from __future__ import annotations

from collections.abc import Callable

from edge_agent.controlplane.database import Database, postgres_schema
from edge_agent.controlplane.registry.health import HEALTH_SCHEMA
from edge_agent.errors import ConfigError
from edge_agent.observability.logging import get_logger

log = get_logger(__name__)

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


def _schema_v1(db: Database) -> None:
    schema = SCHEMA if db.dialect == "sqlite" else postgres_schema(SCHEMA)
    for statement in schema.split(";"):
        if statement.strip():
            db.execute(statement)
    if db.dialect == "sqlite":  # a registry made before versioning and before reports' variant
        columns = {r["name"] for r in db.execute("PRAGMA table_info(reports)").all()}
        if "variant" not in columns:
            db.execute("ALTER TABLE reports ADD COLUMN variant TEXT NOT NULL DEFAULT ''")


def _schema_v2(db: Database) -> None:
    """The server optimizer's state per accepted global version of a learning task."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS learning_optimizer (task_id INTEGER NOT NULL, "
        "version INTEGER NOT NULL, digest TEXT NOT NULL, PRIMARY KEY (task_id, version))"
    )


def _schema_v3(db: Database) -> None:
    """Fleet health (registry/health.py) and canary analysis on rollouts."""
    schema = HEALTH_SCHEMA if db.dialect == "sqlite" else postgres_schema(HEALTH_SCHEMA)
    for statement in schema.split(";"):
        if statement.strip():
            db.execute(statement)
    for column in (
        "analysis TEXT NOT NULL DEFAULT '{}'",
        "verdict TEXT NOT NULL DEFAULT '{}'",
        "stage INTEGER NOT NULL DEFAULT 0",
        "stage_started REAL NOT NULL DEFAULT 0",
    ):
        if db.dialect != "sqlite":
            column = postgres_schema(column)
        db.execute(f"ALTER TABLE rollouts ADD COLUMN {column}")


# The schema's history: MIGRATIONS[n - 1] brings a database from version n - 1 to n. Append,
# never edit: a database records the version it has reached (table schema_version).
MIGRATIONS: tuple[Callable[[Database], None], ...] = (_schema_v1, _schema_v2, _schema_v3)


def migrate(db: Database) -> int:
    """Create or bring the schema up to date, once even with several replicas starting together
    (the decision lock); returns the version reached. A newer schema than this code knows is
    refused: an older control plane must not write to it."""
    with db.transaction(decision=True):
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = db.execute("SELECT MAX(version) AS newest FROM schema_version").first()
        current = int(row["newest"] or 0) if row else 0
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
