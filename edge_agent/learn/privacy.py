"""The privacy a learning task with central differential privacy has spent, by Google's
`dp-accounting` (its RDP accountant; the `privacy` extra).

Each aggregation of a DP task releases one Gaussian mechanism: every update is clipped to an L2
norm of C, at most one update per device is in a buffer, and noise of standard deviation z * C
is added to their sum (DP-FedAvg, McMahan et al. 2018), so a device's data changes the sum by
at most C. The accountant composes one `GaussianDpEvent(z)` per aggregation. No amplification
by sampling is claimed: which devices land in a buffer is decided by when they finish, not by a
random draw, so the Poisson-sampled bound would not be honest. The guarantee is per update (a
device's contribution to one aggregation); a device that contributes to T aggregations is
covered by the T-fold composition, which is what this computes.
"""

from __future__ import annotations

from edge_agent.errors import FailedPrecondition

DEFAULT_DELTA = 1e-5


def available() -> bool:
    try:
        import dp_accounting  # noqa: F401
    except ImportError:
        return False
    return True


def epsilon(noise_multiplier: float, aggregations: int, delta: float = DEFAULT_DELTA) -> float:
    """Epsilon spent (at `delta`) after `aggregations` noisy aggregations; 0 before the first."""
    if aggregations <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return float("inf")
    try:
        import dp_accounting
        from dp_accounting import rdp
    except ImportError as exc:
        raise FailedPrecondition(
            "differential privacy needs the accountant: pip install 'edge-agent[privacy]'"
        ) from exc
    accountant = rdp.RdpAccountant()
    accountant.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.GaussianDpEvent(noise_multiplier), aggregations
        )
    )
    return float(accountant.get_epsilon(delta))


def aggregations_within(
    noise_multiplier: float, max_epsilon: float, delta: float = DEFAULT_DELTA, limit: int = 100_000
) -> int:
    """How many aggregations fit in `max_epsilon` (a binary search over `epsilon`)."""
    low, high = 0, limit
    while low < high:
        middle = (low + high + 1) // 2
        if epsilon(noise_multiplier, middle, delta) <= max_epsilon:
            low = middle
        else:
            high = middle - 1
    return low
