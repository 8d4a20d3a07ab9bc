"""What a model version's scheduler does, as plain data (built from the model config by
repository/config.py: Triton's dynamic_batching, queue policies and instance_group)."""

from __future__ import annotations

import dataclasses

from edge_agent.errors import InvalidArgument


@dataclasses.dataclass(frozen=True)
class QueuePolicy:
    max_queue_size: int  # requests; always bounded
    default_timeout_s: float | None = None  # queue-policy timeout, None = none
    reject_on_timeout: bool = True  # Triton's timeout_action REJECT; DELAY keeps waiting


@dataclasses.dataclass(frozen=True)
class SchedulerPolicy:
    max_batch_size: int  # 0: the model takes no batch dimension
    dynamic_batching: bool  # merge requests into batches (else one request per execution)
    max_queue_delay_s: float = 0.0
    preferred_batch_sizes: tuple[int, ...] = ()
    # levels[0] is priority 1 (the highest). A request's priority p (1..len) picks levels[p-1];
    # 0 or absent picks default_level.
    levels: tuple[QueuePolicy, ...] = (QueuePolicy(max_queue_size=1024),)
    default_level: int = 0
    instances: int = 1
    # Run executions on the event loop instead of execution threads. For a model whose run takes
    # a few microseconds the two thread handoffs per batch cost more than the run itself; the
    # registry turns this on when warmup shows the largest batch runs within INLINE_BUDGET_S.
    inline: bool = False
    # An inline run longer than this demotes the version to execution threads at once (its
    # cost depends on its inputs after all); not when the config forces inline execution.
    inline_limit_s: float = 5e-3
    inline_forced: bool = False

    def level_of(self, priority: int) -> int:
        """Queue index for a request's `priority` parameter (0 = the default level). Without
        priority levels the parameter is ignored, as Triton does."""
        if len(self.levels) == 1 or priority == 0:
            return self.default_level
        if not 1 <= priority <= len(self.levels):
            raise InvalidArgument(
                f"priority {priority} is outside 1..{len(self.levels)} (priority_levels)"
            )
        return priority - 1
