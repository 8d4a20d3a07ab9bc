"""Updates and global weights as bytes, and the parameter server's arithmetic. Pure numpy.

Wire format of a tensor set (an update's deltas, or a task's global weights): a 4-byte
little-endian header length, a JSON header (per tensor: name, shape, dtype "float32" or "int8",
and for int8 its scale: value = int8 * scale), then the tensors' bytes back to back (float32
little-endian, or int8). Every size is checked on decoding; nothing else is read. Updates larger
than `int8_threshold` elements travel as int8 (about a quarter of their fp32 bytes; TFF's default
threshold is 20,000 elements), smaller ones exactly as float32.

Aggregation is FedBuff (Nguyen et al. 2022): once K updates are buffered the server forms
    d = sum_i w_i * clip(delta_i) / sum_i w_i,   w_i = n_i * (1 + tau_i)^-a
where n_i is the update's example count and tau_i how many global versions passed since the one
it started from; an update older than max_staleness is dropped. clip() scales an update down to
an L2 norm of at most clip_norm over all its tensors. With trim > 0 a coordinate-wise trimmed
mean (the largest and smallest `trim` share of each coordinate dropped), or with "median" the
coordinate-wise median (FedMedian), replaces the weighted mean: no single device drags them far.
With central differential privacy (DP-FedAvg, McMahan et al. 2018) every update weighs 1 and
Gaussian noise of standard deviation z * clip_norm is added to the sum before it is divided by K.

d is a pseudo-gradient fed to a server optimizer (Reddi et al., "Adaptive Federated
Optimization", 2021; names and defaults as Flower's strategies): sgd (global += lr * d),
momentum (FedAvgM: m = beta * m + d, global += lr * m), adagrad, adam and yogi (global += lr *
m / (sqrt(v) + tau) with their own second moments v). Its state (m, v, the step count) is a
tensor set like the weights, so it is stored and restored with them, exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from collections.abc import Mapping, Sequence

import numpy as np

from edge_agent.errors import InvalidArgument

MAX_TENSORS = 4096  # in a tensor set a device sends
STATE_MAX_TENSORS = 2 * MAX_TENSORS + 1  # a server optimizer's state: two moments and a step


def encode(tensors: Mapping[str, np.ndarray], int8_threshold: int | None = None) -> bytes:
    """Tensors -> bytes; those with more than `int8_threshold` elements as int8 + scale."""
    header: list[dict[str, object]] = []
    parts: list[bytes] = []
    for name, value in tensors.items():
        value = np.ascontiguousarray(value, dtype=np.float32)
        entry: dict[str, object] = {"name": name, "shape": list(value.shape)}
        if int8_threshold is not None and value.size > int8_threshold:
            peak = float(np.max(np.abs(value))) if value.size else 0.0
            scale = peak / 127 if peak > 0 else 1.0
            parts.append(np.clip(np.rint(value / scale), -127, 127).astype(np.int8).tobytes())
            entry.update(dtype="int8", scale=scale)
        else:
            parts.append(value.astype("<f4").tobytes())
            entry["dtype"] = "float32"
        header.append(entry)
    text = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<I", len(text)) + text + b"".join(parts)


# Dimensions a tensor may have: numpy's own limit is 64 (a reshape past it raises), and no
# trainable weight comes near it.
MAX_RANK = 32


def decode(
    data: bytes, expected: Mapping[str, Sequence[int]] | None = None, limit: int = MAX_TENSORS
) -> dict[str, np.ndarray]:
    """Bytes -> float32 tensors; with `expected` (name -> shape) every name, shape and value is
    checked. Raises InvalidArgument naming the problem."""
    try:
        (length,) = struct.unpack_from("<I", data, 0)
        header = json.loads(data[4 : 4 + length])
        if not isinstance(header, list) or len(header) > limit:
            raise ValueError("the header is not a list of tensors")
    except (struct.error, ValueError, RecursionError) as exc:
        raise InvalidArgument(f"not a tensor set: {str(exc)[:200]}") from exc
    out: dict[str, np.ndarray] = {}
    offset = 4 + length
    for entry in header:
        if not isinstance(entry, dict):
            raise InvalidArgument("a tensor entry is not an object")
        name, shape, dtype = entry.get("name"), entry.get("shape"), entry.get("dtype")
        if not isinstance(name, str) or name in out:
            raise InvalidArgument(f"tensor name {name!r} is missing or repeated")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_RANK
            or not all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 31 for d in shape
            )
        ):
            raise InvalidArgument(f"tensor {name!r}: shape {shape!r} is not a list of sizes")
        count = math.prod(shape)
        if dtype == "float32":
            size = 4 * count
            value = (
                np.frombuffer(data, "<f4", count, offset) if offset + size <= len(data) else None
            )
        elif dtype == "int8":
            scale = entry.get("scale")
            if not isinstance(scale, float | int) or not math.isfinite(scale):
                raise InvalidArgument(f"tensor {name!r}: its scale is not a finite number")
            size = count
            raw = (
                np.frombuffer(data, np.int8, count, offset) if offset + size <= len(data) else None
            )
            value = None if raw is None else raw.astype(np.float32) * np.float32(scale)
        else:
            raise InvalidArgument(f"tensor {name!r} is {dtype!r}, not float32 or int8")
        if value is None:
            raise InvalidArgument(f"tensor {name!r}: the data ends before it does")
        offset += size
        value = value.reshape(shape).astype(np.float32)
        if not np.all(np.isfinite(value)):
            raise InvalidArgument(f"tensor {name!r} holds NaN or Inf")
        out[name] = value
    if offset != len(data):
        raise InvalidArgument(f"{len(data) - offset} bytes after the last tensor")
    if expected is not None:
        if set(out) != set(expected):
            raise InvalidArgument(
                f"tensors {sorted(out)[:8]} are not the task's trainable ones "
                f"{sorted(expected)[:8]}"
            )
        for name, want in expected.items():
            if tuple(out[name].shape) != tuple(want):
                raise InvalidArgument(
                    f"tensor {name!r} has shape {list(out[name].shape)}, expected {list(want)}"
                )
    return out


def norm(tensors: Mapping[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in tensors.values()))


def clip(tensors: Mapping[str, np.ndarray], max_norm: float) -> tuple[dict[str, np.ndarray], bool]:
    """Scaled down to an L2 norm of at most `max_norm` (0: no clipping); and whether it was."""
    total = norm(tensors)
    if max_norm <= 0 or total <= max_norm:
        return dict(tensors), False
    factor = max_norm / total
    return {k: (v * factor).astype(np.float32) for k, v in tensors.items()}, True


@dataclasses.dataclass(frozen=True)
class Aggregation:
    """The server's settings for one task."""

    buffer: int = 8  # K
    staleness_exponent: float = 0.5  # a
    max_staleness: int = 10
    clip_norm: float = 0.0  # 0: no clipping
    trim: float = 0.0  # trimmed-mean share cut from each side (0: weighted mean)
    aggregator: str = "mean"  # mean | median
    dp_noise_multiplier: float = 0.0  # z: noise std z * clip_norm on the sum (0: no DP)


@dataclasses.dataclass(frozen=True)
class Update:
    deltas: Mapping[str, np.ndarray]
    examples: int
    staleness: int


def staleness_weight(examples: int, staleness: int, exponent: float) -> float:
    return float(examples) * float((1.0 + staleness) ** -exponent)


def aggregate(
    updates: Sequence[Update],
    settings: Aggregation,
    rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """The pseudo-gradient d of a buffer (the server optimizer is applied by `ServerOptimizer`).
    Updates must be clipped; with DP, `rng` draws the noise (a fresh OS-seeded one if None)."""
    if not updates:
        raise ValueError("nothing to aggregate")
    names = list(updates[0].deltas)
    step: dict[str, np.ndarray] = {}
    if settings.dp_noise_multiplier > 0:
        noise = rng if rng is not None else np.random.default_rng()
        sigma = settings.dp_noise_multiplier * settings.clip_norm
        for name in names:
            total = np.sum([u.deltas[name] for u in updates], axis=0, dtype=np.float64)
            total = total + noise.normal(0.0, sigma, size=total.shape)
            # Divided by K, a public constant, also when max_wait took fewer: a count that
            # depends on who sent is not the mechanism the accountant analyses.
            step[name] = total / max(settings.buffer, len(updates))
    elif settings.aggregator == "median":
        for name in names:
            step[name] = np.median(np.stack([u.deltas[name] for u in updates]), axis=0)
    elif settings.trim > 0:
        cut = int(len(updates) * settings.trim)
        for name in names:
            stacked = np.sort(np.stack([u.deltas[name] for u in updates]), axis=0)
            kept = stacked[cut : len(updates) - cut] if len(updates) - 2 * cut > 0 else stacked
            step[name] = kept.mean(axis=0)
    else:
        weights = [
            staleness_weight(u.examples, u.staleness, settings.staleness_exponent) for u in updates
        ]
        total_weight = sum(weights) or 1.0
        for name in names:
            weighted = sum(
                (w * u.deltas[name] for w, u in zip(weights, updates, strict=True)),
                np.zeros_like(updates[0].deltas[name]),
            )
            step[name] = weighted / total_weight
    return {k: v.astype(np.float32) for k, v in step.items()}


SERVER_OPTIMIZERS = ("sgd", "momentum", "adagrad", "adam", "yogi")
STEP = "step"  # the optimizer state's step count (one element), beside m/NAME and v/NAME


@dataclasses.dataclass(frozen=True)
class ServerOptimizer:
    """The server's optimizer over the global weights, fed the aggregate as a pseudo-gradient.
    Pure: `apply` returns the new weights and the new state, and changes neither argument."""

    name: str = "momentum"
    lr: float = 1.0
    momentum: float = 0.9  # momentum's beta
    beta1: float = 0.9  # adam, yogi
    beta2: float = 0.99
    tau: float = 1e-3  # adaptive ones: added to sqrt(v)

    def __post_init__(self) -> None:
        if self.name not in SERVER_OPTIMIZERS:
            raise InvalidArgument(
                f"server optimizer {self.name!r}: use one of {', '.join(SERVER_OPTIMIZERS)}"
            )
        if not self.lr > 0 or not 0 <= self.momentum < 1 or not self.tau > 0:
            raise InvalidArgument("server lr and tau must be positive, momentum in [0, 1)")
        if not 0 <= self.beta1 < 1 or not 0 <= self.beta2 < 1:
            raise InvalidArgument("server betas must lie in [0, 1)")

    def apply(
        self,
        weights: Mapping[str, np.ndarray],
        pseudo_gradient: Mapping[str, np.ndarray],
        state: Mapping[str, np.ndarray],
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(new weights, new state). An empty state is the optimizer's start (zeros)."""
        step = int(state[STEP].reshape(-1)[0]) + 1 if STEP in state else 1
        out: dict[str, np.ndarray] = {}
        new_state: dict[str, np.ndarray] = {STEP: np.array([step], dtype=np.float32)}
        for name, value in weights.items():
            d = np.asarray(pseudo_gradient[name], dtype=np.float64)
            m = np.asarray(state.get(f"m/{name}", np.zeros_like(d)), dtype=np.float64)
            v = np.asarray(state.get(f"v/{name}", np.zeros_like(d)), dtype=np.float64)
            if self.name == "sgd":
                move = d
            elif self.name == "momentum":
                m = self.momentum * m + d
                move = m
            elif self.name == "adagrad":
                v = v + d * d
                move = d / (np.sqrt(v) + self.tau)
            else:  # adam, yogi: first moment as Adam's; yogi's additive second moment
                m = self.beta1 * m + (1 - self.beta1) * d
                if self.name == "adam":
                    v = self.beta2 * v + (1 - self.beta2) * d * d
                else:
                    v = v - (1 - self.beta2) * d * d * np.sign(v - d * d)
                move = m / (np.sqrt(v) + self.tau)
            out[name] = (value + self.lr * move).astype(np.float32)
            if self.name in ("momentum", "adam", "yogi"):
                new_state[f"m/{name}"] = m.astype(np.float32)
            if self.name in ("adagrad", "adam", "yogi"):
                new_state[f"v/{name}"] = v.astype(np.float32)
        return out, new_state
