"""A stateful model's config (Triton's `sequence_batching` with implicit `state`) as the sequence
batcher's policy (scheduling/sequences.py), checked against the graph at load:

    sequence_batching {
      max_sequence_idle_microseconds: 5000000
      oldest { max_queue_delay_microseconds: 1000 }     # or direct { }
      control_input [ { name: "START" control [ { kind: CONTROL_SEQUENCE_START
                                                  int32_false_true: [ 0, 1 ] } ] } ]
      state [ { input_name: "h_in" output_name: "h_out" data_type: TYPE_FP32 dims: [ 64 ]
                initial_state [ { name: "zeros" data_type: TYPE_FP32 dims: [ 64 ]
                                  zero_data: true } ] } ]
    }

The state inputs and outputs and the control inputs are the agent's to feed and keep: they are
built and warmed as graph tensors like any other, then left out of the config and metadata the
version serves (as Triton does), so a client neither sends nor receives them.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import numpy as np

from edge_agent._proto import model_config_pb2 as mc
from edge_agent.common.tensors import (
    NUMPY_DTYPES,
    ORT_TYPES,
    config_type_name,
    protocol_datatype,
)
from edge_agent.errors import ModelLoadError
from edge_agent.repository.config import OrtTensor, TensorSpec, tensor_specs
from edge_agent.scheduling.sequences import (
    CORRID,
    DEFAULT_IDLE_S,
    DEFAULT_MAX_SEQUENCES,
    DEFAULT_MAX_STATE_BYTES,
    END,
    READY,
    START,
    ControlSpec,
    SequencePolicy,
    StateSpec,
)

INITIAL_STATE_DIR = "initial_state"  # Triton's: initial_state data files, beside config.pbtxt
_KINDS = {
    mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_START: START,
    mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_END: END,
    mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_READY: READY,
    mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_CORRID: CORRID,
}


def is_stateful(config: mc.ModelConfig) -> bool:
    return bool(config.HasField("sequence_batching"))


def hidden_tensors(config: mc.ModelConfig) -> tuple[set[str], set[str]]:
    """(inputs, outputs) the agent feeds and keeps: states and controls."""
    batching = config.sequence_batching
    inputs = {s.input_name for s in batching.state} | {c.name for c in batching.control_input}
    return inputs, {s.output_name for s in batching.state}


def with_hidden_tensors(
    config: mc.ModelConfig, graph_inputs: list[OrtTensor], graph_outputs: list[OrtTensor]
) -> mc.ModelConfig:
    """`config` with its hidden tensors listed (from the graph) where it lists tensors at all,
    so that completing it against the graph finds every graph input accounted for."""
    inputs, outputs = hidden_tensors(config)
    done = mc.ModelConfig()
    done.CopyFrom(config)
    for declared, graph, names in (
        (done.input, graph_inputs, inputs),
        (done.output, graph_outputs, outputs),
    ):
        if not declared:
            continue  # completed from the graph, hidden ones included
        listed = {t.name for t in declared}
        for tensor in graph:
            if tensor.name in names and tensor.name not in listed:
                entry = declared.add()
                entry.name = tensor.name
                datatype = _graph_datatype(tensor)
                entry.data_type = mc.DataType.Value(config_type_name(datatype))
    return done


def served_config(complete: mc.ModelConfig) -> mc.ModelConfig:
    """The completed config without its hidden tensors: what the version serves."""
    inputs, outputs = hidden_tensors(complete)
    served = mc.ModelConfig()
    served.CopyFrom(complete)
    del served.input[:]
    del served.output[:]
    served.input.extend(t for t in complete.input if t.name not in inputs)
    served.output.extend(t for t in complete.output if t.name not in outputs)
    return served


def sequence_policy(complete: mc.ModelConfig, model_dir: Path) -> SequencePolicy:
    """The sequence batcher's policy from the completed config (hidden tensors still listed);
    raises ModelLoadError naming the first fault."""
    batching = complete.sequence_batching
    if batching.iterative_sequence:
        raise ModelLoadError("sequence_batching: iterative_sequence is not supported")
    if not batching.state:
        raise ModelLoadError(
            "sequence_batching without state is not supported: the agent keeps implicit state "
            "(sequence_batching { state [ ... ] })"
        )
    inputs, outputs = tensor_specs(complete)
    batched = complete.max_batch_size > 0
    states = tuple(_state(s, inputs, outputs, batched, model_dir) for s in batching.state)
    controls = tuple(_control(c, inputs, batched) for c in batching.control_input)
    names = [s.input for s in states] + [c.input for c in controls]
    if len(set(names)) != len(names):
        raise ModelLoadError("sequence_batching: an input is named by two states or controls")
    idle = batching.max_sequence_idle_microseconds
    return SequencePolicy(
        states,
        controls,
        batched,
        idle_s=idle / 1e6 if idle else DEFAULT_IDLE_S,
        max_sequences=_parameter(complete, "max_sequences", DEFAULT_MAX_SEQUENCES),
        max_state_bytes=_parameter(complete, "max_sequence_state_bytes", DEFAULT_MAX_STATE_BYTES),
    )


def _state(
    state: mc.ModelSequenceBatching.State,
    inputs: dict[str, TensorSpec],
    outputs: dict[str, TensorSpec],
    batched: bool,
    model_dir: Path,
) -> StateSpec:
    where = f"sequence_batching state '{state.input_name}'"
    if state.use_growable_memory:
        raise ModelLoadError(f"{where}: use_growable_memory is not supported")
    if state.input_name not in inputs:
        raise ModelLoadError(f"{where}: the model has no input '{state.input_name}'")
    if state.output_name not in outputs:
        raise ModelLoadError(f"{where}: the model has no output '{state.output_name}'")
    datatype = protocol_datatype(mc.DataType.Name(state.data_type))
    dims = tuple(int(d) for d in state.dims)
    for tensor in (inputs[state.input_name], outputs[state.output_name]):
        if tensor.datatype != datatype:
            raise ModelLoadError(
                f"{where}: data_type {datatype}, but the model's '{tensor.name}' is "
                f"{tensor.datatype}"
            )
        if len(tensor.dims) != len(dims) or any(
            m not in (-1, d) for m, d in zip(tensor.dims, dims, strict=True)
        ):
            raise ModelLoadError(
                f"{where}: dims {list(dims)}, but the model's '{tensor.name}' has "
                f"{list(tensor.dims)}" + (" (batch dimension excluded)" if batched else "")
            )
    if any(d < 1 for d in dims):
        raise ModelLoadError(f"{where}: dims {list(dims)} must all be fixed (>= 1)")
    if datatype == "BYTES":
        raise ModelLoadError(f"{where}: a BYTES state is not supported")
    shape = ((1,) if batched else ()) + dims
    return StateSpec(state.input_name, state.output_name, _initial(state, shape, model_dir))


def _initial(
    state: mc.ModelSequenceBatching.State, shape: tuple[int, ...], model_dir: Path
) -> np.ndarray:
    """A sequence's first state: zeros, or initial_state's data (zero_data or data_file)."""
    dtype = NUMPY_DTYPES[protocol_datatype(mc.DataType.Name(state.data_type))]
    if not state.initial_state:
        return np.zeros(shape, dtype)
    if len(state.initial_state) > 1:
        raise ModelLoadError(f"state '{state.input_name}': give one initial_state")
    initial = state.initial_state[0]
    if initial.data_type != state.data_type or list(initial.dims) != list(state.dims):
        raise ModelLoadError(
            f"state '{state.input_name}': its initial_state's data_type and dims must be the "
            "state's"
        )
    if initial.WhichOneof("state_data") != "data_file":
        return np.zeros(shape, dtype)
    name = initial.data_file
    if not name or PurePosixPath(name).name != name or name in (".", ".."):
        raise ModelLoadError(f"state '{state.input_name}': data_file {name!r} must be a file name")
    path = model_dir / INITIAL_STATE_DIR / name
    expected = int(np.prod(shape)) * dtype.itemsize
    try:
        size = path.stat().st_size
        if size != expected:
            raise ModelLoadError(
                f"state '{state.input_name}': {INITIAL_STATE_DIR}/{name} holds {size} bytes, "
                f"the state takes {expected}"
            )
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"state '{state.input_name}': {exc}") from exc
    return np.frombuffer(data, dtype).reshape(shape).copy()


def _control(
    control: mc.ModelSequenceBatching.ControlInput,
    inputs: dict[str, TensorSpec],
    batched: bool,
) -> ControlSpec:
    where = f"sequence_batching control_input '{control.name}'"
    if control.name not in inputs:
        raise ModelLoadError(f"{where}: the model has no such input")
    if len(control.control) != 1:
        raise ModelLoadError(f"{where}: give exactly one control")
    spec = inputs[control.name]
    kind = _KINDS[control.control[0].kind]
    dims = tuple(1 if d == -1 else d for d in spec.dims)
    shape = ((1,) if batched else ()) + dims
    dtype = NUMPY_DTYPES[spec.datatype] if spec.datatype != "BYTES" else np.dtype(object)
    if kind == CORRID:
        wanted = protocol_datatype(mc.DataType.Name(control.control[0].data_type))
        if wanted != spec.datatype:
            raise ModelLoadError(f"{where}: data_type {wanted}, the model takes {spec.datatype}")
        return ControlSpec(control.name, kind, dtype, shape)
    given = control.control[0]
    for values, datatype in (
        (list(given.int32_false_true), "INT32"),
        (list(given.fp32_false_true), "FP32"),
        (list(given.bool_false_true), "BOOL"),
    ):
        if values:
            if len(values) != 2 or datatype != spec.datatype:
                raise ModelLoadError(
                    f"{where}: a false/true pair for a {datatype} input (the model's is "
                    f"{spec.datatype})"
                )
            return ControlSpec(control.name, kind, dtype, shape, (values[0], values[1]))
    raise ModelLoadError(f"{where}: give its false/true values (e.g. int32_false_true)")


def _parameter(config: mc.ModelConfig, key: str, default: int) -> int:
    if key not in config.parameters:
        return default
    text = config.parameters[key].string_value.strip()
    if not text.isdigit() or int(text) < 1:
        raise ModelLoadError(f"config.pbtxt parameters: {key} {text!r}: a positive integer")
    return int(text)


def _graph_datatype(tensor: OrtTensor) -> str:
    datatype = ORT_TYPES.get(tensor.type)
    if datatype is None:
        raise ModelLoadError(f"tensor '{tensor.name}' has unsupported type {tensor.type}")
    return datatype
