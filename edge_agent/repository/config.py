"""Model configuration: parse config.pbtxt, complete it from the ONNX graph, check it, and derive
the runtime options. Triton's ModelConfig is the one schema (protobuf text format)."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from pathlib import Path

from google.protobuf import text_format

from edge_agent._proto import model_config_pb2 as mc
from edge_agent.common.layout import CONFIG_FILE, MODEL_FILE
from edge_agent.common.tensors import ORT_TYPES, config_type_name, protocol_datatype
from edge_agent.errors import ModelLoadError
from edge_agent.runtime.binding import IO_BINDING_MODES
from edge_agent.runtime.session import RuntimeOptions
from edge_agent.scheduling.policy import QueuePolicy, SchedulerPolicy
from edge_agent.settings import (
    ARENA_STRATEGIES,
    CUDNN_SEARCH,
    GRAPH_LEVELS,
    PROVIDERS,
    TRUE_WORDS,
    Settings,
)

PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
ENSEMBLE_PLATFORM = "ensemble"  # a pipeline of the repository's models (repository/ensemble.py)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One model input or output as the server checks it; dims exclude the batch dimension."""

    name: str
    datatype: str  # protocol datatype, e.g. "FP32"
    dims: tuple[int, ...]  # -1 = variable
    optional: bool = False


@dataclasses.dataclass(frozen=True)
class OrtTensor:
    """What ONNX Runtime reports for a graph input or output (NodeArg), reduced to plain data."""

    name: str
    type: str  # e.g. "tensor(float)"
    shape: tuple[int | None, ...]  # None = symbolic or unknown dimension


_MAX_BATCH_FIELD = re.compile(r"^\s*max_batch_size\s*:", re.MULTILINE)


def read_config(model_dir: Path) -> tuple[mc.ModelConfig, bool]:
    """config.pbtxt if present, else an empty config named after the directory.

    Returns the config and whether it set max_batch_size explicitly.
    """
    config = mc.ModelConfig()
    path = model_dir / CONFIG_FILE
    given = False
    if path.exists():
        try:
            text = path.read_text()
            text_format.Parse(text, config)
        except (text_format.ParseError, UnicodeDecodeError, OSError) as exc:
            raise ModelLoadError(f"config.pbtxt is invalid: {exc}") from exc
        given = bool(_MAX_BATCH_FIELD.search(text))
    if config.name and config.name != model_dir.name:
        raise ModelLoadError(
            f"config.pbtxt names the model {config.name!r}, but its directory is {model_dir.name!r}"
        )
    config.name = model_dir.name
    _refuse_unsupported(config)
    return config, given


def _refuse_unsupported(config: mc.ModelConfig) -> None:
    choice = config.WhichOneof("scheduling_choice")
    if config.platform == ENSEMBLE_PLATFORM:
        _refuse_unsupported_ensemble(config, choice)
    elif config.platform not in ("", PLATFORM) or config.backend not in ("", BACKEND):
        raise ModelLoadError(
            f"platform {config.platform!r} / backend {config.backend!r} is not served here "
            f"(only {PLATFORM!r} / {BACKEND!r}, or {ENSEMBLE_PLATFORM!r})"
        )
    elif choice == "ensemble_scheduling":
        raise ModelLoadError(f"ensemble_scheduling needs platform: {ENSEMBLE_PLATFORM!r}")
    if config.batch_input or config.batch_output:
        raise ModelLoadError("batch_input / batch_output are not supported")
    if config.model_transaction_policy.decoupled:
        raise ModelLoadError("decoupled models are not supported")
    if config.max_batch_size < 0:
        raise ModelLoadError(f"max_batch_size must not be negative, got {config.max_batch_size}")
    for tensor in [*config.input, *config.output]:
        if tensor.HasField("reshape"):
            raise ModelLoadError(f"tensor '{tensor.name}': reshape is not supported")
        if any(d < -1 for d in tensor.dims):
            raise ModelLoadError(f"tensor '{tensor.name}': dims {list(tensor.dims)} are invalid")
    for group in config.instance_group:
        if group.count < 0:
            raise ModelLoadError(f"instance_group count must not be negative, got {group.count}")


def _refuse_unsupported_ensemble(config: mc.ModelConfig, choice: str | None) -> None:
    """An ensemble has no graph to complete its config from: its steps, inputs and outputs
    must be written out (Triton's rules)."""
    if config.backend:
        raise ModelLoadError(f"an ensemble has no backend (backend {config.backend!r})")
    if choice != "ensemble_scheduling":
        raise ModelLoadError(f"platform {ENSEMBLE_PLATFORM!r} needs ensemble_scheduling")
    if not config.input or not config.output:
        raise ModelLoadError("an ensemble must declare its inputs and outputs")
    for tensor in [*config.input, *config.output]:
        if tensor.data_type == mc.TYPE_INVALID or not tensor.dims:
            raise ModelLoadError(f"ensemble tensor '{tensor.name}' needs data_type and dims")


def select_versions(
    config: mc.ModelConfig, available: Sequence[int]
) -> tuple[list[int], list[int]]:
    """Apply the version policy: (versions to serve, specific versions asked for but absent)."""
    policy = config.version_policy
    choice = policy.WhichOneof("policy_choice")
    ordered = sorted(available)
    if choice == "all":
        return ordered, []
    if choice == "specific":
        wanted = sorted(set(policy.specific.versions))
        return [v for v in wanted if v in available], [v for v in wanted if v not in available]
    count = policy.latest.num_versions if choice == "latest" else 1
    return ordered[-max(count, 1) :], []


def _dim(value: int | None) -> int:
    return -1 if value is None else value


def complete_config(
    config: mc.ModelConfig,
    graph_inputs: Sequence[OrtTensor],
    graph_outputs: Sequence[OrtTensor],
    default_max_batch_size: int,
    max_batch_size_given: bool,
) -> mc.ModelConfig:
    """Return a copy of `config` completed from the graph and checked against it.

    `max_batch_size_given`: config.pbtxt set max_batch_size (proto3 cannot tell an explicit 0,
    "this model does not batch", from an absent field, so read_config looks at the text).
    """
    done = mc.ModelConfig()
    done.CopyFrom(config)
    done.platform, done.backend = PLATFORM, BACKEND
    for tensor in [*graph_inputs, *graph_outputs]:
        datatype = ORT_TYPES.get(tensor.type)
        if datatype is None or datatype == "BF16":
            raise ModelLoadError(f"tensor '{tensor.name}' has unsupported type {tensor.type}")
    batchable = all(t.shape and t.shape[0] is None for t in [*graph_inputs, *graph_outputs])
    if not max_batch_size_given and not config.input and batchable:
        # Triton's autocomplete: a dynamic first dimension everywhere means the model batches,
        # and dynamically so unless the config chose a scheduler.
        done.max_batch_size = default_max_batch_size
        if done.WhichOneof("scheduling_choice") is None:
            done.dynamic_batching.SetInParent()
    if done.max_batch_size > 0 and not batchable:
        raise ModelLoadError(
            f"max_batch_size is {done.max_batch_size}, but not every input and output of the graph "
            "has a dynamic first (batch) dimension"
        )
    skip = 1 if done.max_batch_size > 0 else 0
    _merge_tensors(done.input, graph_inputs, skip, "input", all_required=True)
    _merge_tensors(done.output, graph_outputs, skip, "output", all_required=False)
    if not done.instance_group:
        done.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_AUTO)
    for group in done.instance_group:
        group.count = max(group.count, 1)
    if not done.HasField("version_policy"):
        done.version_policy.latest.num_versions = 1
    if not done.default_model_filename:
        done.default_model_filename = MODEL_FILE
    return done


def _merge_tensors(
    declared: Sequence[mc.ModelInput] | Sequence[mc.ModelOutput],
    graph: Sequence[OrtTensor],
    skip: int,
    kind: str,
    all_required: bool,
) -> None:
    by_name = {t.name: t for t in graph}
    if not declared:
        for tensor in graph:
            entry = declared.add()  # type: ignore[union-attr]
            entry.name = tensor.name
            entry.data_type = mc.DataType.Value(config_type_name(ORT_TYPES[tensor.type]))
            entry.dims.extend(_dim(d) for d in tensor.shape[skip:])
        return
    names = [t.name for t in declared]
    for entry in declared:
        found = by_name.get(entry.name)
        if found is None:
            raise ModelLoadError(f"config.pbtxt {kind} '{entry.name}' is not in the model")
        model_type = ORT_TYPES[found.type]
        if entry.data_type != mc.DataType.Value(config_type_name(model_type)):
            raise ModelLoadError(
                f"config.pbtxt {kind} '{entry.name}' is {mc.DataType.Name(entry.data_type)}, "
                f"the model has {config_type_name(model_type)}"
            )
        model_dims = [_dim(d) for d in found.shape[skip:]]
        if not entry.dims:
            entry.dims.extend(model_dims)
        elif len(entry.dims) != len(model_dims) or any(
            c != m and -1 not in (c, m) for c, m in zip(entry.dims, model_dims, strict=True)
        ):
            raise ModelLoadError(
                f"config.pbtxt {kind} '{entry.name}' dims {list(entry.dims)} do not match the "
                f"model's {model_dims}" + (" (batch dimension excluded)" if skip else "")
            )
        else:
            # Where the model fixes a dimension the config left variable, the model's value holds.
            merged = [m if c == -1 else c for c, m in zip(entry.dims, model_dims, strict=True)]
            del entry.dims[:]
            entry.dims.extend(merged)
    if all_required:
        missing = [t.name for t in graph if t.name not in names]
        if missing:
            raise ModelLoadError(f"model {kind}s {missing} are missing from config.pbtxt")


def tensor_specs(config: mc.ModelConfig) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
    def spec(t: mc.ModelInput | mc.ModelOutput) -> TensorSpec:
        datatype = protocol_datatype(mc.DataType.Name(t.data_type))
        return TensorSpec(t.name, datatype, tuple(t.dims), getattr(t, "optional", False))

    return {t.name: spec(t) for t in config.input}, {t.name: spec(t) for t in config.output}


def instance_count(config: mc.ModelConfig) -> int:
    return max(sum(int(g.count) for g in config.instance_group), 1)


def scheduler_policy(config: mc.ModelConfig, settings: Settings) -> SchedulerPolicy:
    """Triton's dynamic_batching / queue policy / instance_group fields as a SchedulerPolicy."""
    batching = config.dynamic_batching
    dynamic = config.HasField("dynamic_batching") and config.max_batch_size > 0
    preferred = tuple(batching.preferred_batch_size)
    delay_us = batching.max_queue_delay_microseconds
    if config.HasField("sequence_batching"):
        # A stateful model's requests of different sequences batch with each other, with its
        # strategy's delay (scheduling/sequences.py).
        sequences = config.sequence_batching
        dynamic = config.max_batch_size > 0
        strategy = sequences.oldest if sequences.HasField("oldest") else sequences.direct
        delay_us = strategy.max_queue_delay_microseconds
        preferred = tuple(sequences.oldest.preferred_batch_size)
    if any(not 0 < size <= config.max_batch_size for size in preferred):
        raise ModelLoadError(
            f"preferred_batch_size {list(preferred)} must lie in 1..{config.max_batch_size}"
        )

    def queue(policy: mc.ModelQueuePolicy) -> QueuePolicy:
        timeout = policy.default_timeout_microseconds
        return QueuePolicy(
            max_queue_size=policy.max_queue_size or settings.default_max_queue_size,
            default_timeout_s=timeout / 1e6 if timeout else None,
            reject_on_timeout=policy.timeout_action == mc.ModelQueuePolicy.REJECT,
        )

    default = queue(batching.default_queue_policy)
    count = batching.priority_levels
    levels: tuple[QueuePolicy, ...]
    if count == 0:
        levels, default_level = (default,), 0
    else:
        if not 1 <= batching.default_priority_level <= count:
            raise ModelLoadError(
                f"default_priority_level must lie in 1..{count} (priority_levels), "
                f"got {batching.default_priority_level}"
            )
        levels = tuple(
            queue(batching.priority_queue_policy[level])
            if level in batching.priority_queue_policy
            else default
            for level in range(1, count + 1)
        )
        default_level = batching.default_priority_level - 1
    return SchedulerPolicy(
        max_batch_size=config.max_batch_size,
        dynamic_batching=dynamic,
        max_queue_delay_s=delay_us / 1e6,
        preferred_batch_sizes=preferred,
        levels=levels,
        default_level=default_level,
        instances=instance_count(config),
    )


def inline_execution(config: mc.ModelConfig) -> bool | None:
    """The `execution_inline` parameter: true / false, or None for auto (decided by warmup)."""
    value = (_param(config, "execution_inline") or "auto").strip().lower()
    if value == "auto":
        return None
    if value in ("true", "false"):
        return value == "true"
    raise ModelLoadError(
        f"config.pbtxt parameters: execution_inline {value!r}: auto, true or false"
    )


def _param(config: mc.ModelConfig, key: str) -> str | None:
    return config.parameters[key].string_value if key in config.parameters else None


def runtime_options(settings: Settings, config: mc.ModelConfig) -> RuntimeOptions:
    """Agent defaults, overridden by the model's instance_group, optimization and parameters.

    Parameter keys (string values): execution_providers ("cuda,cpu"), strict_provider,
    intra_op_thread_count, inter_op_thread_count, graph_optimization_level, cudnn_conv_algo_search,
    gpu_mem_limit, arena_extend_strategy, use_tf32, io_binding (auto|on|off), cuda_graph. The
    *_thread_count names are Triton's ONNX backend's.
    """
    opts = RuntimeOptions(
        providers=settings.execution_providers,
        strict=settings.strict_provider,
        intra_op_threads=settings.intra_op_threads,
        inter_op_threads=settings.inter_op_threads,
        graph_optimization_level=settings.graph_optimization_level,
        cuda_device_id=settings.cuda_device_id,
        cuda_gpu_mem_limit=settings.cuda_gpu_mem_limit,
        cudnn_conv_algo_search=settings.cudnn_conv_algo_search,
        cuda_arena_extend_strategy=settings.cuda_arena_extend_strategy,
        cuda_use_tf32=settings.cuda_use_tf32,
        spinning=settings.ort_spinning,
    )
    changes = _instance_options(settings, config)
    try:  # the parameters are the most specific: they win over what the instance groups imply
        changes.update(_parameter_options(config))
    except ValueError as exc:
        raise ModelLoadError(f"config.pbtxt parameters: {exc}") from exc
    return dataclasses.replace(opts, **changes)  # type: ignore[arg-type]


def _instance_options(settings: Settings, config: mc.ModelConfig) -> dict[str, object]:
    """What instance_group (count, kind, gpus) and optimization.graph.level change."""
    changes: dict[str, object] = {}
    instances = instance_count(config)
    if settings.intra_op_threads == 0 and instances > 1:
        # Keep executions x intra-op threads within the cores: concurrent runs on one CPU
        # session would otherwise each spin a thread per core and fight for them.
        changes["intra_op_threads"] = max(1, (os.cpu_count() or 1) // instances)
    kinds = {g.kind for g in config.instance_group}
    if kinds == {mc.ModelInstanceGroup.KIND_CPU}:
        changes["providers"] = ("cpu",)
    elif kinds == {mc.ModelInstanceGroup.KIND_GPU}:
        # Triton refuses a KIND_GPU model where no GPU works; so do we.
        changes["providers"], changes["strict"] = ("cuda", "cpu"), True
    gpus = [gpu for g in config.instance_group for gpu in g.gpus]
    if gpus:
        changes["cuda_device_id"] = gpus[0]
    level = config.optimization.graph.level
    if level:
        changes["graph_optimization_level"] = "basic" if level < 0 else "extended"
    return changes


def _parameter_options(config: mc.ModelConfig) -> dict[str, object]:
    """What the config's parameters change; raises ValueError on a value that does not parse."""
    changes: dict[str, object] = {}
    if (value := _param(config, "execution_providers")) is not None:
        providers = tuple(p.strip().lower() for p in value.split(",") if p.strip())
        if not providers or any(p not in PROVIDERS for p in providers):
            raise ValueError(f"execution_providers {value!r}: use a list of {PROVIDERS}")
        changes["providers"] = providers
    if (value := _param(config, "strict_provider")) is not None:
        changes["strict"] = _is_true(value)
    if (value := _param(config, "io_binding")) is not None:
        if value.strip().lower() not in IO_BINDING_MODES:
            raise ValueError(f"io_binding {value!r}: use one of {IO_BINDING_MODES}")
        changes["io_binding"] = value.strip().lower()
    if (value := _param(config, "cuda_graph")) is not None:
        changes["cuda_graph"] = _is_true(value)
    if (value := _param(config, "use_tf32")) is not None:
        changes["cuda_use_tf32"] = _is_true(value)
    for key, field in (
        ("intra_op_thread_count", "intra_op_threads"),
        ("inter_op_thread_count", "inter_op_threads"),
        ("gpu_mem_limit", "cuda_gpu_mem_limit"),
    ):
        if (value := _param(config, key)) is not None:
            number = int(value)
            if number < 0:
                raise ValueError(f"{key} must not be negative")
            changes[field] = number
    if (value := _param(config, "graph_optimization_level")) is not None:
        if value not in GRAPH_LEVELS:
            raise ValueError(f"graph_optimization_level {value!r}: use one of {GRAPH_LEVELS}")
        changes["graph_optimization_level"] = value
    if (value := _param(config, "cudnn_conv_algo_search")) is not None:
        # Triton's ONNX backend spells these 0/1/2.
        value = {"0": "EXHAUSTIVE", "1": "HEURISTIC", "2": "DEFAULT"}.get(value, value.upper())
        if value not in CUDNN_SEARCH:
            raise ValueError(f"cudnn_conv_algo_search: use one of {CUDNN_SEARCH}")
        changes["cudnn_conv_algo_search"] = value
    if (value := _param(config, "arena_extend_strategy")) is not None:
        if value not in ARENA_STRATEGIES:
            raise ValueError("arena_extend_strategy: kNextPowerOfTwo or kSameAsRequested")
        changes["cuda_arena_extend_strategy"] = value
    return changes


def _is_true(value: str) -> bool:
    """A switch parameter: anything but a word for true is false."""
    return value.strip().lower() in TRUE_WORDS
