"""What devices report about their models on each poll, and what those reports leave behind:
the latest report per device and model, the install failures a rollout's auto-pause counts, and
a bounded history of state changes.

A device repeats its reports on every poll; only what differs from the stored ones is written,
so a poll that brings nothing new writes nothing (no write, no fsync per poll)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from edge_agent.controlplane.database import Database, row_to

FAILED = "failed"
INSTALLED_STATES = ("installed", "serving")
# Report history kept per device and model (prune): the newest rows, none older than the days.
HISTORY_ROWS = 100
HISTORY_DAYS = 30


@dataclasses.dataclass(frozen=True)
class Report:
    model: str
    installed_version: int
    serving_version: int
    target_version: int
    state: str
    error: str
    variant: str = ""


def _is_new_state(before: Report | None, report: Report) -> bool:
    """Whether a report tells of something the history should keep (an installed version or a
    variant alone does not)."""
    return before is None or (
        before.serving_version,
        before.target_version,
        before.state,
        before.error,
    ) != (report.serving_version, report.target_version, report.state, report.error)


class ReportRecords:
    _db: Database  # the registry's database (SqlRegistry)

    def record(self, device_id: str, reports: Iterable[Report], now: float) -> list[Report]:
        """Store what differs in the device's reports from what it reported before, and
        returns those with a new state. That the device was seen is written in batches
        (`touch`)."""
        stored = self._stored_reports(device_id)
        fresh = [r for r in reports if stored.get(r.model) != r]
        if not fresh:
            return []
        # The last error stays until another replaces it: a device that failed and went back
        # to its old version still shows why.
        errors = [f"{r.model} v{r.target_version}: {r.error}" for r in fresh if r.error]
        changed = [r for r in fresh if _is_new_state(stored.get(r.model), r)]
        with self._db.transaction():
            for report in fresh:
                self._store(device_id, report, now)
            self._db.executemany(
                "INSERT INTO history VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(device_id, r.model, now, r.target_version, r.serving_version, r.state, r.error)
                 for r in changed],
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

    def _stored_reports(self, device_id: str) -> dict[str, Report]:
        rows = self._db.execute(
            "SELECT model, installed_version, serving_version, target_version, state, error, "
            "variant FROM reports WHERE device_id = ?",
            (device_id,),
        ).all()
        return {str(row["model"]): row_to(Report, row) for row in rows}

    def _store(self, device_id: str, report: Report, now: float) -> None:
        """The device's latest report of a model, and whether its target failed to install."""
        self._db.execute(
            "INSERT INTO reports VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (device_id, model) DO UPDATE SET "
            "installed_version = excluded.installed_version, "
            "serving_version = excluded.serving_version, "
            "target_version = excluded.target_version, state = excluded.state, "
            "error = excluded.error, updated = excluded.updated, variant = excluded.variant",
            (device_id, report.model, report.installed_version, report.serving_version,
             report.target_version, report.state, report.error, now, report.variant),
        )  # fmt: skip
        failure = (device_id, report.model, report.target_version)
        if report.state == FAILED:
            self._db.execute(
                "INSERT INTO install_failures VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (device_id, model, version) DO UPDATE SET "
                "error = excluded.error, at = excluded.at",
                (*failure, report.error, now),
            )
        elif report.state in INSTALLED_STATES:
            self._db.execute(
                "DELETE FROM install_failures WHERE device_id = ? AND model = ? AND version = ?",
                failure,
            )

    def touch(self, seen: Mapping[str, float]) -> None:
        """When devices were last seen, many in one transaction (batched by the service: one
        write per interval, not one per poll)."""
        if seen:
            with self._db.transaction():
                self._db.executemany(
                    "UPDATE devices SET last_seen = ? WHERE device_id = ? AND last_seen < ?",
                    [(at, device, at) for device, at in seen.items()],
                )

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
