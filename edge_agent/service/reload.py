"""What a SIGHUP reload can apply to a running agent, and what needs a restart.

Live: the log level; the settings that model builds read (providers, threads, defaults for batch
and queue sizes, swap policy, TF32, ...), applied by reloading every model through the hot-swap
path; the poll interval; the shutdown grace; the element limits; the TLS certificate and key.
Everything that shapes a listener, the repository, the sync or the control mode needs a restart.
"""

from __future__ import annotations

import dataclasses

from edge_agent.settings import Settings

NEEDS_RESTART = frozenset(
    {
        "model_repository",
        "grpc_address",
        "metrics_address",
        "log_format",
        "max_message_bytes",
        "max_concurrent_rpcs",
        "model_control_mode",
        "load_model",
        "state_dir",
        "control_plane",
        "device_id",
        "device_token_file",
        "trusted_keys",
        "sync_interval",
        "sync_bandwidth_limit",
        "variant_preference_cuda",
        "variant_preference_cpu",
        "loader_nice",
        "control_address",
        "http_address",
        "front_end",
        "front_end_threads",
        "http_control_address",
        "control_token_file",
        "control_on_inference_listener",
        "tls_client_ca",
        "control_plane_ca",
        "unix_socket_mode",
        "allow_shared_memory",
        "max_connections",
        "max_connections_per_peer",
        "connection_idle_seconds",
        "first_request_seconds",
        "sync_max_release_bytes",
        "learn",
        "examples_max_bytes",
    }
)


# Live settings that no model build reads: changing only these rebuilds nothing.
NOT_FOR_MODELS = frozenset(
    {
        "log_level",
        "shutdown_grace_seconds",
        "repository_poll_secs",
        "max_elements_per_tensor",
        "max_elements_per_request",
        "tls_cert",
        "tls_key",
    }
)


def plan(current: Settings, new: Settings) -> tuple[Settings, list[str], list[str]]:
    """(the settings to run with now, the keys applied live, the keys that need a restart);
    a key that needs a restart keeps its current value until then."""
    live: list[str] = []
    restart: list[str] = []
    for field in dataclasses.fields(Settings):
        if getattr(current, field.name) == getattr(new, field.name):
            continue
        (restart if field.name in NEEDS_RESTART else live).append(field.name)
    applied = dataclasses.replace(current, **{key: getattr(new, key) for key in live})
    return applied, live, restart
