"""Rollouts, and the desired state they make: which version of each model a device should run.

One rule decides it (`decide`), for one device (`desired`, every long-poll) and for the whole
fleet (`rollouts`, the publisher's and the dashboard's view): for each model, the newest rollout
that reaches the device decides its version. A paused rollout keeps only the devices that already
run its version; a rolled-back one reaches nobody, so its devices fall back to the rollout before
it. Whether a rollout reaches a device is one rule too (`Membership.reached_by`), which also says
what a device may fetch: there paused and rolled-back rollouts count as well, since a device may
read what was sent to it.

A rollout reaches the fleet, a group, or a fixed canary cohort (chosen when it is created: the
ceil(p% of n) devices first in sha256(model/version/device) order, so the choice is stable and
spread).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from edge_agent.controlplane.database import Database, row_to
from edge_agent.controlplane.registry.devices import device_group, device_groups
from edge_agent.controlplane.registry.releases import release_exists
from edge_agent.controlplane.registry.tasks import takes_part_in_task_of
from edge_agent.errors import FailedPrecondition, InvalidArgument, NotFound

FLEET, GROUP, CANARY = "fleet", "group", "canary"
ACTIVE, PAUSED, ROLLED_BACK = "active", "paused", "rolled_back"
# Shown, never stored: active or paused, but newer rollouts decide every device it reaches.
SUPERSEDED = "superseded"
PENDING = "pending"  # a device of a rollout that has reported nothing about its version yet

_COLUMNS = (
    "r.id, r.model, r.version, r.scope, r.grp, r.canary_percent, r.state, r.reason, "
    "r.analysis, r.verdict, r.stage, r.stage_started"
)


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
    # A canary's analysis (controlplane/canary.py Analysis as JSON), its latest verdict, and
    # its stage (an index into the analysis' stages) with when that stage began.
    analysis: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    verdict: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    stage: int = 0
    stage_started: float = 0.0


@dataclasses.dataclass(frozen=True)
class Membership:
    """What decides which rollouts reach one device: its group and the canary cohorts it was
    drawn into (rollout ids)."""

    group: str
    cohorts: frozenset[int] = frozenset()

    def reached_by(self, rollout: Rollout) -> bool:
        if rollout.scope == FLEET:
            return True
        if rollout.scope == GROUP:
            return rollout.group == self.group
        return rollout.id in self.cohorts


def decide(
    rollouts: Iterable[Rollout], device: Membership, serving: Mapping[str, int]
) -> dict[str, Rollout]:
    """model -> the rollout that decides the device's version of it (the module's rule).
    `rollouts` oldest first; `serving`: the version the device serves of each model."""
    deciding: dict[str, Rollout] = {}
    for rollout in rollouts:
        if rollout.state == ROLLED_BACK or not device.reached_by(rollout):
            continue
        if rollout.state == PAUSED and serving.get(rollout.model) != rollout.version:
            continue  # a paused rollout reaches no one new
        deciding[rollout.model] = rollout  # a newer one overrides
    return deciding


def revision(desired: Mapping[str, int], learning: Iterable[object] = ()) -> str:
    """Changes whenever a device's desired state does: its versions, or its learning rounds."""
    text = json.dumps([sorted(desired.items()), sorted(map(str, learning))])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def canary_cohort(model: str, version: int, devices: list[str], percent: float) -> list[str]:
    def rank(device: str) -> str:
        return hashlib.sha256(f"{model}/{version}/{device}".encode()).hexdigest()

    count = math.ceil(len(devices) * percent / 100)
    return sorted(sorted(devices, key=rank)[:count])


@dataclasses.dataclass(frozen=True)
class _Fleet:
    """What the fleet reports, read once for a view of every rollout."""

    members: dict[str, Membership]  # every enrolled device
    # (device, model) -> (serving version, target version, state)
    reports: dict[tuple[str, str], tuple[int, int, str]]
    failures: set[tuple[str, str, int]]  # (device, model, version) that failed to install

    def counted(self, rollout: Rollout, devices: list[str], superseded: bool) -> Rollout:
        """`rollout` with the devices it reaches and how many are in each state."""
        counts: dict[str, int] = {}
        for device in devices:  # how many of its devices are in each state for its version
            serving, target, status = self.reports.get((device, rollout.model), (0, 0, PENDING))
            if target != rollout.version:
                status = "serving" if serving == rollout.version else PENDING
            counts[status] = counts.get(status, 0) + 1
        return dataclasses.replace(
            rollout,
            state=SUPERSEDED if superseded else rollout.state,
            devices=tuple(devices),
            # Devices that failed to install this version (and have not installed it since).
            failed=sum(1 for d in devices if (d, rollout.model, rollout.version) in self.failures),
            device_states=counts,
        )


class RolloutRecords:
    _db: Database  # the registry's database (SqlRegistry)

    def set_target(
        self,
        model: str,
        version: int,
        scope: str,
        group: str,
        canary_percent: float,
        analysis: Mapping[str, Any] | None = None,
    ) -> Rollout:
        if not release_exists(self._db, model, version):
            raise NotFound(f"no release {model} v{version}")
        if scope == GROUP and not group:
            raise InvalidArgument("a group target needs a group")
        if scope == CANARY and not 0 < canary_percent <= 100:
            raise InvalidArgument(f"canary percent must lie in (0, 100], got {canary_percent}")
        if scope not in (FLEET, GROUP, CANARY):
            raise InvalidArgument(f"unknown target scope {scope!r}")
        with self._db.transaction(decision=True):
            now = time.time()
            row = self._db.execute(
                "INSERT INTO rollouts (model, version, scope, grp, canary_percent, state, created, "
                "analysis, stage_started) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (model, version, scope, group, canary_percent, ACTIVE, now,
                 json.dumps(dict(analysis or {})), now),
            ).first()  # fmt: skip
            rollout_id = int(row["id"]) if row else 0
            if scope == CANARY:
                cohort = self.reach(CANARY, "", canary_percent, model, version)
                self._db.executemany(
                    "INSERT INTO cohorts VALUES (?, ?)", [(rollout_id, d) for d in cohort]
                )
        return self._rollout(rollout_id)

    def control(self, model: str, action: str) -> Rollout:
        """pause / resume / rollback the newest rollout of `model` that is not rolled back."""
        row = self._db.execute(
            "SELECT id, state FROM rollouts WHERE model = ? AND state != ? ORDER BY id DESC",
            (model, ROLLED_BACK),
        ).first()
        if row is None:
            raise NotFound(f"no rollout of model {model!r} to {action}")
        rollout_id, state = int(row["id"]), str(row["state"])
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

    def _rollout(self, rollout_id: int) -> Rollout:
        return next(r for r in self.rollouts() if r.id == rollout_id)

    def _stored_rollouts(self, where: str = "", args: tuple[object, ...] = ()) -> list[Rollout]:
        """Rollouts as the table holds them, oldest first: whom they reach not counted yet."""
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM rollouts r {where} ORDER BY r.id", args)
        return [
            row_to(
                Rollout, row, group=row["grp"], devices=(), failed=0,
                analysis=json.loads(row["analysis"] or "{}"),
                verdict=json.loads(row["verdict"] or "{}"),
            )
            for row in rows.all()
        ]  # fmt: skip

    def _fleet(self) -> _Fleet:
        cohorts: dict[str, set[int]] = {}
        for row in self._db.execute("SELECT rollout_id, device_id FROM cohorts").all():
            cohorts.setdefault(str(row["device_id"]), set()).add(int(row["rollout_id"]))
        members = {
            device: Membership(group, frozenset(cohorts.get(device, ())))
            for device, group in device_groups(self._db).items()
        }
        reports = self._db.execute(
            "SELECT device_id, model, serving_version, target_version, state FROM reports"
        ).all()
        failures = self._db.execute("SELECT device_id, model, version FROM install_failures")
        return _Fleet(
            members=members,
            reports={
                (str(r["device_id"]), str(r["model"])): (
                    int(r["serving_version"]),
                    int(r["target_version"]),
                    str(r["state"]),
                )
                for r in reports
            },
            failures={
                (str(r["device_id"]), str(r["model"]), int(r["version"])) for r in failures.all()
            },
        )

    def rollouts(self) -> list[Rollout]:
        """Every rollout with the devices it reaches and their states: a handful of queries
        (every table read once), then O(devices x rollouts) work in memory."""
        stored = self._stored_rollouts()
        fleet = self._fleet()
        everyone = sorted(fleet.members)
        serving: dict[str, dict[str, int]] = {device: {} for device in everyone}
        for (device, model), (version, _, _) in fleet.reports.items():
            serving.setdefault(device, {})[model] = version
        deciding = {
            rollout.id
            for device in everyone
            for rollout in decide(stored, fleet.members[device], serving[device]).values()
        }
        newest = {r.model: r.id for r in stored if r.state != ROLLED_BACK}
        return [
            fleet.counted(
                rollout,
                [d for d in everyone if fleet.members[d].reached_by(rollout)],
                superseded=rollout.state != ROLLED_BACK
                and rollout.id not in deciding
                and newest[rollout.model] != rollout.id,
            )
            for rollout in stored
        ]

    def _membership(self, device_id: str, rollouts: list[Rollout]) -> Membership | None:
        """One device's membership as far as `rollouts` go (None: not enrolled): its group, and
        which of their canary cohorts it is in, looked up by the cohorts' key (a scan of every
        cohort would cost each fetch a pass over the table)."""
        group = device_group(self._db, device_id)
        if group is None:
            return None
        canaries = [r.id for r in rollouts if r.scope == CANARY]
        if not canaries:
            return Membership(group)
        rows = self._db.execute(
            "SELECT rollout_id FROM cohorts WHERE device_id = ? AND rollout_id IN "
            f"({', '.join('?' * len(canaries))})",
            (device_id, *canaries),
        ).all()
        return Membership(group, frozenset(int(r["rollout_id"]) for r in rows))

    def desired(self, device_id: str) -> dict[str, int]:
        """model -> version for one device. Costs O(rollouts), not O(devices): every waiting
        long-poll asks this when a change reaches it."""
        stored = self._stored_rollouts("WHERE r.state != ?", (ROLLED_BACK,))
        device = self._membership(device_id, stored)
        if device is None:
            return {}
        rows = self._db.execute(
            "SELECT model, serving_version FROM reports WHERE device_id = ?", (device_id,)
        ).all()
        serving = {str(r["model"]): int(r["serving_version"]) for r in rows}
        return {model: r.version for model, r in decide(stored, device, serving).items()}

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

    def judge_canaries(
        self, now: float, decide_one: Callable[[Rollout, int], tuple[str, dict[str, Any]]]
    ) -> list[tuple[Rollout, str]]:
        """Judge every active canary under the decision lock (replicas judge once):
        `decide_one(rollout, baseline_version)` says what to do (keep, promote, roll_back) and
        the verdict to store. Returns the rollouts acted on and the action."""
        acted: list[tuple[Rollout, str]] = []
        with self._db.transaction(decision=True):
            stored = self._stored_rollouts()
            for rollout in stored:
                # Canaries, and a canary promoted to the whole fleet until its last verdict.
                if not rollout.analysis or rollout.state != ACTIVE:
                    continue
                # The version the rest of the fleet was left on: the newest earlier rollout of
                # the model that still stands.
                baseline = next(
                    (r.version for r in reversed(stored) if r.model == rollout.model
                     and r.id < rollout.id and r.state != ROLLED_BACK
                     and r.version != rollout.version),
                    0,
                )  # fmt: skip
                action, verdict = decide_one(rollout, baseline)
                if action == "skip":
                    continue
                # Only while it is active: a publisher's pause or rollback meanwhile stands.
                changed = self._db.execute(
                    "UPDATE rollouts SET verdict = ? WHERE id = ? AND state = ?",
                    (json.dumps(verdict), rollout.id, ACTIVE),
                ).rowcount
                if not changed:
                    continue
                if action == "roll_back":
                    self._db.execute(
                        "UPDATE rollouts SET state = ?, reason = ? WHERE id = ?",
                        (ROLLED_BACK, f"canary regressed: {verdict.get('reason', '')}", rollout.id),
                    )
                elif action == "promote":
                    self._promote(rollout, now)
                if action != "keep":
                    acted.append((rollout, action))
        return [(self._rollout(r.id), action) for r, action in acted]

    def _promote(self, rollout: Rollout, now: float) -> None:
        """The canary's next stage: its cohort grows to the stage's share (the same rank order,
        so the devices already in it stay)."""
        stages = list(rollout.analysis.get("stages", ()))
        percent = float(stages[rollout.stage + 1])
        cohort = set(self.reach(CANARY, "", percent, rollout.model, rollout.version))
        have = {
            str(r["device_id"])
            for r in self._db.execute(
                "SELECT device_id FROM cohorts WHERE rollout_id = ?", (rollout.id,)
            ).all()
        }
        self._db.executemany(
            "INSERT INTO cohorts VALUES (?, ?)", [(rollout.id, d) for d in sorted(cohort - have)]
        )
        self._db.execute(
            "UPDATE rollouts SET canary_percent = ?, stage = ?, stage_started = ? WHERE id = ?",
            (percent, rollout.stage + 1, now, rollout.id),
        )
        if percent >= 100:  # the whole fleet, devices enrolled later included
            self._db.execute("UPDATE rollouts SET scope = ? WHERE id = ?", (FLEET, rollout.id))

    def reach(
        self, scope: str, group: str, canary_percent: float, model: str, version: int
    ) -> list[str]:
        """The devices a target with this scope would reach now (set_target draws a canary's
        cohort here)."""
        groups = device_groups(self._db)
        if scope == CANARY:
            return canary_cohort(model, version, sorted(groups), canary_percent)
        target = Rollout(0, model, version, scope, group, canary_percent, ACTIVE, "", (), 0)
        return [d for d in sorted(groups) if Membership(groups[d]).reached_by(target)]

    # -- what a device may read: what a rollout sent it, whatever the rollout's state now -------

    def may_fetch_release(self, device_id: str, model: str, version: int) -> bool:
        sent = self._stored_rollouts("WHERE r.model = ? AND r.version = ?", (model, version))
        device = self._membership(device_id, sent)
        return device is not None and any(device.reached_by(r) for r in sent)

    def may_fetch_blob(self, device_id: str, digest: str) -> bool:
        sent = self._stored_rollouts(
            "JOIN release_blobs b ON r.model = b.model AND r.version = b.version "
            "WHERE b.digest = ?",
            (digest,),
        )
        device = self._membership(device_id, sent)
        if device is None:
            return False
        return any(device.reached_by(r) for r in sent) or takes_part_in_task_of(
            self._db, device_id, digest
        )
