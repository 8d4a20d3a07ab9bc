"""ONNX Runtime sessions: providers, options, the honest CPU fallback, warmup.

`onnxruntime-gpu` lists CUDA in `get_available_providers()` even where no GPU works, and a session
asked for CUDA falls back to CPU silently. So after every session is built we read
`get_providers()`, log `runtime.provider_fallback` with the best reason we can determine, and in
strict mode refuse the model instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edge_agent.errors import EdgeAgentError, ExecutionError, InvalidArgument, ModelLoadError
from edge_agent.observability.logging import get_logger
from edge_agent.runtime.binding import Runner, choose_io_binding

log = get_logger(__name__)

_GRAPH_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_ORT_NAMES = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
_SHORT_NAMES = {v: k for k, v in _ORT_NAMES.items()}
_NVIDIA_DEVICE = Path("/dev/nvidiactl")


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    """Everything that shapes one model's sessions (agent defaults merged with its config)."""

    providers: tuple[str, ...] = ("cuda", "cpu")
    strict: bool = False
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    graph_optimization_level: str = "all"
    cuda_device_id: int = 0
    cuda_gpu_mem_limit: int = 0
    cudnn_conv_algo_search: str = "HEURISTIC"
    cuda_arena_extend_strategy: str = "kNextPowerOfTwo"
    cuda_use_tf32: bool = True
    spinning: bool = True  # ONNX Runtime's thread pools spin-wait between runs (its default)
    io_binding: str = "auto"  # auto (on with CUDA) | on | off: runtime/binding.py
    cuda_graph: bool = False  # ONNX Runtime's enable_cuda_graph, per batch size (CUDA only)


@dataclasses.dataclass
class LoadedSession:
    session: ort.InferenceSession
    provider: str  # the first active provider: "cuda" or "cpu"
    fallback_reason: str | None  # why CUDA was asked for and not obtained
    runner: Runner | None = None  # how it executes (IOBinding, CUDA graphs); set at creation

    def run(self, outputs: list[str] | None, feeds: dict[str, Any]) -> list[Any]:
        if self.runner is None or outputs is None:
            result: list[Any] = self.session.run(outputs, feeds)
            return result
        return self.runner.run(outputs, feeds)


def likely_provider(execution_providers: tuple[str, ...]) -> str:
    """The provider a new session will most likely get ("cuda" or "cpu"), without making one:
    the first configured provider that this build and machine offer."""
    for provider in execution_providers:
        if provider == "cpu":
            return "cpu"
        if provider == "cuda" and cuda_known_unavailable() is None:
            return "cuda"
    return "cpu"


def cuda_known_unavailable() -> str | None:
    """Why CUDA cannot work here, when that is known without trying; None when it may work.
    Where it cannot, the agent does not ask ONNX Runtime for it at all: asking prints errors
    (`Failed to load library ... libonnxruntime_providers_cuda.so`) to stderr, outside the log."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "this onnxruntime build has no CUDA provider (install onnxruntime-gpu)"
    if not _NVIDIA_DEVICE.exists():
        return f"no NVIDIA GPU on this machine ({_NVIDIA_DEVICE} is missing)"
    return None


def cuda_unavailable_reason() -> str:
    """Our best explanation of a CUDA fallback; ORT's own error goes to stderr only."""
    return cuda_known_unavailable() or (
        "the CUDA provider failed to initialise: CUDA 13 / cuDNN 9 libraries missing? "
        "(pip install 'onnxruntime-gpu[cuda,cudnn]'); ONNX Runtime's own error is on stderr"
    )


# ONNX Runtime logs to stderr by itself (no Python hook exists to route its lines into our log),
# so its threshold follows ours: at debug its warnings show, otherwise only its errors.
_ORT_SEVERITY = {"debug": 2, "info": 3, "warning": 3, "error": 3, "critical": 4}


def set_runtime_log_level(level: str) -> None:
    ort.set_default_logger_severity(_ORT_SEVERITY.get(level, 3))


_preload_once = threading.Lock()
_preloaded = False


def _preload_cuda_libraries() -> None:
    """Load CUDA/cuDNN from the nvidia-* wheels where a GPU exists (onnxruntime-gpu >= 1.21).

    preload_dlls prints to stdout, which carries our JSON log lines, so its chatter is captured
    and logged as one event instead.
    """
    global _preloaded
    with _preload_once:
        if _preloaded or not _NVIDIA_DEVICE.exists() or not hasattr(ort, "preload_dlls"):
            return
        _preloaded = True
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            ort.preload_dlls()
        if captured.getvalue().strip():
            log.info("runtime.cuda_preload", output=captured.getvalue().strip())


def _provider_list(opts: RuntimeOptions) -> list[str | tuple[str, dict[str, str]]]:
    providers: list[str | tuple[str, dict[str, str]]] = []
    for name in opts.providers:
        if name == "cuda":
            cuda = {
                "device_id": str(opts.cuda_device_id),
                # EXHAUSTIVE (ORT's default) makes each new input shape take seconds.
                "cudnn_conv_algo_search": opts.cudnn_conv_algo_search,
                "arena_extend_strategy": opts.cuda_arena_extend_strategy,
                "use_tf32": "1" if opts.cuda_use_tf32 else "0",
            }
            if opts.cuda_gpu_mem_limit:
                cuda["gpu_mem_limit"] = str(opts.cuda_gpu_mem_limit)
            if opts.cuda_graph:
                cuda["enable_cuda_graph"] = "1"
            providers.append(("CUDAExecutionProvider", cuda))
        else:
            providers.append(_ORT_NAMES[name])
    return providers


def create_session(model_path: Path, opts: RuntimeOptions) -> LoadedSession:
    """Build a session on the requested providers; raise ModelLoadError if it cannot serve."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = opts.intra_op_threads
    so.inter_op_num_threads = opts.inter_op_threads
    so.graph_optimization_level = _GRAPH_LEVELS[opts.graph_optimization_level]
    if not opts.spinning:
        # ORT's pool threads spin-wait after each run by default; on a small device under
        # load their spinning takes the CPU that gRPC and the event loop need.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    asked = opts
    if "cuda" in opts.providers:
        known = cuda_known_unavailable()
        if known is not None:
            if opts.strict:
                raise ModelLoadError(
                    f"strict provider mode: CUDA was asked for and not obtained: {known}"
                )
            # Not asked at all (see cuda_known_unavailable); the CPU serves, and the fallback
            # is reported below like any other.
            cpu = ("cpu",)
            opts = dataclasses.replace(opts, providers=cpu)
        else:
            _preload_cuda_libraries()
    try:
        session = ort.InferenceSession(str(model_path), so, providers=_provider_list(opts))
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... classes
        if not opts.cuda_graph or "cuda" not in opts.providers:
            raise ModelLoadError(f"onnxruntime could not load {model_path.name}: {exc}") from exc
        # CUDA graphs need every node on the CUDA provider; without them the model still serves.
        log.warning("model.cuda_graph_unavailable", model=model_path.name, reason=str(exc)[:300])
        opts = dataclasses.replace(opts, cuda_graph=False)
        try:
            session = ort.InferenceSession(str(model_path), so, providers=_provider_list(opts))
        except Exception as again:
            raise ModelLoadError(
                f"onnxruntime could not load {model_path.name}: {again}"
            ) from again
    active = [_SHORT_NAMES.get(p, p) for p in session.get_providers()]
    reason = None
    if "cuda" in asked.providers and "cuda" not in active:
        reason = cuda_unavailable_reason()
        if opts.strict:
            raise ModelLoadError(
                f"strict provider mode: CUDA was asked for and not obtained: {reason}"
            )
    if opts.cuda_graph and active[0] != "cuda":
        log.warning(
            "model.cuda_graph_unavailable",
            model=model_path.name,
            reason="CUDA graphs need the CUDA provider; this session runs on the CPU",
        )
    strings = any(
        t.type == "tensor(string)" for t in (*session.get_inputs(), *session.get_outputs())
    )
    runner = Runner(
        session,
        active[0],
        opts.cuda_device_id,
        io_binding=choose_io_binding(opts.io_binding, active[0], strings),
        cuda_graph=opts.cuda_graph and active[0] == "cuda" and not strings,
    )
    return LoadedSession(session=session, provider=active[0], fallback_reason=reason, runner=runner)


def warmup_feeds(
    inputs: Mapping[str, tuple[str, list[int]]], batch: int = 1
) -> dict[str, np.ndarray]:
    """Zero-filled inputs (empty strings for BYTES); variable dims become 1, batch dim `batch`.

    `inputs` maps name -> (numpy dtype str, full shape with -1 for variable dims).
    """
    feeds: dict[str, Any] = {}
    for name, (dtype, shape) in inputs.items():
        concrete = [
            batch if i == 0 and d == -1 else (1 if d < 0 else d) for i, d in enumerate(shape)
        ]
        if dtype == "object":
            feeds[name] = np.full(concrete, "", dtype=object)
        else:
            feeds[name] = np.zeros(concrete, dtype=dtype)
    return feeds


def translate_run_error(exc: Exception, model: str) -> EdgeAgentError:
    """ORT's pybind exceptions (onnxruntime.capi.onnxruntime_pybind11_state) -> ours."""
    if type(exc).__name__ in ("InvalidArgument", "InvalidProtobuf"):
        return InvalidArgument(f"model '{model}' rejected the inputs: {exc}")
    return ExecutionError(f"model '{model}' failed to run: {exc}")
