"""The daemon's settings: one flat, documented tree, from defaults < TOML file < env < flags.

Every setting is a field of `Settings`. In the TOML file (``--config``) it is a top-level key of the
same name; in the environment it is ``EDGE_AGENT_<NAME>`` (upper case; lists comma-separated);
command-line flags override both. `load_settings` validates everything at once and raises
`ConfigError` with a message naming the source and the key, so a bad config fails at start.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edge_agent.errors import ConfigError

ENV_PREFIX = "EDGE_AGENT_"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("auto", "json", "console")
PROVIDERS = ("cuda", "cpu")
GRAPH_LEVELS = ("disable", "basic", "extended", "all")
CUDNN_SEARCH = ("HEURISTIC", "EXHAUSTIVE", "DEFAULT")
ARENA_STRATEGIES = ("kNextPowerOfTwo", "kSameAsRequested")
CONTROL_MODES = ("none", "poll", "explicit")
SWAP_POLICIES = ("overlap", "drain_first")
FRONT_ENDS = ("aio", "sync")
TRAIN_WHEN = ("idle", "always")
# How a true or false setting may be spelt (TOML, environment, flags, config.pbtxt parameters).
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
# gRPC's 4 MiB default silently breaks image-sized tensors; both directions.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def default_model_repository() -> Path:
    """The shipped `models/`: the checkout's when running from one, else the wheel's copy."""
    package = Path(__file__).resolve().parent
    checkout = package.parent / "models"
    if checkout.is_dir() and (package.parent / "pyproject.toml").is_file():
        return checkout
    return package / "_shipped_models"


def repository_source(repository: Path) -> str:
    """Where a served repository comes from, for the start log: after `pip install .` the
    shipped models are the installed package's copy, and editing the checkout's models/ changes
    nothing until a reinstall."""
    package = Path(__file__).resolve().parent
    resolved = repository.resolve()
    if resolved == package / "_shipped_models":
        return "shipped models (the installed package's copy; reinstall to change them)"
    if resolved == package.parent / "models":
        return "shipped models (this checkout's models/)"
    return "configured"


@dataclasses.dataclass(frozen=True)
class Settings:
    model_repository: Path = dataclasses.field(default_factory=default_model_repository)
    # The inference listener: HOST:PORT, unix:PATH (co-located clients), or several of them
    # comma-separated (e.g. "0.0.0.0:8001,unix:/run/edge-agent/grpc.sock").
    grpc_address: str = "0.0.0.0:8001"
    # Mode of the unix sockets the agent listens on (connecting needs write permission).
    unix_socket_mode: str = "0660"
    # Triton's system shared memory extension, for clients on this host (api/shm.py).
    allow_shared_memory: bool = False
    # Prometheus /metrics (Triton's metrics port).
    metrics_address: str = "0.0.0.0:8002"
    log_level: str = "info"
    log_format: str = "auto"  # auto: console on a TTY, JSON otherwise (journald)
    max_message_bytes: int = MAX_MESSAGE_BYTES
    # On SIGTERM / SIGINT: the one time budget of the whole drain (listeners refuse new calls,
    # calls and model runs in progress get what is left, then are abandoned); 0 = stop at once.
    # Keep it below systemd's TimeoutStopSec (30 s in systemd/edge-agent.service).
    shutdown_grace_seconds: float = 10.0
    # RPCs in progress at once, all models together; past it gRPC answers RESOURCE_EXHAUSTED
    # before any of our code runs. Under overload the backlog otherwise waits inside gRPC, ahead
    # of the per-model queues, where no queue bound or deadline check can see it.
    max_concurrent_rpcs: int = 512
    # Elements one input tensor / one request may claim (refused before anything is decoded);
    # BYTES elements are also bounded at 2^20 per request.
    max_elements_per_tensor: int = 1 << 24
    max_elements_per_request: int = 1 << 25
    # Connection hygiene, per listener (rpc/connections.py): connections in total (lowered to
    # fit the file descriptor limit), per peer address, the idle timeout (no call outstanding),
    # and how soon a new connection must make its first call.
    max_connections: int = 4096
    max_connections_per_peer: int = 256
    connection_idle_seconds: float = 300.0
    first_request_seconds: float = 10.0

    # TLS on the inference and control listeners (both cert and key; a client CA makes it
    # mTLS: clients without a certificate from that CA are refused in the handshake). Reloaded
    # on SIGHUP. The same cert/key are the agent's client identity towards a TLS control plane.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # The control listener (model load / unload): HOST:PORT or unix:PATH, "" = none. Bound
    # elsewhere than loopback it needs control_token_file or tls_client_ca.
    control_address: str = "127.0.0.1:8003"
    control_token_file: Path | None = None
    control_on_inference_listener: bool = False  # also serve them on grpc_address (unsafe)
    # KServe v2 over HTTP/REST (Triton's port 8000): HOST:PORT, "" = off. The repository
    # endpoints are served on http_control_address (same rules as control_address).
    http_address: str = ""
    http_control_address: str = ""
    # Pause between the warmup runs of a version loaded while another serves (a swap): on a GPU
    # the new version's warmup otherwise takes the device from serving. 0 = none (the CPU's
    # loader already runs at a lower priority: loader_nice).
    swap_warmup_pause_ms: float = 0.0
    # The inference listener's gRPC server: "aio" (asyncio; the default) or "sync" (gRPC's
    # thread pool; handler threads run the model and form batches themselves: api/sync_front.py).
    front_end: str = "aio"
    front_end_threads: int = 64  # "sync": handler threads (requests in flight at once)

    # Model lifecycle (Triton's meanings): none = load every model at start and never change;
    # poll = also rescan the repository every repository_poll_secs; explicit = load only
    # load_model at start ("*" = all), then what RepositoryModelLoad / Unload ask.
    model_control_mode: str = "none"
    repository_poll_secs: float = 15.0
    load_model: tuple[str, ...] = ()
    # How a new version replaces the serving one: overlap (both loaded briefly, no pause) or
    # drain_first (for devices that cannot hold two copies: requests wait while it swaps).
    # A model's config.pbtxt parameter swap_policy overrides it.
    swap_policy: str = "overlap"
    # Nice value added to the loader thread and the threads a build spawns, so that building and
    # warming a new version yields the CPU to serving (0 = same priority as serving).
    loader_nice: int = 19
    # Where the agent keeps state across restarts (rollbacks); unset = nothing persisted.
    state_dir: Path | None = None

    # Weight sync from a control plane (sync/); off while control_plane is empty. Needs
    # device_id, device_token_file, trusted_keys (public keys, PEM) and state_dir. Several
    # replicas: "HOST:PORT,HOST:PORT" (the next takes over when one stops answering).
    control_plane: str = ""
    device_id: str = ""
    device_token_file: Path | None = None
    trusted_keys: tuple[str, ...] = ()
    # The long-poll wait: the control plane answers at once on a change, else after this long.
    control_plane_ca: Path | None = None  # TLS to the control plane, verified with this CA
    sync_interval: float = 30.0
    sync_bandwidth_limit: int = 0  # bytes per second for blob downloads, 0 = unlimited
    # The largest release (one variant's files) this device downloads; a bigger one is refused
    # before any download (reason "size").
    sync_max_release_bytes: int = 8 << 30
    # Learning on the fleet (learn/): take part in the control plane's learning tasks (needs the
    # `learn` extra, PyTorch); examples are kept under state_dir/examples, at most this many
    # bytes per model (the oldest dropped first).
    learn: bool = False
    examples_max_bytes: int = 256 << 20
    # Serving first: with "idle" the training worker pauses between mini-batches while requests
    # are in flight or queued and until train_quiet_ms after the last one finished; "always"
    # trains at the lowest CPU priority only. min_train_share: a paused run still trains this
    # share of its (wall-clock) time, so it ends on a device that is never quiet.
    train_when: str = "idle"
    train_quiet_ms: int = 100
    min_train_share: float = 0.1
    # Which variant of a release to install, by the execution provider the agent will run: the
    # first one the release has, else its default (fp32).
    variant_preference_cuda: tuple[str, ...] = ("fp16", "fp32")
    variant_preference_cpu: tuple[str, ...] = ("int8", "fp32")

    # Runtime defaults; a model's config.pbtxt parameters and instance_group override them.
    execution_providers: tuple[str, ...] = ("cuda", "cpu")
    strict_provider: bool = False  # refuse to serve a model on CPU when CUDA was asked for
    intra_op_threads: int = 0  # 0 = ONNX Runtime's default (one thread for a cheap CPU model)
    # ONNX Runtime's thread pools spin-wait between runs (its default). Off: faster under
    # concurrency on a small device, slower at concurrency 1 (measured:
    # docs/performance-history.md).
    ort_spinning: bool = True
    # ONNX Runtime's inter_op_num_threads (0 = its default): the pool that runs independent
    # nodes at once, used only in its parallel execution mode; sessions here run sequentially
    # (its default mode), so this changes nothing today. Parameter inter_op_thread_count.
    inter_op_threads: int = 0
    # ONNX Runtime's graph_optimization_level: disable, basic, extended or all (ORT_DISABLE_ALL
    # .. ORT_ENABLE_ALL). A model's optimization.graph.level (< 0 basic, > 0 extended) or its
    # parameter graph_optimization_level overrides it.
    graph_optimization_level: str = "all"
    # The CUDA provider's device_id: the GPU (CUDA ordinal, after CUDA_VISIBLE_DEVICES) that
    # sessions and their bound buffers use; a model's instance_group gpus (the first) overrides.
    cuda_device_id: int = 0
    cuda_gpu_mem_limit: int = 0  # bytes, 0 = no limit
    # The CUDA provider's cudnn_conv_algo_search: how cuDNN picks a convolution algorithm for
    # each new input shape. EXHAUSTIVE (ONNX Runtime's default) benchmarks them all, seconds per
    # shape; HEURISTIC asks cuDNN's heuristics; DEFAULT always takes IMPLICIT_PRECOMP_GEMM.
    # Parameter cudnn_conv_algo_search (also Triton's 0, 1, 2).
    cudnn_conv_algo_search: str = "HEURISTIC"
    # The CUDA provider's arena_extend_strategy: how its memory arena grows. kNextPowerOfTwo
    # (ONNX Runtime's default) in power-of-two steps, fewer allocations but more memory held;
    # kSameAsRequested by what is asked. Parameter arena_extend_strategy.
    cuda_arena_extend_strategy: str = "kNextPowerOfTwo"
    # ONNX Runtime's CUDA default: matmuls and convolutions in TF32 on Ampere and later (faster,
    # ~1e-3 relative error; measured up to 6e-4 absolute on the digits probabilities, H100).
    cuda_use_tf32: bool = True
    # max_batch_size given to a model without config.pbtxt whose first dimension is dynamic.
    default_max_batch_size: int = 32
    # Queue bound for a model whose queue policy says max_queue_size 0 (Triton: unbounded; here
    # nothing waits on an unbounded queue).
    default_max_queue_size: int = 1024


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def _check_control_listener(settings: Settings, key: str) -> None:
    """A listener that loads models (gRPC's or HTTP's): beyond loopback it needs credentials."""
    address = getattr(settings, key)
    parse_address(address, key)
    if (
        not is_loopback(address)
        and settings.control_token_file is None
        and settings.tls_client_ca is None
    ):
        raise ConfigError(
            f"{key}: {address} is not loopback: set control_token_file or tls_client_ca so that "
            "not anyone can load models"
        )


def grpc_addresses(settings: Settings) -> list[str]:
    return [a.strip() for a in settings.grpc_address.split(",") if a.strip()]


def parse_address(value: str, key: str = "address") -> tuple[str, int]:
    """HOST:PORT (IPv6 as [::1]:PORT) -> (host, port); raises ConfigError."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{key}: expected HOST:PORT with a port 0-65535, got {value!r}")
    return host, int(port_text)


def is_loopback(address: str) -> bool:
    """HOST:PORT on this machine only (unix sockets too)."""
    if address.startswith("unix:"):
        return True
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _coerce(name: str, value: Any, source: str) -> Any:
    """Turn a TOML value or an env/flag string into the field's type, or raise ConfigError."""
    where = f"{source}: {name}"
    annotation = str(_FIELDS[name].type)
    try:
        if annotation == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in TRUE_WORDS:
                return True
            if text in FALSE_WORDS:
                return False
            raise ValueError(f"expected true or false, got {value!r}")
        if annotation == "int":
            if isinstance(value, bool | float):
                raise ValueError(f"expected an integer, got {value!r}")
            return int(value)
        if annotation == "float":
            if isinstance(value, bool):
                raise ValueError(f"expected a number, got {value!r}")
            return float(value)
        if annotation in ("Path", "Path | None"):
            if not isinstance(value, str) or not value:
                raise ValueError(f"expected a path, got {value!r}")
            return Path(value).expanduser()
        if annotation == "tuple[str, ...]":
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
                raise ValueError(f"expected a list of strings, got {value!r}")
            cleaned = tuple(i.strip() for i in items if i.strip())
            return tuple(i.lower() for i in cleaned) if name == "execution_providers" else cleaned
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
        return value
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _check(settings: Settings) -> None:
    """Every check, in the order their errors are reported: the first one found is raised (and
    state_dir is made before the checks after it run)."""
    _check_inference_listener(settings)
    _check_choices(settings)
    _check_numbers(settings)
    _check_lifecycle(settings)
    _check_tls(settings)
    if settings.control_address and not settings.control_address.startswith("unix:"):
        _check_control_listener(settings, "control_address")
    if not 0 <= settings.swap_warmup_pause_ms <= 1000:
        raise ConfigError("swap_warmup_pause_ms: 0..1000")
    _check_front_ends(settings)
    _check_control_plane(settings)
    for key in ("connection_idle_seconds", "first_request_seconds"):
        if getattr(settings, key) <= 0:
            raise ConfigError(f"{key}: must be positive")
    _check_learning(settings)
    if settings.sync_interval <= 0:
        raise ConfigError("sync_interval: must be positive")
    if settings.sync_bandwidth_limit < 0:
        raise ConfigError("sync_bandwidth_limit: must not be negative")
    _check_model_repository(settings)


def _check_inference_listener(settings: Settings) -> None:
    for address in grpc_addresses(settings):
        if address.startswith("unix:"):
            if not address[5:].startswith("/"):
                raise ConfigError(f"grpc_address: {address!r}: give an absolute socket path")
        else:
            parse_address(address, "grpc_address")
    if not grpc_addresses(settings):
        raise ConfigError("grpc_address: at least one address is required")
    try:
        if not 0 <= int(settings.unix_socket_mode, 8) <= 0o777:
            raise ValueError
    except ValueError:
        raise ConfigError(
            f"unix_socket_mode: {settings.unix_socket_mode!r} is not an octal mode like 0660"
        ) from None
    parse_address(settings.metrics_address, "metrics_address")


def _check_choices(settings: Settings) -> None:
    choices = {
        "log_level": LOG_LEVELS,
        "log_format": LOG_FORMATS,
        "graph_optimization_level": GRAPH_LEVELS,
        "cudnn_conv_algo_search": CUDNN_SEARCH,
        "cuda_arena_extend_strategy": ARENA_STRATEGIES,
        "model_control_mode": CONTROL_MODES,
        "swap_policy": SWAP_POLICIES,
        "train_when": TRAIN_WHEN,
    }
    for key, allowed in choices.items():
        if getattr(settings, key) not in allowed:
            raise ConfigError(f"{key}: {getattr(settings, key)!r} is not one of {list(allowed)}")
    if not settings.execution_providers:
        raise ConfigError("execution_providers: at least one provider is required")
    for provider in settings.execution_providers:
        if provider not in PROVIDERS:
            raise ConfigError(
                f"execution_providers: unknown provider {provider!r}, use {PROVIDERS}"
            )


def _check_numbers(settings: Settings) -> None:
    for key in (
        "max_message_bytes",
        "default_max_batch_size",
        "default_max_queue_size",
        "max_concurrent_rpcs",
        "max_elements_per_tensor",
        "max_elements_per_request",
        "max_connections",
        "max_connections_per_peer",
        "sync_max_release_bytes",
        "examples_max_bytes",
    ):
        if getattr(settings, key) < 1:
            raise ConfigError(f"{key}: must be at least 1, got {getattr(settings, key)}")
    for key in ("intra_op_threads", "inter_op_threads", "cuda_device_id", "cuda_gpu_mem_limit"):
        if getattr(settings, key) < 0:
            raise ConfigError(f"{key}: must not be negative, got {getattr(settings, key)}")
    if not 0 <= settings.loader_nice <= 19:
        raise ConfigError(f"loader_nice: must lie in 0..19, got {settings.loader_nice}")
    if settings.repository_poll_secs <= 0:
        raise ConfigError("repository_poll_secs: must be positive")


def _check_lifecycle(settings: Settings) -> None:
    """Which models load at start, where state is kept (made here when missing), how long a
    stop may take."""
    if settings.load_model and settings.model_control_mode != "explicit":
        raise ConfigError("load_model: only meaningful with model_control_mode explicit")
    if settings.state_dir is not None and not settings.state_dir.is_dir():
        if settings.state_dir.exists() or settings.state_dir.is_symlink():
            raise ConfigError(f"state_dir: {settings.state_dir} is not a directory")
        try:  # a new state directory is made, readable by the agent's user only
            settings.state_dir.mkdir(mode=0o700, parents=True)
        except OSError as exc:
            raise ConfigError(
                f"state_dir: cannot create {settings.state_dir}: {exc.strerror or exc}"
            ) from exc
    if settings.shutdown_grace_seconds < 0:
        raise ConfigError("shutdown_grace_seconds: must not be negative")


def _check_tls(settings: Settings) -> None:
    """TLS comes as a cert and key pair; every credential file named must exist."""
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ConfigError("tls_cert and tls_key: give both or neither")
    if settings.tls_client_ca is not None and settings.tls_cert is None:
        raise ConfigError("tls_client_ca: needs tls_cert and tls_key (mTLS is TLS first)")
    for key in ("tls_cert", "tls_key", "tls_client_ca", "control_token_file", "control_plane_ca"):
        path = getattr(settings, key)
        if path is not None and not path.is_file():
            raise ConfigError(f"{key}: {path} is not a file")


def _check_front_ends(settings: Settings) -> None:
    """The inference listener's gRPC server, and the HTTP listeners when on."""
    if settings.front_end not in FRONT_ENDS:
        raise ConfigError(f"front_end: 'aio' or 'sync', got {settings.front_end!r}")
    if settings.front_end_threads < 1:
        raise ConfigError("front_end_threads: at least 1")
    if settings.http_address:
        parse_address(settings.http_address, "http_address")
    if settings.http_control_address:
        _check_control_listener(settings, "http_control_address")


def _check_control_plane(settings: Settings) -> None:
    """Sync from a control plane needs an identity, trusted keys and somewhere to keep state."""
    if not settings.control_plane:
        return
    addresses = [a.strip() for a in settings.control_plane.split(",")]
    for address in addresses:  # one, or several replicas: HOST:PORT,HOST:PORT
        parse_address(address, "control_plane")
    for key in ("device_id", "device_token_file", "trusted_keys", "state_dir"):
        if not getattr(settings, key):
            raise ConfigError(f"{key}: required when control_plane is set")
    for key_file in settings.trusted_keys:
        if not Path(key_file).is_file():
            raise ConfigError(f"trusted_keys: {key_file} is not a file")
    if settings.device_token_file is not None and not settings.device_token_file.is_file():
        raise ConfigError(f"device_token_file: {settings.device_token_file} is not a file")


def _check_learning(settings: Settings) -> None:
    if settings.learn and not settings.control_plane:
        raise ConfigError("learn: needs a control_plane (learning tasks come from it)")
    if not 0 < settings.min_train_share <= 1:
        raise ConfigError("min_train_share: must lie in (0, 1]")
    if not 0 <= settings.train_quiet_ms <= 60_000:
        raise ConfigError("train_quiet_ms: 0..60000")


def _check_model_repository(settings: Settings) -> None:
    if settings.model_repository.is_dir():
        return
    if not _under(settings.model_repository, settings.state_dir):
        raise ConfigError(f"model_repository: {settings.model_repository} is not a directory")
    # Inside the agent's own state directory (e.g. /var/lib/edge-agent/models, where weight
    # sync installs): the agent owns it, so a fresh device gets it made, not an exit 78.
    try:
        settings.model_repository.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"model_repository: cannot create {settings.model_repository}: {exc}"
        ) from exc


def _under(path: Path, parent: Path | None) -> bool:
    if parent is None or not parent.is_dir():
        return False
    return path.resolve().is_relative_to(parent.resolve())


def load_settings(
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge defaults < config file < environment < flags (None values in flags are ignored)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    if config_file is None and env.get(ENV_PREFIX + "CONFIG"):
        config_file = Path(env[ENV_PREFIX + "CONFIG"])
    if config_file is not None:
        try:
            data = tomllib.loads(config_file.read_text())
        except OSError as exc:
            raise ConfigError(f"config file {config_file}: {exc.strerror or exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {config_file}: invalid TOML: {exc}") from exc
        for key, value in data.items():
            if key not in _FIELDS:
                raise ConfigError(f"config file {config_file}: unknown setting {key!r}")
            values[key] = _coerce(key, value, f"config file {config_file}")
    for name in _FIELDS:
        env_key = ENV_PREFIX + name.upper()
        if env_key in env:
            values[name] = _coerce(name, env[env_key], f"environment {env_key}")
    for name, value in (flags or {}).items():
        if value is not None:
            values[name] = _coerce(name, value, f"flag --{name.replace('_', '-')}")
    settings = Settings(**values)
    _check(settings)
    return settings
