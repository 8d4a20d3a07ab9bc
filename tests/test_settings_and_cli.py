"""Settings precedence (file < env < flag), start-up errors, and the `infer` CLI."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import modelgen
from conftest import wait_for
from edge_agent.errors import ConfigError
from edge_agent.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_precedence_file_env_flag(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('log_level = "debug"\ngrpc_address = "127.0.0.1:1"\nintra_op_threads = 3\n')
    env = {"EDGE_AGENT_GRPC_ADDRESS": "127.0.0.1:2", "EDGE_AGENT_LOG_LEVEL": "warning"}
    settings = load_settings(config, env, {"log_level": "error", "grpc_address": None})
    assert settings.intra_op_threads == 3  # file only
    assert settings.grpc_address == "127.0.0.1:2"  # env beats file; an absent flag changes nothing
    assert settings.log_level == "error"  # flag beats env


def test_defaults() -> None:
    settings = load_settings(None, {}, {})
    assert settings == Settings()
    assert settings.grpc_address == "0.0.0.0:8001"
    assert settings.metrics_address == "0.0.0.0:8002"
    assert settings.max_message_bytes == 64 * 1024 * 1024
    assert (settings.model_repository / "digits" / "config.pbtxt").is_file()


def test_env_types_and_config_path(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("strict_provider = false\n")
    env = {
        "EDGE_AGENT_CONFIG": str(config),
        "EDGE_AGENT_STRICT_PROVIDER": "true",
        "EDGE_AGENT_EXECUTION_PROVIDERS": "cpu",
        "EDGE_AGENT_MAX_MESSAGE_BYTES": "1024",
        "EDGE_AGENT_MAX_CONCURRENT_RPCS": "8",
    }
    settings = load_settings(None, env, {})
    assert settings.max_concurrent_rpcs == 8
    assert settings.strict_provider is True
    assert settings.execution_providers == ("cpu",)
    assert settings.max_message_bytes == 1024


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ("nonsense = 1\n", {}, "unknown setting 'nonsense'"),
        ("log_level = \n", {}, "invalid TOML"),
        ('log_level = "loud"\n', {}, "log_level: 'loud' is not one of"),
        ("", {"EDGE_AGENT_GRPC_ADDRESS": "nowhere"}, "grpc_address: expected HOST:PORT"),
        ("", {"EDGE_AGENT_GRPC_ADDRESS": "h:70000"}, "port 0-65535"),
        ("", {"EDGE_AGENT_INTRA_OP_THREADS": "many"}, "environment EDGE_AGENT_INTRA_OP_THREADS"),
        ("", {"EDGE_AGENT_EXECUTION_PROVIDERS": "tpu"}, "unknown provider 'tpu'"),
        ('model_repository = "/no/such/dir"\n', {}, "is not a directory"),
        ("max_message_bytes = 0\n", {}, "at least 1"),
        ("max_concurrent_rpcs = 0\n", {}, "max_concurrent_rpcs: must be at least 1"),
        ("strict_provider = 3\n", {}, "expected true or false"),
        ('model_control_mode = "auto"\n', {}, "model_control_mode: 'auto' is not one of"),
        ('load_model = ["m"]\n', {}, "load_model: only meaningful with model_control_mode"),
        ("repository_poll_secs = 0\n", {}, "repository_poll_secs: must be positive"),
        ('swap_policy = "yolo"\n', {}, "swap_policy: 'yolo' is not one of"),
        ("loader_nice = 20\n", {}, "loader_nice: must lie in 0..19"),
        ('state_dir = "/etc/hostname"\n', {}, "state_dir: /etc/hostname is not a directory"),
    ],
)
def test_invalid_settings(tmp_path: Path, toml: str, env: dict[str, str], message: str) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_settings(config, env, {})


def test_lifecycle_settings_from_env_keep_model_names_as_given(tmp_path: Path) -> None:
    env = {
        "EDGE_AGENT_MODEL_CONTROL_MODE": "explicit",
        "EDGE_AGENT_LOAD_MODEL": "Digits, other",
        "EDGE_AGENT_SWAP_POLICY": "drain_first",
        "EDGE_AGENT_STATE_DIR": str(tmp_path),
    }
    settings = load_settings(None, env, {})
    assert settings.load_model == ("Digits", "other")
    assert settings.swap_policy == "drain_first" and settings.state_dir == tmp_path


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        load_settings(tmp_path / "absent.toml", {}, {})


def test_invalid_config_exits_78_with_a_clear_message(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('log_level = "loud"\n')
    result = cli("serve", "--config", str(config))
    assert result.returncode == 78
    assert "invalid configuration" in result.stderr and "log_level" in result.stderr


def test_a_taken_port_fails_the_start_at_once_with_its_reason(
    start_daemon: Any, server: Any
) -> None:
    taken = start_daemon(
        "--grpc-address",
        server.url,
        "--metrics-address",
        "127.0.0.1:0",
        "--control-address",
        "127.0.0.1:0",
        address=False,
    )
    assert taken.proc.wait(60) == 78
    wait_for(lambda: taken.named("agent.stopped"), "the last log line")
    assert any("cannot listen" in line and "in use" in line for line in taken.stderr), taken.stderr
    # Checked before any model loads, and logged in the order it happened.
    assert not taken.named("model.loaded")
    events = [e["event"] for e in taken.events]
    assert events.index("agent.start_failed") < events.index("agent.stopped")
    assert "in use" in taken.named("agent.start_failed")[0]["error"]
    assert "another with --grpc-address" in taken.named("agent.start_failed")[0]["error"]


def test_a_state_dir_that_does_not_exist_yet_is_created_private(tmp_path: Path) -> None:
    state = tmp_path / "new" / "state"
    settings = load_settings(None, {"EDGE_AGENT_STATE_DIR": str(state)}, {})
    assert settings.state_dir == state and state.is_dir()
    assert state.stat().st_mode & 0o777 == 0o700


def test_a_repository_inside_the_state_dir_is_created(start_daemon: Any, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    daemon = start_daemon(
        "--state-dir", str(state), "--model-repository", str(state / "models")
    ).wait_started()
    assert (state / "models").is_dir()
    assert daemon.named("agent.started")
    # Anywhere else a missing repository is still a configuration error.
    result = cli("serve", "--model-repository", str(tmp_path / "elsewhere"))
    assert result.returncode == 78 and "is not a directory" in result.stderr


@pytest.mark.skipif(
    Path("/dev/nvidiactl").exists(), reason="checks the start on a machine without a GPU"
)
def test_no_gpu_start_is_quiet_and_json(start_daemon: Any) -> None:
    """The default providers (cuda,cpu) on a machine without a GPU: CUDA is not even asked for
    (ONNX Runtime would print its failure to stderr); the one explanation is our own event."""
    daemon = start_daemon("--model-repository", str(ROOT / "models")).wait_started()
    assert daemon.stop() == 0
    wait_for(lambda: daemon.named("agent.stopped"), "the last log line")
    assert daemon.stderr == []
    assert not daemon.named("unparsed")  # every stdout line was a JSON object
    (fallback,) = daemon.named("runtime.provider_fallback")
    assert fallback["requested"] == ["cuda", "cpu"] and fallback["active"] == "cpu"
    assert "/dev/nvidiactl" in fallback["reason"]
    assert daemon.named("agent.starting")[0]["repository_source"].startswith("shipped models")


def test_every_subcommand_has_its_own_help() -> None:
    seen = set()
    for command in (
        ["fleet", "add-device"],
        ["fleet", "status"],
        ["fleet", "target"],
        ["fleet", "rollback"],
        ["control-plane", "serve"],
        ["publish"],
    ):
        result = cli(*command, "--help")
        assert result.returncode == 0, result.stderr
        assert f"usage: edge-agent {' '.join(command)}" in result.stdout
        seen.add(result.stdout)
    assert len(seen) == 6
    assert "--device-token-file" in cli("fleet", "add-device", "--help").stdout
    target_help = cli("fleet", "target", "--help").stdout
    assert re.search(r"--model MODEL\s+the model to target", target_help)


def test_daemon_precedence_end_to_end(start_daemon: Any, tmp_path: Path) -> None:
    file_repo, env_repo = tmp_path / "from-file", tmp_path / "from-env"
    file_repo.mkdir()
    modelgen.copy_shipped(env_repo)
    config = tmp_path / "agent.toml"
    config.write_text(f'model_repository = "{file_repo}"\nlog_level = "warning"\n')
    daemon = start_daemon(
        "--config",
        str(config),
        "--log-level",
        "info",
        env={"EDGE_AGENT_MODEL_REPOSITORY": str(env_repo), "EDGE_AGENT_LOG_LEVEL": "error"},
    ).wait_started()
    # env beat the file for the repository; the flag beat env for the level (info events appear).
    assert daemon.named("agent.starting")[0]["model_repository"] == str(env_repo)
    assert daemon.named("model.loaded")[0]["model"] == "digits"


def test_infer_cli_classifies_a_digit(server: Any, tmp_path: Path) -> None:
    result = cli(
        "infer",
        "--url",
        server.url,
        "--model",
        "digits",
        "--input",
        "input=models/digits/sample.npy",
        "--output-dir",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "model digits version 1"
    assert any(line.startswith("label  INT64  [1]") and "values=[7]" in line for line in lines)
    assert any(line.startswith("probabilities  FP32  [1, 10]") for line in lines)
    assert np.load(tmp_path / "label.npy").tolist() == [7]
    assert np.load(tmp_path / "probabilities.npy").shape == (1, 10)


def test_infer_cli_reports_errors_on_one_line(server: Any, tmp_path: Path) -> None:
    result = cli(
        "infer", "--url", server.url, "--model", "nope", "--input", "input=models/digits/sample.npy"
    )
    assert result.returncode == 1
    assert result.stderr.strip() == "edge-agent infer: NOT_FOUND: unknown model 'nope'"

    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((1, 63), np.float32))
    result = cli("infer", "--url", server.url, "--model", "digits", "--input", f"input={wrong}")
    assert result.returncode == 1
    assert result.stderr.startswith("edge-agent infer: INVALID_ARGUMENT: input 'input'")

    result = cli("infer", "--url", server.url, "--model", "digits", "--input", "input=/no/file.npy")
    assert result.returncode == 2
    assert "cannot read /no/file.npy" in result.stderr

    result = cli(
        "infer",
        "--url",
        "127.0.0.1:1",
        "--model",
        "digits",
        "--timeout",
        "5",
        "--input",
        "input=models/digits/sample.npy",
    )
    assert result.returncode == 1
    assert result.stderr.startswith("edge-agent infer: UNAVAILABLE")
