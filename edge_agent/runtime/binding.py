"""How one session executes: `session.run`, IOBinding, or IOBinding replaying CUDA graphs.

- IOBinding (`io_binding`: auto = on with the CUDA provider): each input is copied to the device
  once per batch, from the collated host array, and outputs are bound to host memory so ONNX
  Runtime writes them there directly (no device allocation handed back, no second copy).
- CUDA graphs (`cuda_graph: true`, CUDA provider only, ONNX Runtime's `enable_cuda_graph`):
  one graph per input shape set (in practice: per batch size), captured on its first runs
  (warmup runs every batch size, so serving replays), each with its own device buffers at fixed
  addresses (ONNX Runtime's rule for a replay); a request's inputs are copied into them and the
  outputs read back. At most MAX_GRAPHS shapes get a graph; the others run with IOBinding.

The plain path (`session.run`) stays the default on CPU, where IOBinding buys nothing.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

from edge_agent.observability.logging import get_logger

log = get_logger(__name__)

MAX_GRAPHS = 128  # captured shape sets per session (a batch size each, in practice)
IO_BINDING_MODES = ("auto", "on", "off")


@dataclasses.dataclass
class _Graph:
    graph_id: int
    inputs: dict[str, Any]  # name -> OrtValue on the device, fixed address
    outputs: list[Any]  # OrtValues on the device, in the order of `names`
    names: tuple[str, ...]
    binding: Any
    options: Any


class Runner:
    """Runs one session (used by one thread at a time: the scheduler's instance discipline)."""

    def __init__(
        self,
        session: ort.InferenceSession,
        provider: str,
        device_id: int = 0,
        io_binding: bool = False,
        cuda_graph: bool = False,
    ) -> None:
        self.session = session
        self.device = "cuda" if provider == "cuda" else "cpu"
        self.device_id = device_id if provider == "cuda" else 0
        self.io_binding = io_binding or cuda_graph
        self.cuda_graph = cuda_graph and provider == "cuda"
        self._graphs: dict[tuple[Any, ...], _Graph] = {}
        self._lock = threading.Lock()  # graph table only; runs are one at a time anyway

    @property
    def mode(self) -> str:
        return "cuda_graph" if self.cuda_graph else "io_binding" if self.io_binding else "run"

    def run(self, outputs: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.cuda_graph:
            graph = self._graph(outputs, feeds)
            if graph is not None:
                for name, array in feeds.items():
                    graph.inputs[name].update_inplace(np.ascontiguousarray(array))
                self.session.run_with_iobinding(graph.binding, graph.options)
                return [value.numpy() for value in graph.outputs]
        if self.io_binding:
            return self._bound(outputs, feeds)
        result: list[np.ndarray] = self.session.run(list(outputs), feeds)
        return result

    def _bound(self, outputs: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name in outputs:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        result: list[np.ndarray] = binding.copy_outputs_to_cpu()
        return result

    def _graph(self, outputs: Sequence[str], feeds: dict[str, np.ndarray]) -> _Graph | None:
        key = (
            tuple(sorted((n, a.shape, a.dtype.str) for n, a in feeds.items())),
            tuple(outputs),
        )
        with self._lock:
            graph = self._graphs.get(key)
            if graph is not None or len(self._graphs) >= MAX_GRAPHS:
                return graph
            graph_id = len(self._graphs) + 1  # ids from 1: 0 is ONNX Runtime's own
        # The output shapes, from one ordinary bound run (outputs on the device).
        probe = self.session.io_binding()
        for name, array in feeds.items():
            probe.bind_cpu_input(name, np.ascontiguousarray(array))
        for name in outputs:
            probe.bind_output(name, self.device, self.device_id)
        no_graph = ort.RunOptions()
        no_graph.add_run_config_entry("gpu_graph_id", "-1")  # this run is not captured
        self.session.run_with_iobinding(probe, no_graph)
        shaped = probe.get_outputs()
        inputs = {
            name: ort.OrtValue.ortvalue_from_numpy(
                np.ascontiguousarray(array), self.device, self.device_id
            )
            for name, array in feeds.items()
        }
        values = [
            ort.OrtValue.ortvalue_from_shape_and_type(
                value.shape(), _numpy_type(value.data_type()), self.device, self.device_id
            )
            for value in shaped
        ]
        binding = self.session.io_binding()
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, value)
        for name, value in zip(outputs, values, strict=True):
            binding.bind_ortvalue_output(name, value)
        options = ort.RunOptions()
        options.add_run_config_entry("gpu_graph_id", str(graph_id))
        graph = _Graph(graph_id, inputs, values, tuple(outputs), binding, options)
        with self._lock:
            self._graphs[key] = graph
        log.debug("runtime.cuda_graph", graph_id=graph_id, shapes=str(key[0]))
        return graph


_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}


def _numpy_type(ort_type: str) -> Any:
    return _ORT_TYPES[ort_type]


def choose_io_binding(mode: str, provider: str, has_strings: bool) -> bool:
    """`io_binding` auto|on|off -> used? Auto: with the CUDA provider. Never for string tensors
    (IOBinding has no device representation for them)."""
    if has_strings:
        return False
    if mode == "auto":
        return provider == "cuda"
    return mode == "on"
