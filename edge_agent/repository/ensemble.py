"""Ensembles: Triton's `platform: "ensemble"`, a pipeline of other models of the repository.

    ensemble_scheduling { step [
      { model_name: "pre"  model_version: -1  input_map { key: "RAW" value: "IMAGE" }
                                              output_map { key: "TENSOR" value: "pre_out" } },
      { model_name: "cls"  model_version: -1  input_map { key: "x" value: "pre_out" }
                                              output_map { key: "y" value: "SCORES" } } ] }

A step's `input_map` maps the step model's input to an ensemble tensor, its `output_map` the
step model's output to the ensemble tensor it becomes (Triton's model_config.proto). The
ensemble's own inputs and outputs are ensemble tensors too. `model_version: -1` (or 0) runs the
newest ready version of the step model, looked up per request, so a hot swap of a step model
under ensemble traffic is the step model's own swap.

At load (`build_ensemble`, on the event loop: it reads the serving table) the graph is checked:
every step model loaded, every mapped name one of its tensors with the same datatype as the
tensor it connects to, every ensemble tensor produced once, every step input produced by
something, no cycle, every ensemble output produced, the batch dimension agreed. A fault makes
the ensemble's version unavailable with a reason naming it; its step models serve on.

A request: the ensemble's inputs (decoded and checked against the ensemble's config by the data
plane, like any request) -> each step as soon as all of its inputs exist, independent steps
concurrently, each through its own model's scheduler (so steps batch with every other request
for that model) -> intermediate tensors stay numpy arrays in this process -> the ensemble's
outputs encoded once. A step's error answers the request as it is (its status kept).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent._proto import model_config_pb2 as mc
from edge_agent.errors import InvalidArgument, ModelLoadError, Retiring, Unavailable
from edge_agent.repository import config as cfg
from edge_agent.repository.registry import ModelRegistry
from edge_agent.repository.scan import model_dirs
from edge_agent.repository.version import ModelVersion
from edge_agent.scheduling.policy import SchedulerPolicy
from edge_agent.scheduling.scheduler import Job, OnQueued, submit_to_loop
from edge_agent.scheduling.stats import CANCELED, ModelStats, failure_kind
from edge_agent.settings import Settings

PROVIDER = "ensemble"  # what an ensemble reports as its execution provider (its steps have theirs)


@dataclasses.dataclass(frozen=True)
class Step:
    index: int  # its place in ensemble_scheduling, for messages (from 1)
    model: str
    version: str  # "" = the newest ready version (Triton's -1)
    inputs: Mapping[str, str]  # step model input -> ensemble tensor
    outputs: Mapping[str, str]  # step model output -> ensemble tensor

    def __str__(self) -> str:
        return f"step {self.index} (model '{self.model}')"


@dataclasses.dataclass(frozen=True)
class Signature:
    """What the check needs of a step model: its inputs, outputs and max_batch_size."""

    inputs: Mapping[str, cfg.TensorSpec]
    outputs: Mapping[str, cfg.TensorSpec]
    max_batch_size: int


def is_ensemble(config: mc.ModelConfig) -> bool:
    return config.platform == cfg.ENSEMBLE_PLATFORM


def steps_of(config: mc.ModelConfig) -> list[Step]:
    """The steps as written; raises ModelLoadError for one that names nothing."""
    steps = []
    for index, step in enumerate(config.ensemble_scheduling.step, 1):
        if not step.model_name:
            raise ModelLoadError(f"ensemble step {index} has no model_name")
        if step.model_version < -1:
            raise ModelLoadError(
                f"ensemble step {index}: model_version {step.model_version} (a version, or -1)"
            )
        version = str(step.model_version) if step.model_version > 0 else ""
        steps.append(
            Step(index, step.model_name, version, dict(step.input_map), dict(step.output_map))
        )
    if not steps:
        raise ModelLoadError("ensemble_scheduling has no step")
    return steps


def step_models(config: mc.ModelConfig) -> set[str]:
    """The models an ensemble's config names (empty for any other model, or one unreadable)."""
    return {step.model_name for step in config.ensemble_scheduling.step if step.model_name}


def ensemble_names(repository: Path) -> list[str]:
    """The repository's ensembles, by their config.pbtxt (one that cannot be read is none)."""
    return [name for name, config in _configs(repository) if is_ensemble(config)]


def ensembles_using(repository: Path, model: str) -> list[str]:
    """The repository's ensembles with a step that runs `model`."""
    return [
        name
        for name, config in _configs(repository)
        if is_ensemble(config) and model in step_models(config)
    ]


def _configs(repository: Path) -> Iterator[tuple[str, mc.ModelConfig]]:
    for name, directory in model_dirs(repository).items():
        try:
            yield name, cfg.read_config(directory)[0]
        except ModelLoadError:
            continue


def check_graph(
    config: mc.ModelConfig, steps: list[Step], signatures: Mapping[str, Signature | str]
) -> None:
    """Raise ModelLoadError naming the first fault of the ensemble's graph. `signatures`: per
    step model, its signature, or why it cannot serve."""
    inputs, outputs = cfg.tensor_specs(config)
    batched = config.max_batch_size > 0
    # ensemble tensor -> (datatype, full shape (batch dimension -1 included), who produces it)
    produced: dict[str, tuple[str, tuple[int, ...], str]] = {
        n: (s.datatype, _full(s, batched), "the ensemble's input") for n, s in inputs.items()
    }
    for step in steps:
        if step.model == config.name:
            raise ModelLoadError(f"{step} is the ensemble itself")
        signature = signatures[step.model]
        if isinstance(signature, str):
            raise ModelLoadError(f"{step} cannot serve: {signature}")
        _check_step(config, step, signature)
        for model_output, tensor in step.outputs.items():
            if tensor in produced:
                raise ModelLoadError(
                    f"ensemble tensor '{tensor}' is produced twice: by {produced[tensor][2]} "
                    f"and by {step}"
                )
            spec = signature.outputs[model_output]
            shape = _full(spec, signature.max_batch_size > 0)
            produced[tensor] = (spec.datatype, shape, str(step))
    for step in steps:
        signature = signatures[step.model]
        assert not isinstance(signature, str)
        for model_input, tensor in step.inputs.items():
            if tensor not in produced:
                raise ModelLoadError(
                    f"{step}: input '{model_input}' reads ensemble tensor '{tensor}', which "
                    "neither an ensemble input nor a step produces"
                )
            spec = signature.inputs[model_input]
            _connects(
                f"{step}: input '{model_input}'",
                (spec.datatype, _full(spec, signature.max_batch_size > 0)),
                tensor,
                produced[tensor],
            )
    for name, spec in outputs.items():
        if name not in produced or name in inputs:
            raise ModelLoadError(f"ensemble output '{name}' is produced by no step")
        _connects(f"ensemble output '{name}'", (spec.datatype, _full(spec, batched)), name,
                  produced[name])  # fmt: skip
    _check_acyclic(steps, set(inputs))


def _full(spec: cfg.TensorSpec, batched: bool) -> tuple[int, ...]:
    return ((-1,) if batched else ()) + tuple(spec.dims)


def _connects(
    what: str,
    wanted: tuple[str, tuple[int, ...]],
    tensor: str,
    source: tuple[str, tuple[int, ...], str],
) -> None:
    """The tensor's datatype is the one wanted and its shape can be (-1: any size)."""
    datatype, shape, producer = source
    if datatype != wanted[0]:
        raise ModelLoadError(
            f"{what} is {wanted[0]}, but ensemble tensor '{tensor}' from {producer} is {datatype}"
        )
    if len(shape) != len(wanted[1]) or any(
        a != b and -1 not in (a, b) for a, b in zip(shape, wanted[1], strict=True)
    ):
        raise ModelLoadError(
            f"{what} has shape {list(wanted[1])}, but ensemble tensor '{tensor}' from "
            f"{producer} has {list(shape)} (batch dimension as -1)"
        )


def _check_step(config: mc.ModelConfig, step: Step, signature: Signature) -> None:
    for model_input in step.inputs:
        if model_input not in signature.inputs:
            raise ModelLoadError(
                f"{step}: input_map names '{model_input}', not an input of the model "
                f"(inputs: {sorted(signature.inputs)})"
            )
    unmapped = sorted(
        n for n, s in signature.inputs.items() if n not in step.inputs and not s.optional
    )
    if unmapped:
        raise ModelLoadError(f"{step}: input_map leaves the model's inputs {unmapped} unfed")
    for model_output in step.outputs:
        if model_output not in signature.outputs:
            raise ModelLoadError(
                f"{step}: output_map names '{model_output}', not an output of the model "
                f"(outputs: {sorted(signature.outputs)})"
            )
    if not step.outputs:
        raise ModelLoadError(f"{step}: output_map is empty (the step would produce nothing)")
    # Triton's rule: a batching step takes the ensemble's batches; a step that does not batch
    # takes the whole tensors (their shapes checked above).
    batch = config.max_batch_size
    if batch > 0 and 0 < signature.max_batch_size < batch:
        raise ModelLoadError(
            f"{step}: the model's max_batch_size {signature.max_batch_size} is below the "
            f"ensemble's {batch}"
        )


def _check_acyclic(steps: list[Step], available: set[str]) -> None:
    """Every step can run once its inputs exist (Kahn's order); else the steps left wait on
    each other."""
    have, left = set(available), list(steps)
    while left:
        runnable = [s for s in left if set(s.inputs.values()) <= have]
        if not runnable:
            stuck = ", ".join(str(s) for s in left)
            raise ModelLoadError(f"the ensemble's steps form a cycle: {stuck}")
        for step in runnable:
            have.update(step.outputs.values())
            left.remove(step)


def signatures_of(registry: ModelRegistry, steps: list[Step]) -> dict[str, Signature | str]:
    """Each step model's signature as it serves now, or why it does not."""
    found: dict[str, Signature | str] = {}
    for step in steps:
        try:
            model = registry.get(step.model, step.version)
        except Exception as exc:  # NotFound, Unavailable: the reason is the message
            found[step.model] = str(exc)
            continue
        found[step.model] = Signature(model.inputs, model.outputs, model.max_batch_size)
    return found


def build_ensemble(
    name: str, version: int, config: mc.ModelConfig, registry: ModelRegistry, settings: Settings
) -> EnsembleVersion:
    """One ensemble version, once its graph checks against the step models serving now."""
    steps = steps_of(config)
    check_graph(config, steps, signatures_of(registry, steps))
    policy = cfg.scheduler_policy(config, settings)
    return EnsembleVersion(name, version, config, steps, registry, policy)


class EnsembleVersion(ModelVersion):
    """A loaded ensemble: it serves like a model version (metadata, config, statistics, ready)
    and runs through its own scheduler, which drives its steps' schedulers."""

    def __init__(
        self,
        name: str,
        version: int,
        config: mc.ModelConfig,
        steps: list[Step],
        registry: ModelRegistry,
        policy: SchedulerPolicy,
    ) -> None:
        # No sessions of its own: ModelVersion's constructor is for a model ORT runs.
        self.name, self.version, self.config = name, version, config
        self.inputs, self.outputs = cfg.tensor_specs(config)
        self.sessions = []
        self._provider = PROVIDER
        self.stats = ModelStats()
        self.variant = ""
        self.warmup_runs = 0
        self.steps = steps
        self.scheduler = EnsembleScheduler(f"{name}/{version}", steps, registry, policy, self.stats)

    @property
    def intra_op_threads(self) -> int:
        return 0

    @property
    def execution_mode(self) -> str:
        return PROVIDER

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        raise NotImplementedError("an ensemble runs through its scheduler")

    async def close(self) -> None:
        await self.scheduler.close()


class EnsembleScheduler:
    """Runs an ensemble's requests: each step queued on its model's scheduler, the steps of one
    request as their inputs appear. It holds no queue of its own (admission is the steps'); it
    counts the requests in progress so a retired version can wait for them."""

    def __init__(
        self,
        label: str,
        steps: list[Step],
        registry: ModelRegistry,
        policy: SchedulerPolicy,
        stats: ModelStats,
    ) -> None:
        self.label = label
        self._steps = steps
        self._registry = registry
        self._policy = policy
        self._stats = stats
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running = 0
        self._closed = False
        self._idle = asyncio.Event()

    @property
    def policy(self) -> SchedulerPolicy:
        return self._policy

    def pending(self) -> int:
        return 0  # the steps' queues hold its requests

    def busy(self) -> int:
        return self._running

    @property
    def started(self) -> bool:
        return self._loop is not None

    def start_on(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    @property
    def demotions(self) -> int:
        return 0

    async def infer(self, job: Job) -> Any:
        """From the event loop: run the steps, then the request's own finish (encoding)."""
        if self._closed:
            raise Retiring(f"ensemble '{self.label}' is being replaced; retry")
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._running += 1
        try:
            started = time.perf_counter_ns()
            tensors = await self._run(job)
            ran = time.perf_counter_ns()
            answer = job.finish([tensors[name] for name in job.outputs])
            # One execution per request, as Triton counts an ensemble's.
            self._stats.record_execution(
                job.rows, 1, 0, ran - started, time.perf_counter_ns() - ran
            )
            return answer
        finally:
            self._running -= 1
            if self._closed and not self._running:
                self._idle.set()

    def submit(self, job: Job, on_queued: OnQueued | None = None) -> Any:
        """From a caller's thread (the sync front end): the steps run on the event loop."""
        if self._loop is None:
            raise Retiring(f"ensemble '{self.label}' is not started yet; retry")
        return submit_to_loop(self._loop, self.infer(job), on_queued)

    async def close(self) -> None:
        """Refuse new requests; wait for those in progress (their steps finish on their own
        models' schedulers)."""
        self._closed = True
        if self._running:
            await self._idle.wait()

    async def _run(self, job: Job) -> dict[str, np.ndarray]:
        tensors: dict[str, np.ndarray] = dict(job.feeds)
        waiting = list(self._steps)
        running: dict[asyncio.Future[dict[str, np.ndarray]], Step] = {}
        task: asyncio.Future[dict[str, np.ndarray]]
        failure: BaseException | None = None
        try:
            while (waiting or running) and failure is None:
                ready = [s for s in waiting if all(t in tensors for t in s.inputs.values())]
                for step in ready:
                    waiting.remove(step)
                if len(ready) == 1 and not running:  # a chain: no task to make
                    produced = await self._step(ready[0], tensors, job)
                    tensors.update(produced)
                    continue
                for step in ready:
                    task = asyncio.ensure_future(self._step(step, tensors, job))
                    running[task] = step
                if not running:  # check_graph rules this out; never wait on nothing
                    raise ModelLoadError(f"ensemble '{self.label}': steps wait on each other")
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    del running[task]
                    error = task.exception()
                    if error is None:
                        tensors.update(task.result())
                    elif failure is None:
                        failure = error  # the first step error answers the request
            if running:  # as Triton does: the steps under way finish before the answer
                await asyncio.gather(*running, return_exceptions=True)
                running.clear()
        finally:
            for task in running:  # the request itself was cancelled
                task.cancel()
        if failure is not None:
            raise failure
        return tensors

    async def _step(
        self, step: Step, tensors: dict[str, np.ndarray], job: Job
    ) -> dict[str, np.ndarray]:
        """One step through its model's scheduler; its tensors by ensemble name. The step
        model's statistics count it as one of its requests."""
        feeds = {model_input: tensors[tensor] for model_input, tensor in step.inputs.items()}
        model = await self._registry.acquire(step.model, step.version, job.deadline)
        _check_feeds(step, model, feeds)
        # No await between acquire and queueing: a version retired meanwhile still answers.
        names = list(step.outputs)
        rows = int(next(iter(feeds.values())).shape[0]) if model.max_batch_size and feeds else 1
        started = time.monotonic_ns()
        try:
            arrays = await model.scheduler.infer(
                Job(feeds, names, rows, list, job.priority, job.deadline, job.sequence)
            )
        except Exception as exc:
            model.stats.record_failure(time.monotonic_ns() - started, *failure_kind(exc))
            raise
        except BaseException:
            model.stats.record_failure(time.monotonic_ns() - started, CANCELED, "cancelled")
            raise
        model.stats.record_success(time.monotonic_ns() - started)
        return {step.outputs[n]: array for n, array in zip(names, arrays, strict=True)}


def _check_feeds(step: Step, model: ModelVersion, feeds: Mapping[str, np.ndarray]) -> None:
    """The step model's own shape rules (the ensemble's config may be looser than a step's):
    a mismatch is the request's fault, INVALID_ARGUMENT naming the step."""
    batched = model.max_batch_size > 0
    for name, array in feeds.items():
        spec = model.inputs.get(name)
        if spec is None:
            raise Unavailable(
                f"{step}: the model serving now has no input '{name}' (its inputs changed "
                "since the ensemble loaded)"
            )
        shape = array.shape[1:] if batched else array.shape
        fits = len(shape) == len(spec.dims) and all(
            d == -1 or d == n for d, n in zip(spec.dims, shape, strict=True)
        )
        if not fits or (batched and not 0 < array.shape[0] <= model.max_batch_size):
            wanted = ([-1] if batched else []) + list(spec.dims)
            raise InvalidArgument(
                f"{step}: input '{name}' has shape {list(array.shape)}, the model takes {wanted}"
            )
