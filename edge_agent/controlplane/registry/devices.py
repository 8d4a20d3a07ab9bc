"""The fleet's devices: who is enrolled, in which group, with which token, and the page of them
(with their latest reports) that FleetStatus and the dashboard show."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

from edge_agent.controlplane.database import Database, row_to
from edge_agent.controlplane.registry.reports import Report
from edge_agent.errors import AlreadyExists, FailedPrecondition, NotFound


@dataclasses.dataclass(frozen=True)
class Device:
    device_id: str
    group: str
    last_seen: float
    last_error: str
    reports: tuple[Report, ...]


def device_groups(db: Database) -> dict[str, str]:
    """Every enrolled device's group."""
    rows = db.execute("SELECT device_id, grp FROM devices").all()
    return {str(r["device_id"]): str(r["grp"]) for r in rows}


def device_group(db: Database, device_id: str) -> str | None:
    """One device's group (None: not enrolled), without reading every device: a device's
    long-poll and each of its fetches ask this."""
    row = db.execute("SELECT grp FROM devices WHERE device_id = ?", (device_id,)).first()
    return None if row is None else str(row["grp"])


class DeviceRecords:
    _db: Database  # the registry's database (SqlRegistry)

    def device_group(self, device_id: str) -> str | None:
        return device_group(self._db, device_id)

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
        ).first()
        return None if row is None else str(row["token_hash"])

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
                self.add_device(device_id, group, token_hash)

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
        ).first()
        return None if row is None else str(row["device_id"])

    def devices(self, after: str = "", limit: int | None = None) -> list[Device]:
        """Devices in id order, those after `after`, at most `limit` (a page)."""
        sql = "SELECT device_id, grp, last_seen, last_error FROM devices WHERE device_id > ? "
        sql += "ORDER BY device_id" + (" LIMIT ?" if limit is not None else "")
        args: tuple[object, ...] = (after, limit) if limit is not None else (after,)
        rows = self._db.execute(sql, args).all()
        if not rows:
            return []
        # The page's reports in one query (the page is a range of ids), not one per device: the
        # dashboard and FleetStatus read whole pages of 1,000.
        reports: dict[str, list[Report]] = {}
        for row in self._db.execute(
            "SELECT device_id, model, installed_version, serving_version, target_version, state, "
            "error, variant FROM reports WHERE device_id >= ? AND device_id <= ? "
            "ORDER BY device_id, model",
            (rows[0]["device_id"], rows[-1]["device_id"]),
        ).all():
            reports.setdefault(str(row["device_id"]), []).append(row_to(Report, row))
        return [
            row_to(Device, r, group=r["grp"], reports=tuple(reports.get(r["device_id"], ())))
            for r in rows
        ]
