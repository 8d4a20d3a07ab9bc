"""What a learning task is asked to do: its spec with defaults filled in, the refusal of one that
cannot run (naming the field), and the settings the aggregation derives from it.

Checked once, at StartLearning; what is stored is the spec with every default applied, so a task
runs as it was started even if the defaults change later.
"""

from __future__ import annotations

import math

from edge_agent._proto import fleet_pb2 as pb
from edge_agent.controlplane.registry import CANARY, FLEET, GROUP
from edge_agent.errors import FailedPrecondition, InvalidArgument
from edge_agent.fleet.release import MAX_VERSION
from edge_agent.learn import delta, privacy
from edge_agent.learn.defaults import SERVER_LR_DEFAULTS, TASK_DEFAULTS

SCOPES = {pb.FLEET: FLEET, pb.GROUP: GROUP, pb.CANARY: CANARY}
OPTIONAL_FIELDS = {
    f.name for f in pb.LearningSpec.DESCRIPTOR.fields if f.has_presence and f.message_type is None
}  # proto3 `optional`: 0 may be meant


def spec_defaults(spec: pb.LearningSpec) -> pb.LearningSpec:
    """The spec with every unset field at its default (docs/learning.md)."""
    out = pb.LearningSpec()
    out.CopyFrom(spec)
    for key, value in TASK_DEFAULTS.items():
        # An optional field set to 0 is a choice (a strict gate); a plain one at 0 is unset.
        given = out.HasField(key) if key in OPTIONAL_FIELDS else bool(getattr(out, key))
        if not given:
            setattr(out, key, value)
    if not out.server_lr:
        out.server_lr = SERVER_LR_DEFAULTS.get(out.server_optimizer, 1.0)  # bad names: refused
    if out.scope == pb.TARGET_SCOPE_UNSPECIFIED:
        out.scope = pb.FLEET
    return out


def server_optimizer(spec: pb.LearningSpec) -> delta.ServerOptimizer:
    """The task's server optimizer (a task stored before server optimizers existed: plain SGD,
    what it ran with)."""
    return delta.ServerOptimizer(
        spec.server_optimizer or "sgd", spec.server_lr or 1.0, spec.server_momentum,
        spec.server_beta1, spec.server_beta2, spec.server_tau or 1e-3,
    )  # fmt: skip


def aggregation(spec: pb.LearningSpec) -> delta.Aggregation:
    return delta.Aggregation(
        buffer=spec.buffer, staleness_exponent=spec.staleness_exponent,
        max_staleness=spec.max_staleness, clip_norm=spec.clip_norm, trim=spec.trim,
        aggregator=spec.aggregator or "mean", dp_noise_multiplier=spec.dp_noise_multiplier,
    )  # fmt: skip


def one_per_device(spec: pb.LearningSpec) -> bool:
    """Whether an aggregation takes at most one update per device: with differential privacy (a
    device's data moves one sum by at most C) and with the robust aggregators (a device posting
    K updates would otherwise be the whole median)."""
    return spec.dp_noise_multiplier > 0 or spec.aggregator == "median" or spec.trim > 0


def check_spec(spec: pb.LearningSpec) -> None:
    """Refuse a spec (defaults applied) that cannot run, naming the field."""
    for field in pb.LearningSpec.DESCRIPTOR.fields:
        if field.type == field.TYPE_DOUBLE and not math.isfinite(getattr(spec, field.name)):
            raise InvalidArgument(f"{field.name} must be a finite number")
    if spec.scope not in SCOPES:  # proto3 keeps enum numbers it does not know
        raise InvalidArgument(f"scope {spec.scope}: use FLEET, GROUP or CANARY")
    if spec.base_version > MAX_VERSION:
        raise InvalidArgument(f"base_version {spec.base_version} is not in 0..2^63-1")
    if spec.trainable != "all" and not (
        spec.trainable.startswith("last:")
        and spec.trainable[5:].isascii()
        and spec.trainable[5:].isdigit()
    ):
        raise InvalidArgument(f"trainable {spec.trainable!r}: use all or last:N")
    if spec.optimizer not in ("sgd", "adam"):
        raise InvalidArgument(f"optimizer {spec.optimizer!r}: use sgd or adam")
    if not 0 <= spec.trim < 0.5 or spec.clip_norm < 0 or spec.server_lr <= 0:
        raise InvalidArgument("trim must lie in [0, 0.5), clip_norm >= 0, server_lr > 0")
    server_optimizer(spec)  # raises InvalidArgument naming the bad value
    if spec.aggregator not in ("mean", "median"):
        raise InvalidArgument(f"aggregator {spec.aggregator!r}: use mean or median")
    if spec.aggregator == "median" and spec.trim:
        raise InvalidArgument("aggregator median and trim: choose one")
    if spec.proximal_mu < 0 or spec.min_interval < 0 or spec.max_wait <= 0:
        raise InvalidArgument("proximal_mu and min_interval must be >= 0, max_wait > 0")
    if spec.scope == pb.GROUP and not spec.group:
        raise InvalidArgument("a group task needs a group")
    if spec.scope == pb.CANARY and not 0 < spec.canary_percent <= 100:
        raise InvalidArgument("canary percent must lie in (0, 100]")
    check_privacy(spec)


def check_privacy(spec: pb.LearningSpec) -> None:
    """Refuse differential-privacy settings that cannot run, or that allow no aggregation."""
    if spec.dp_noise_multiplier < 0 or spec.dp_max_epsilon < 0 or not 0 < spec.dp_delta < 1:
        raise InvalidArgument("dp_noise_multiplier and dp_max_epsilon >= 0, dp_delta in (0, 1)")
    if spec.dp_noise_multiplier > 0:
        if spec.clip_norm <= 0:
            raise InvalidArgument(
                "differential privacy needs clip_norm > 0: the noise is scaled to it"
            )
        if spec.aggregator != "mean" or spec.trim:
            raise InvalidArgument("differential privacy works on the mean (no median or trim)")
        if not privacy.available():
            raise FailedPrecondition(
                "differential privacy needs the accountant on the control plane: "
                "pip install 'edge-agent[privacy]'"
            )
        if spec.dp_max_epsilon and not privacy.aggregations_within(
            spec.dp_noise_multiplier, spec.dp_max_epsilon, spec.dp_delta, limit=1
        ):
            raise InvalidArgument(
                f"dp_max_epsilon {spec.dp_max_epsilon:g} allows no aggregation at noise "
                f"multiplier {spec.dp_noise_multiplier:g} (one costs epsilon "
                f"{privacy.epsilon(spec.dp_noise_multiplier, 1, spec.dp_delta):.3g})"
            )
    elif spec.dp_max_epsilon:
        raise InvalidArgument("dp_max_epsilon needs dp_noise_multiplier > 0")
