"""One model version: building it (sessions, completed config, warmup, golden check) and running it.

`build_version` runs on the loader thread, off the serving path. Nothing it builds is visible to a
request until the finished version is activated, in one step (repository/swap.py), so a version
that fails to load, to warm or to pass its golden check never serves.

Warmup, before a version can serve:
- every batch size the batcher can produce (1..max_batch_size), once each, so no request pays for
  a first run at a new shape (on CUDA that is cuDNN's algorithm search);
- then Triton's `model_warmup` samples from config.pbtxt (zero_data, random_data, or
  input_data_file read from the model's `warmup/` directory), each `count` times.

Then the optional golden check (repository/golden.py).
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import time
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from edge_agent._proto import model_config_pb2 as mc
from edge_agent.common import failpoints
from edge_agent.common.layout import GOLDEN_FILE, MODEL_FILE, VARIANT_FILE, WARMUP_DIR
from edge_agent.common.onnxgraph import data_dependent_ops
from edge_agent.common.tensors import NUMPY_DTYPES, bytes_to_text, decode_raw, protocol_datatype
from edge_agent.errors import EdgeAgentError, ModelLoadError
from edge_agent.observability.logging import get_logger
from edge_agent.repository import config as cfg
from edge_agent.repository import stateful
from edge_agent.repository.golden import check_golden, read_golden
from edge_agent.runtime.external_data import validate_external_data
from edge_agent.runtime.priority import Priority
from edge_agent.runtime.session import (
    LoadedSession,
    RuntimeOptions,
    create_session,
    translate_run_error,
    warmup_feeds,
)
from edge_agent.scheduling.policy import INLINE_BUDGET_S, SchedulerPolicy
from edge_agent.scheduling.scheduler import Scheduler, VersionScheduler
from edge_agent.scheduling.sequences import SequenceScheduler
from edge_agent.scheduling.stats import ModelStats
from edge_agent.settings import Settings

log = get_logger(__name__)

# A CPU model whose largest batch runs within this per sample gets one intra-op thread instead
# of ONNX Runtime's default pool (_one_thread_enough): 20 us per sample is 50,000 samples/s on
# one thread, beyond what this Python server answers in requests on any core count.
ONE_THREAD_S_PER_SAMPLE = 20e-6
# What a version is built from besides its files: the model's config as given (before
# complete_config fills it in from the graph) and whether it sets max_batch_size.
Source = tuple[mc.ModelConfig, bool]


class ModelVersion:
    """One loaded version: its completed config, its sessions, its scheduler and statistics."""

    def __init__(
        self,
        name: str,
        version: int,
        config: mc.ModelConfig,
        sessions: list[LoadedSession],
        policy: SchedulerPolicy,
        warmup_runs: int = 0,
    ) -> None:
        self.name, self.version, self.config = name, version, config
        self.inputs, self.outputs = cfg.tensor_specs(config)
        self.sessions = sessions
        self._provider = sessions[0].provider  # kept after close() (metrics may still ask)
        # On CUDA each instance has its own session (one stream each); on CPU the instances
        # share one session, whose run() is thread-safe. A free instance always finds a session:
        # the scheduler never runs more executions than instances.
        self._free_sessions: queue.SimpleQueue[LoadedSession] = queue.SimpleQueue()
        for i in range(policy.instances):
            self._free_sessions.put(sessions[i % len(sessions)])
        self.stats = ModelStats()
        self.variant = ""  # fp32 / fp16 / int8 for a version the sync installed; "" otherwise
        self.warmup_runs = warmup_runs  # inferences run before it could serve (for the log)
        self.scheduler: VersionScheduler = Scheduler(
            f"{name}/{version}", policy, self.run, self.stats
        )

    @property
    def intra_op_threads(self) -> int:
        """ONNX Runtime's intra-op thread count of this version's sessions (0: its default, a
        thread per core), as the session reports it."""
        return int(self.sessions[0].session.get_session_options().intra_op_num_threads)

    @functools.cached_property
    def max_batch_size(self) -> int:  # read per request: a plain attribute after the first
        return int(self.config.max_batch_size)

    @property
    def provider(self) -> str:
        return self._provider

    @property
    def execution_mode(self) -> str:
        """run | io_binding | cuda_graph (runtime/binding.py)."""
        runner = self.sessions[0].runner if self.sessions else None
        return runner.mode if runner is not None else "run"

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        """One execution on a free instance's session; ORT's errors become ours."""
        failpoints.reach(failpoints.REQUEST_EXECUTING)
        loaded = self._free_sessions.get()
        try:
            result: list[np.ndarray] = loaded.run(outputs, feeds)
        except Exception as exc:
            raise translate_run_error(exc, self.name) from exc
        finally:
            self._free_sessions.put(loaded)
        return result

    async def close(self) -> None:
        """Let what was admitted finish, then release the sessions (and their memory)."""
        await self.scheduler.close()
        self.sessions = []
        self._free_sessions = queue.SimpleQueue()


def read_variant(version_dir: Path) -> str:
    """The variant a synced version directory holds (its VARIANT_FILE), "" when none."""
    try:
        text = (version_dir / VARIANT_FILE).read_text().strip()
    except OSError:
        return ""
    return text if text.isascii() and text.replace("-", "").replace("_", "").isalnum() else ""


def build_version(
    model_dir: Path,
    version: int,
    config: mc.ModelConfig,
    batch_given: bool,
    settings: Settings,
    priority: Priority | None = None,
    swapping: bool = False,
) -> ModelVersion:
    """Load, complete, warm and check one version; raises ModelLoadError with the reason.
    `priority`: the threads ONNX Runtime spawns meanwhile go back to serving priority at the end
    (runtime/priority.py). `swapping`: another version serves meanwhile, and the warmup pauses
    `swap_warmup_pause_ms` between its runs (on a GPU, serving's kernels get in between)."""
    pause = settings.swap_warmup_pause_ms / 1000 if swapping else 0.0
    if priority is None:
        return _build(model_dir, version, config, batch_given, settings, pause)
    with priority.spawned() as spawned:
        built = _build(model_dir, version, config, batch_given, settings, pause)
    priority.restore(spawned)
    return built


def _build(
    model_dir: Path,
    version: int,
    config: mc.ModelConfig,
    batch_given: bool,
    settings: Settings,
    pause: float = 0.0,
) -> ModelVersion:
    name = model_dir.name
    path, options, first = _open(model_dir, version, config, settings)
    graph_inputs, graph_outputs = (
        _tensors(first.session.get_inputs()),
        _tensors(first.session.get_outputs()),
    )
    if stateful.is_stateful(config):  # its state tensors are built and warmed, then hidden
        config = stateful.with_hidden_tensors(config, graph_inputs, graph_outputs)
    complete = cfg.complete_config(
        config, graph_inputs, graph_outputs, settings.default_max_batch_size, batch_given
    )
    policy = cfg.scheduler_policy(complete, settings)
    inputs, _ = cfg.tensor_specs(complete)
    sessions = _sessions(path, options, first, complete, inputs, policy.instances, name, version)
    largest, runs, warmed = _warm_sessions(sessions, complete, inputs, model_dir, version, pause)
    forced = cfg.inline_execution(complete)
    inline = bool(forced) if forced is not None else _inline_auto(path, inputs, warmed, largest)
    policy = dataclasses.replace(policy, inline=inline, inline_forced=forced is True)
    if not stateful.is_stateful(complete):
        built = ModelVersion(name, version, complete, sessions, policy, runs)
    else:
        sequences = stateful.sequence_policy(complete, model_dir)
        built = ModelVersion(
            name, version, stateful.served_config(complete), sessions, policy, runs
        )
        built.scheduler = SequenceScheduler(built.scheduler, sequences)
    built.variant = read_variant(model_dir / str(version))
    return built


def _open(
    model_dir: Path, version: int, config: mc.ModelConfig, settings: Settings
) -> tuple[Path, RuntimeOptions, LoadedSession]:
    """The version's graph (its external data checked), the runtime options its config and the
    settings ask for, and a first session made with them."""
    filename = config.default_model_filename or MODEL_FILE
    path = model_dir / str(version) / filename
    if not path.is_file():
        raise ModelLoadError(f"{version}/{filename} is missing")
    validate_external_data(path)
    options = cfg.runtime_options(settings, config)
    loaded = create_session(path, options)
    if loaded.fallback_reason:
        log.warning(
            "runtime.provider_fallback",
            model=model_dir.name,
            version=version,
            requested=list(options.providers),
            active=loaded.provider,
            reason=loaded.fallback_reason,
        )
    return path, options, loaded


def _sessions(
    path: Path,
    options: RuntimeOptions,
    first: LoadedSession,
    config: mc.ModelConfig,
    inputs: dict[str, cfg.TensorSpec],
    instances: int,
    name: str,
    version: int,
) -> list[LoadedSession]:
    """The sessions the version serves with: on CUDA one per instance (one stream each); on the
    CPU the first one, or one made again with one intra-op thread or a pool that sleeps, when
    the first one shows that serves better."""
    sessions = [first]
    if first.provider == "cuda":
        sessions += [create_session(path, options) for _ in range(instances - 1)]
    if _one_thread_enough(options, first, config, inputs, path):
        # ONNX Runtime's default pool (a thread per core) buys a model this cheap a few
        # microseconds per run, and its threads spin-wait after every run, taking the cores
        # that gRPC and Python need under concurrent load (docs/performance-history.md "One
        # intra-op thread and inline execution for a cheap model"). Made again with one thread,
        # before the warmup; on the CPU, which the first one runs on (a CUDA fallback or refused
        # CUDA graphs are not tried again).
        options = dataclasses.replace(
            options, intra_op_threads=1, providers=("cpu",), cuda_graph=False
        )
        sessions = [create_session(path, options)]
        log.info("model.one_intra_op_thread", model=name, version=version)
    elif _spin_off(options, first, path, inputs):
        # A run whose cost its inputs decide (a Loop, a dynamic length) may take tens of
        # milliseconds: the pool's spin-waits between and after its parallel sections buy
        # nothing at that length and take the cores the event loop needs to answer others
        # (docs/performance-history.md "Overload: refusals while the cores compute").
        options = dataclasses.replace(options, spinning=False, providers=("cpu",))
        sessions = [create_session(path, options)]
        log.info("model.spinning_off", model=name, version=version)
    return sessions


def _warm_sessions(
    sessions: list[LoadedSession],
    config: mc.ModelConfig,
    inputs: dict[str, cfg.TensorSpec],
    model_dir: Path,
    version: int,
    pause: float,
) -> tuple[float, int, bool]:
    """Warm each session (every batch size, then the model_warmup samples) and check it against
    the golden outputs. Returns the best time of the largest batch, the number of runs (counted
    for the last session), and whether the synthetic warmup ran."""
    samples = warmup_samples(config, inputs, model_dir)
    golden = read_golden(model_dir / str(version) / GOLDEN_FILE, set(inputs))
    largest, runs = 0.0, 0
    warmed = True
    for each in sessions:
        try:
            largest, runs = _warm(each, config, inputs, pause)
        except ModelLoadError as exc:
            # The synthetic warmup invents sizes (1 for every dynamic dimension), which a valid
            # model may refuse (e.g. a minimum length along a dynamic axis). Triton does not warm
            # up at all without model_warmup: serve it, say why, and never run it inline.
            warmed = False
            log.warning(
                "model.warmup_skipped",
                model=model_dir.name,
                version=version,
                reason=str(exc)[:500],
            )
        for sample_name, count, feeds in samples:
            for _ in range(count):
                _run(each, feeds, f"model_warmup '{sample_name}'")
                runs += 1
        if golden is not None:
            check_golden(each.session, *golden)
    return largest, runs, warmed


def _one_thread_enough(
    options: RuntimeOptions,
    loaded: LoadedSession,
    config: mc.ModelConfig,
    inputs: dict[str, cfg.TensorSpec],
    path: Path,
) -> bool:
    """Whether a CPU model left to ONNX Runtime's default thread count (intra_op_threads 0, not
    set by the agent's settings, the model's config or its instance count) is cheap enough for
    one intra-op thread: its largest batch (best of three runs on zeros) takes at most
    ONE_THREAD_S_PER_SAMPLE per sample, and zeros show what a real input costs (_cost_shown).
    A model the synthetic input cannot run keeps the default (the warmup that follows says
    why)."""
    if loaded.provider != "cpu" or options.intra_op_threads != 0:
        return False
    largest = max(config.max_batch_size, 1)
    budget = ONE_THREAD_S_PER_SAMPLE * largest  # for the whole largest batch
    shapes = _warmup_shapes(config, inputs)

    def best_of(runs: int, batch: int) -> float:
        feeds = warmup_feeds(shapes, batch=batch)
        best = float("inf")
        for _ in range(runs):
            started = time.perf_counter()
            _run(loaded, feeds, "probe")
            best = min(best, time.perf_counter() - started)
        return best

    try:
        # A batch of one over the whole budget rules the model out in two runs: an expensive
        # model is never run at its largest batch for this.
        if best_of(2, 1) > budget or best_of(3, largest) > budget:
            return False
    except ModelLoadError:
        return False
    return _cost_shown(path, inputs)


def _spin_off(
    options: RuntimeOptions, loaded: LoadedSession, path: Path, inputs: dict[str, cfg.TensorSpec]
) -> bool:
    """Whether a CPU model on ONNX Runtime's default pool, spinning as the settings allow, runs
    for a time its inputs decide (_cost_shown is False): such a model gets a pool that sleeps."""
    if loaded.provider != "cpu" or options.intra_op_threads != 0 or not options.spinning:
        return False
    return not _cost_shown(path, inputs)


def _inline_auto(
    path: Path, inputs: dict[str, cfg.TensorSpec], warmed: bool, largest: float
) -> bool:
    """Inline execution, decided: only a model whose warmup shows its largest batch runs
    within INLINE_BUDGET_S, and whose cost that warmup can show (_cost_shown)."""
    if not warmed or largest > INLINE_BUDGET_S:
        return False
    return _cost_shown(path, inputs)


def _cost_shown(path: Path, inputs: dict[str, cfg.TensorSpec]) -> bool:
    """Whether runs on zeros show what a real input costs: every non-batch dimension fixed (a
    dynamic one runs at size 1) and no data-dependent op (Loop, If, NMS, TopK with a runtime k,
    ...: zeros say nothing of a real input's cost)."""
    if any(d < 0 for spec in inputs.values() for d in spec.dims):
        return False
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False)
    except Exception:  # onnx raises DecodeError, OSError, ...; ORT loaded it already
        return False
    return not data_dependent_ops(graph)


def _run(loaded: LoadedSession, feeds: dict[str, np.ndarray], what: str) -> list[Any]:
    """One warmup run, the way serving runs (IOBinding, CUDA graphs: captured here)."""
    names = [o.name for o in loaded.session.get_outputs()]
    try:
        result: list[Any] = loaded.run(names, feeds)
    except Exception as exc:
        raise ModelLoadError(f"{what} failed: {exc}") from exc
    return result


def _warm(
    session: LoadedSession,
    config: mc.ModelConfig,
    inputs: dict[str, cfg.TensorSpec],
    pause: float = 0.0,
) -> tuple[float, int]:
    """One run at every batch size the batcher can produce. Returns the best of three runs of
    the largest, seconds (it decides inline execution), and the number of runs."""
    largest = max(config.max_batch_size, 1)
    shapes = _warmup_shapes(config, inputs)
    best, runs = float("inf"), 0
    for size in range(1, largest + 1):
        feeds = warmup_feeds(shapes, batch=size)
        for _ in range(3 if size == largest else 1):
            started = time.perf_counter()
            _run(session, feeds, f"warmup inference at batch size {size}")
            runs += 1
            if size == largest:
                best = min(best, time.perf_counter() - started)
            if pause:
                time.sleep(pause)
    return best, runs


def _warmup_shapes(
    config: mc.ModelConfig, inputs: dict[str, cfg.TensorSpec]
) -> dict[str, tuple[str, list[int]]]:
    """The synthetic warmup's inputs for warmup_feeds: (dtype, shape with -1 where it varies)."""
    batch = [-1] if config.max_batch_size > 0 else []
    return {
        name: (str(NUMPY_DTYPES[spec.datatype]), [*batch, *spec.dims])
        for name, spec in inputs.items()
        if not spec.optional
    }


def warmup_samples(
    config: mc.ModelConfig, inputs: dict[str, cfg.TensorSpec], model_dir: Path
) -> list[tuple[str, int, dict[str, np.ndarray]]]:
    """Triton's `model_warmup` entries as (name, count, feeds); raises ModelLoadError."""
    samples = []
    rng = np.random.default_rng(0)
    for warmup in config.model_warmup:
        label = warmup.name or "(unnamed)"
        if config.max_batch_size > 0 and not 1 <= warmup.batch_size <= config.max_batch_size:
            raise ModelLoadError(
                f"model_warmup '{label}': batch_size {warmup.batch_size} must lie in "
                f"1..{config.max_batch_size}"
            )
        feeds: dict[str, np.ndarray] = {}
        for input_name, spec in warmup.inputs.items():
            if input_name not in inputs:
                raise ModelLoadError(f"model_warmup '{label}': unknown input '{input_name}'")
            datatype = protocol_datatype(mc.DataType.Name(spec.data_type))
            if datatype != inputs[input_name].datatype:
                raise ModelLoadError(
                    f"model_warmup '{label}': input '{input_name}' is {datatype}, the model "
                    f"takes {inputs[input_name].datatype}"
                )
            dims = [int(d) for d in spec.dims]
            if any(d < 0 for d in dims):
                raise ModelLoadError(f"model_warmup '{label}': dims {dims} must be concrete")
            sample = _sample(label, input_name, datatype, dims, spec, model_dir, rng)
            if config.max_batch_size > 0:
                sample = np.repeat(sample[np.newaxis], warmup.batch_size, axis=0)
            feeds[input_name] = sample
        samples.append((label, max(int(warmup.count), 1), feeds))
    return samples


def _sample(
    label: str,
    input_name: str,
    datatype: str,
    dims: list[int],
    spec: mc.ModelWarmup.Input,
    model_dir: Path,
    rng: np.random.Generator,
) -> np.ndarray:
    choice = spec.WhichOneof("input_data_type")
    dtype = NUMPY_DTYPES[datatype]
    if choice == "input_data_file":
        relative = PurePosixPath(spec.input_data_file)
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            raise ModelLoadError(
                f"model_warmup '{label}': input_data_file {spec.input_data_file!r} must be a "
                f"plain path inside {WARMUP_DIR}/"
            )
        path = model_dir / WARMUP_DIR / relative
        if path.is_symlink() or not path.is_file():
            raise ModelLoadError(f"model_warmup '{label}': {WARMUP_DIR}/{relative} is missing")
        try:
            array = decode_raw(input_name, datatype, dims, path.read_bytes())
        except EdgeAgentError as exc:
            raise ModelLoadError(f"model_warmup '{label}': {exc}") from exc
        return bytes_to_text(input_name, array) if datatype == "BYTES" else array.copy()
    if datatype == "BYTES":
        text = "0" if choice == "random_data" else ""
        return np.full(dims, text, dtype=object)
    if choice == "random_data":
        if datatype == "BOOL":
            return rng.integers(0, 2, dims).astype(bool)
        if np.issubdtype(dtype, np.integer):
            return rng.integers(0, 100, dims).astype(dtype)
        return rng.random(dims).astype(dtype)
    return np.zeros(dims, dtype=dtype)


def _tensors(args: list[Any]) -> list[cfg.OrtTensor]:
    """ONNX Runtime's inputs or outputs (NodeArg) as complete_config takes them."""
    return [cfg.OrtTensor(a.name, a.type, _shape(a.shape)) for a in args]


def _shape(shape: Any) -> tuple[int | None, ...]:
    # ORT reports symbolic dims as strings and unknown ones as None.
    if not isinstance(shape, list | tuple):
        return ()
    return tuple(d if isinstance(d, int) and d >= 0 else None for d in shape)
