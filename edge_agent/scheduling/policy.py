"""What a model version's scheduler does, as plain data (built from the model config by
repository/config.py: Triton's dynamic_batching, queue policies and instance_group)."""

from __future__ import annotations

import collections
import dataclasses

from edge_agent.errors import InvalidArgument

# A model whose largest batch runs within this at warmup runs on the event loop
# (SchedulerPolicy.inline). 1 ms: the small CNN of the benchmark (~0.7 ms at batch 64 on one
# thread) gained 10-50% inline at concurrency 1-64 (docs/performance-history.md "One
# intra-op thread and inline execution for a cheap model"); a loop held 1 ms is far inside what
# health checks and other models' requests notice.
INLINE_BUDGET_S = 1e-3
# Demotion needs evidence, not one outlier (a page fault, a GIL handoff, a collection): this many
# inline runs over the limit among the last DEMOTE_WINDOW, or one run over CEILING x the limit.
DEMOTE_AFTER = 3
DEMOTE_WINDOW = 64
CEILING = 20
# A demoted version goes inline again after this many runs within the budget on its threads
# with none over the limit, doubled at each demotion; after MAX_DEMOTIONS it stays on threads.
PROMOTE_AFTER = 256
MAX_DEMOTIONS = 4


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
    # model's build (repository/version.py) turns this on when warmup shows the largest batch
    # runs within INLINE_BUDGET_S.
    inline: bool = False
    # Inline runs longer than this demote the version to execution threads (InlineJudge: its
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


class InlineJudge:
    """Whether a version runs inline, from the runs it makes (pure; fed on the event loop).

    Inline, each run's time is recorded: DEMOTE_AFTER runs over the limit among the last
    DEMOTE_WINDOW, or a single run over CEILING x the limit, demote it. On threads, a streak of
    PROMOTE_AFTER x 2^(demotions-1) runs within INLINE_BUDGET_S (none over the limit) promotes it
    back."""

    def __init__(self, limit_s: float, budget_s: float = INLINE_BUDGET_S) -> None:
        self.limit_s = limit_s
        self.budget_s = budget_s
        self.demotions = 0
        self.slow_runs = 0  # among the window, for the demotion's log line
        self._recent: collections.deque[bool] = collections.deque(maxlen=DEMOTE_WINDOW)
        self._cheap_streak = 0

    def inline_run(self, seconds: float) -> bool:
        """Record an inline run; True: demote now."""
        self._recent.append(seconds > self.limit_s)
        self.slow_runs = sum(self._recent)
        if seconds > CEILING * self.limit_s or self.slow_runs >= DEMOTE_AFTER:
            self.demotions += 1
            self._recent.clear()
            self._cheap_streak = 0
            return True
        return False

    def thread_run(self, seconds: float) -> bool:
        """Record a run on an execution thread of a demoted version; True: inline again."""
        if self.demotions >= MAX_DEMOTIONS:
            return False
        if seconds > self.limit_s:  # one that would have held the loop: start again
            self._cheap_streak = 0
        elif seconds <= self.budget_s:
            self._cheap_streak += 1
        if self._cheap_streak >= PROMOTE_AFTER * 2 ** max(self.demotions - 1, 0):
            self._cheap_streak = 0
            return True
        return False
