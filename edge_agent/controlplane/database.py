"""The registry's SQL connection: SQLite (the embedded default) or PostgreSQL (psycopg 3 and its
pool, for several control-plane replicas). The registry writes one SQL text for both; this
module bridges the differences that matter to it (placeholders, column types, transactions,
the history table's row id, cross-process notifications) and nothing more.

Driver errors that mean "the database is not reachable" become `Unavailable`, so a device or a
publisher gets UNAVAILABLE (and retries) while PostgreSQL restarts; the pool replaces the
broken connections.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

from edge_agent.errors import ConfigError, Unavailable
from edge_agent.observability.logging import get_logger

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

log = get_logger(__name__)

# Cross-replica change notices (PostgreSQL LISTEN/NOTIFY).
CHANNEL = "edge_agent_changes"
# pg_advisory_xact_lock key for decisions that must be taken once across replicas (rollout
# cohorts, auto-pause, a learning aggregation): "edgeagnt" as 8 bytes.
DECISION_LOCK = int.from_bytes(b"edgeagnt", "big") & 0x7FFF_FFFF_FFFF_FFFF

Record = dict[str, Any]  # one row, by column name
_Stored = TypeVar("_Stored", bound="DataclassInstance")


class Rows:
    """A statement's result, read whole (the connection goes back to the pool at once).

    `first` and `all` give rows by column name, the same in both dialects (an expression's
    column needs an `AS` name: SQLite and PostgreSQL name `MAX(x)` differently; two columns of
    one name would collapse into one); `fetchone` keeps the DB-API's tuple."""

    def __init__(self, columns: Sequence[str], rows: list[tuple[Any, ...]], rowcount: int) -> None:
        self._columns = tuple(columns)
        self._rows = rows
        self.rowcount = rowcount

    def fetchone(self) -> tuple[Any, ...] | None:
        return self._rows[0] if self._rows else None

    def first(self) -> Record | None:
        return dict(zip(self._columns, self._rows[0], strict=True)) if self._rows else None

    def all(self) -> list[Record]:
        return [dict(zip(self._columns, row, strict=True)) for row in self._rows]


def row_to(cls: type[_Stored], row: Record, **stored_otherwise: Any) -> _Stored:
    """The dataclass `cls` from a row whose columns carry its fields' names; `stored_otherwise`
    gives the fields whose columns do not hold them as they are (JSON text, 0/1 for a bool, a
    column named otherwise). A field the row has no column for keeps its default."""
    names = {field.name for field in dataclasses.fields(cls)} - stored_otherwise.keys()
    return cls(**{n: row[n] for n in names if n in row}, **stored_otherwise)


class Database(Protocol):
    dialect: str
    # The history table's physical row id, for deleting rows picked by a window function.
    rowid: str

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Rows: ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    def transaction(self, decision: bool = False) -> contextlib.AbstractContextManager[None]:
        """All statements inside commit together or not at all; `decision` also serializes
        the transaction against every other replica's decisions."""
        ...

    def notify(self, payload: str) -> None:
        """Tell every replica (this one included) that desired state changed for `payload`."""
        ...

    def size_bytes(self) -> int: ...

    def close(self) -> None: ...


def _column_names(description: Sequence[Sequence[Any]] | None) -> list[str]:
    """The result's column names from a DB-API cursor description (None: a statement that
    returns no rows)."""
    return [str(column[0]) for column in description or ()]


def describe(url: str) -> str:
    """A database address fit for logs: the password, if any, replaced."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def open_database(spec: str) -> Database:
    """`spec`: sqlite:PATH or a postgresql:// URL. No spec at all (SQLite in DATA_DIR) is
    server.open_registry's to handle."""
    if spec.startswith("sqlite:"):
        return SqliteDatabase(Path(spec.removeprefix("sqlite:")))
    if spec.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(spec)
    raise ConfigError(f"--database: expected postgresql://... or sqlite:PATH, got {spec!r}")


class SqliteDatabase:
    dialect = "sqlite"
    rowid = "rowid"

    def __init__(self, path: Path) -> None:
        # One connection, used by one thread at a time (the control plane's registry thread).
        # Created 0600: it holds token hashes and the fleet's layout.
        if not path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._depth = 0

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        cursor = self._db.execute(sql, params)
        return Rows(_column_names(cursor.description), cursor.fetchall(), cursor.rowcount)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._db.executemany(sql, rows)

    @contextlib.contextmanager
    def transaction(self, decision: bool = False) -> Iterator[None]:
        # One process holds the file: BEGIN IMMEDIATE already serializes every writer.
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._db.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            self._db.execute("COMMIT")
        finally:
            self._depth = 0

    def notify(self, payload: str) -> None:
        """One process: the service wakes its own long-polls."""

    def size_bytes(self) -> int:
        return sum(
            p.stat().st_size
            for p in (self.path, Path(f"{self.path}-wal"))
            if p.exists()  # the WAL file comes and goes with checkpoints
        )

    def close(self) -> None:
        self._db.close()


# SQLite's column types -> PostgreSQL's, for the one schema text (INTEGER: sizes and ids
# outgrow 32 bits; REAL is single precision in PostgreSQL, and timestamps need double).
_PG_TYPES = (
    (
        re.compile(r"\bINTEGER PRIMARY KEY AUTOINCREMENT\b"),
        "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
    ),
    (re.compile(r"\bINTEGER\b"), "BIGINT"),
    (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
    (re.compile(r"\bBLOB\b"), "BYTEA"),
)  # fmt: skip


def postgres_schema(schema: str) -> str:
    for pattern, replacement in _PG_TYPES:
        schema = pattern.sub(replacement, schema)
    return schema


def postgres_sql(sql: str) -> str:
    """'?' placeholders -> psycopg's '%s' (the registry's SQL holds no literal % or ?)."""
    return sql.replace("?", "%s")


class PostgresDatabase:
    dialect = "postgresql"
    rowid = "ctid"

    def __init__(self, url: str, max_connections: int = 8) -> None:
        # The registry's threads (registry.POSTGRES_THREADS) keep one each; the thread that
        # opened it (the schema migration) one more.
        try:
            import psycopg
            import psycopg_pool
        except ImportError as exc:  # an install without the extra
            raise ConfigError(
                "--database postgresql:// needs psycopg: pip install 'edge-agent[scale]'"
            ) from exc
        self._psycopg = psycopg
        self.url = url
        self._local = threading.local()  # the connection of the transaction open on a thread
        # No check on checkout (a round trip per statement): each registry thread keeps the
        # connection it took (`_pinned`); one that breaks is handed back (the pool replaces a
        # broken connection) and the statement answers UNAVAILABLE; the next takes a new one.
        self._pool = psycopg_pool.ConnectionPool(
            url,
            min_size=1,
            max_size=max_connections,
            kwargs={"autocommit": True},
            open=False,
            name="registry",
        )
        try:
            self._pool.open(wait=True, timeout=15)
        except psycopg_pool.PoolTimeout as exc:
            raise ConfigError(
                f"cannot connect to the database {describe(url)} within 15 s"
            ) from exc

    def _pinned(self) -> Any:
        """This thread's connection, taken from the pool on first use."""
        conn = getattr(self._local, "pinned", None)
        if conn is None or conn.closed:
            if conn is not None:
                self._release()
            conn = self._pool.getconn(timeout=10)
            self._local.pinned = conn
        return conn

    def _release(self) -> None:
        conn = getattr(self._local, "pinned", None)
        self._local.pinned = None
        if conn is not None:
            with contextlib.suppress(Exception):
                self._pool.putconn(conn)  # a broken one is discarded and replaced by the pool

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Any]:
        held = getattr(self._local, "conn", None)
        if held is not None:  # inside a transaction
            yield held
            return
        yield self._pinned()

    @contextlib.contextmanager
    def _unavailable(self) -> Iterator[None]:
        import psycopg_pool

        try:
            yield
        except (self._psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
            self._release()
            raise Unavailable(f"the database is unavailable ({type(exc).__name__}); retry") from exc

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        with self._unavailable(), self._connection() as conn:
            cursor = conn.execute(postgres_sql(sql), tuple(params))
            rows = cursor.fetchall() if cursor.description is not None else []
            columns = _column_names(cursor.description)
            return Rows(columns, [tuple(r) for r in rows], cursor.rowcount)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = [tuple(r) for r in rows]
        if not rows:
            return
        with self._unavailable(), self._connection() as conn:
            conn.cursor().executemany(postgres_sql(sql), rows)

    @contextlib.contextmanager
    def transaction(self, decision: bool = False) -> Iterator[None]:
        if getattr(self._local, "conn", None) is not None:  # nested: part of the outer one
            yield
            return
        with self._unavailable():
            conn = self._pinned()
            with conn.transaction():
                self._local.conn = conn
                try:
                    if decision:
                        conn.execute("SELECT pg_advisory_xact_lock(%s)", (DECISION_LOCK,))
                    yield
                finally:
                    self._local.conn = None

    def notify(self, payload: str) -> None:
        # Sent at commit when inside a transaction: listeners never see a change before it is
        # visible to them.
        self.execute("SELECT pg_notify(?, ?)", (CHANNEL, payload))

    def size_bytes(self) -> int:
        row = self.execute("SELECT pg_database_size(current_database()) AS size").first()
        return int(row["size"]) if row else 0

    def listen(self, deliver: Callable[[str], None], stop: threading.Event) -> None:
        """On a thread of its own: LISTEN on CHANNEL and hand each payload to `deliver`, until
        `stop`. A lost connection is reopened (backing off), then `deliver("*")`: changes may
        have been missed meanwhile."""
        backoff = 0.5
        first = True
        while not stop.is_set():
            try:
                with self._psycopg.connect(self.url, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    if not first:
                        log.info("registry.listen_resumed")
                        deliver("*")
                    first, backoff = False, 0.5
                    while not stop.is_set():
                        for notice in conn.notifies(timeout=1.0):
                            deliver(notice.payload)
            except self._psycopg.Error as exc:
                log.warning("registry.listen_failed", error=str(exc).strip()[:200])
                stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def close(self) -> None:
        self._release()
        self._pool.close()
