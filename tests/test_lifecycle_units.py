"""Pure pieces of the lifecycle, without a server: the poll stability rule, inline-file names and
staging, the golden check, the memory peak. (Modules importing edge_agent._proto cannot share a
process with tritonclient, so what needs them is tested through the daemon.)"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import modelgen
from edge_agent.errors import InvalidArgument, ModelLoadError
from edge_agent.observability import memory
from edge_agent.repository import staging
from edge_agent.repository.golden import check_golden, read_golden
from edge_agent.repository.scan import (
    ModelFiles,
    StabilityTracker,
    scan_model,
    scan_repository,
    version_dirs,
)

# -- the poll rule ------------------------------------------------------------------------------


def files(**versions: int) -> ModelFiles:
    """A model whose version N has one file of size versions[f'v{N}']."""
    return ModelFiles(
        config=(),
        versions={int(k[1:]): (("model.onnx", size, 1),) for k, size in versions.items()},
    )


def test_a_change_is_acted_on_only_once_stable_across_two_scans() -> None:
    v1 = files(v1=10)
    tracker = StabilityTracker({"m": v1})
    applied = {"m": v1}
    growing = [files(v1=10, v2=size) for size in (1, 5, 9)]
    for scan in growing:  # a copy in progress: different every scan
        decision = tracker.decide({"m": scan}, applied)
        assert decision.load == [] and decision.pending == ["m"]
    decision = tracker.decide({"m": growing[-1]}, applied)  # the copy stopped
    assert decision.load == ["m"] and decision.pending == []
    applied = {"m": growing[-1]}
    assert tracker.decide({"m": growing[-1]}, applied).load == []  # applied: nothing to do


def test_new_and_removed_models_wait_one_scan_too() -> None:
    tracker = StabilityTracker({"m": files(v1=1)})
    applied: dict[str, ModelFiles | None] = {"m": files(v1=1)}
    scan = {"m": files(v1=1), "new": files(v1=3)}
    assert tracker.decide(scan, applied).pending == ["new"]
    assert tracker.decide(scan, applied).load == ["new"]
    gone = {"new": files(v1=3)}
    applied["new"] = files(v1=3)
    first = tracker.decide(gone, applied)
    assert first.unload == [] and first.pending == ["m"]
    assert tracker.decide(gone, applied).unload == ["m"]


def test_a_failed_load_is_not_retried_until_the_files_change() -> None:
    broken = files(v1=1, v2=7)
    tracker = StabilityTracker({"m": broken})
    # The lifecycle records what it acted on, success or failure, as applied.
    assert tracker.decide({"m": broken}, {"m": broken}).load == []
    fixed = files(v1=1, v2=8)
    tracker.decide({"m": fixed}, {"m": broken})
    assert tracker.decide({"m": fixed}, {"m": broken}).load == ["m"]


def test_scan_sees_sizes_and_times_and_skips_hidden_models(tmp_path: Path) -> None:
    modelgen.versioned(tmp_path / "m" / "1", 1)
    (tmp_path / "m" / "notaversion").mkdir()
    (tmp_path / ".staging" / "x").mkdir(parents=True)
    scan = scan_repository(tmp_path)
    assert list(scan) == ["m"]
    assert list(scan["m"].versions) == [1]
    names = [name for name, _, _ in scan["m"].version(1)]
    assert names == ["model.onnx", "weights.bin"]
    before = scan_model(tmp_path / "m")
    weights = tmp_path / "m" / "1" / "weights.bin"
    os.utime(weights, ns=(1, 1))
    assert scan_model(tmp_path / "m") != before
    assert version_dirs(tmp_path / "missing") == []


# -- inline files -------------------------------------------------------------------------------


def test_file_parameters_are_parsed_and_hostile_names_refused() -> None:
    parsed = staging.parse_files({"file:3/model.onnx": b"a", "file:3/sub/w.bin": b"b"})
    assert parsed == {3: {"model.onnx": b"a", "sub/w.bin": b"b"}}
    for key in (
        "file:3/../x",
        "file:3//x",
        "file:3/.hidden",
        "file:/etc/passwd",
        "file:v1/model.onnx",
        "file:3",
        "file:3/a\\..\\b",
        "file:-1/model.onnx",
    ):
        with pytest.raises(InvalidArgument):
            staging.parse_files({key: b""})
    for name in ("", ".staging", "a/b", "..", "x\0"):
        with pytest.raises(InvalidArgument):
            staging.check_model_name(name)


def test_stage_then_install_moves_whole_versions(tmp_path: Path) -> None:
    (tmp_path / "m" / "2").mkdir(parents=True)
    (tmp_path / "m" / "2" / "old.bin").write_bytes(b"old")
    (tmp_path / "m" / "config.pbtxt").write_text("max_batch_size: 4\n")
    staged = staging.stage(tmp_path, "m", {2: {"model.onnx": b"new"}}, None)
    assert staged.name == "m" and staged.parent.parent == tmp_path / staging.STAGING
    # Without a config parameter the repository's config is used for the trial build.
    assert (staged / "config.pbtxt").read_text() == "max_batch_size: 4\n"
    staging.install(staged, tmp_path, [2], model_files=[])
    assert (tmp_path / "m" / "2" / "model.onnx").read_bytes() == b"new"
    assert not (tmp_path / "m" / "2" / "old.bin").exists()
    # The replaced version is gone, not kept: nothing grows with each install.
    assert not (tmp_path / "m" / staging.REPLACED).exists()
    assert not any((tmp_path / staging.STAGING).iterdir())
    assert list(scan_repository(tmp_path)["m"].versions) == [2]  # .replaced is not a version


def test_a_synced_version_brings_and_restores_its_model_files(tmp_path: Path) -> None:
    """A release directory with config.pbtxt and warmup/: built with them, installed as the
    model's, a copy kept in the version; restore_model_files brings a version's back."""
    model = tmp_path / "repo" / "m"
    (model / "1").mkdir(parents=True)
    (model / "1" / "config.pbtxt").write_text("max_batch_size: 4\n")
    (model / "1" / "warmup").mkdir()
    (model / "1" / "warmup" / "x.bin").write_bytes(b"one")
    (model / "config.pbtxt").write_text("max_batch_size: 4\n")
    release = tmp_path / "release"
    (release / "warmup").mkdir(parents=True)
    (release / "model.onnx").write_bytes(b"graph")
    (release / "config.pbtxt").write_text("max_batch_size: 8\n")
    (release / "warmup" / "x.bin").write_bytes(b"two")
    files = staging.model_files_of(release)
    assert files == ["config.pbtxt", "warmup"]
    staged = staging.stage_directory(tmp_path / "repo", "m", 2, release)
    assert (staged / "config.pbtxt").read_text() == "max_batch_size: 8\n"  # the build's config
    assert (staged / "warmup" / "x.bin").read_bytes() == b"two"
    staging.install(staged, tmp_path / "repo", [2], files)
    assert (model / "config.pbtxt").read_text() == "max_batch_size: 8\n"
    assert (model / "warmup" / "x.bin").read_bytes() == b"two"
    assert (model / "2" / "config.pbtxt").read_text() == "max_batch_size: 8\n"  # the copy
    assert (model / "2" / "warmup" / "x.bin").read_bytes() == b"two"
    staging.restore_model_files(model, 1)
    assert (model / "config.pbtxt").read_text() == "max_batch_size: 4\n"
    assert (model / "warmup" / "x.bin").read_bytes() == b"one"
    assert not [p.name for p in model.iterdir() if p.name.startswith(".")]  # no copy left
    staging.restore_model_files(model, 3)  # no such version, no copies: nothing changes
    assert (model / "config.pbtxt").read_text() == "max_batch_size: 4\n"
    assert list(scan_repository(tmp_path / "repo")["m"].versions) == [1, 2]


def test_clean_staging_removes_leftovers(tmp_path: Path) -> None:
    staged = staging.stage(tmp_path, "m", {1: {"model.onnx": b"x"}}, "name: 'm'")
    assert staged.exists()
    # What a cut mid-install leaves: a set-aside version and a half-made warmup copy.
    (tmp_path / "m" / staging.REPLACED / "1-123").mkdir(parents=True)
    (tmp_path / "m" / staging.REPLACED / "1-123" / "model.onnx").write_bytes(b"old")
    (tmp_path / "m" / ".warmup-abc").mkdir()
    (tmp_path / "m" / "1").mkdir()
    staging.clean_staging(tmp_path)
    assert not (tmp_path / staging.STAGING).exists()
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1"]


# -- the golden check ---------------------------------------------------------------------------


@pytest.fixture
def session(tmp_path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(modelgen.versioned(tmp_path / "1", 3)))


def golden_file(path: Path, value: float, **extra: object) -> Path:
    np.savez(
        path,
        **{"input/x": np.ones((2, 4), np.float32), "output/a": np.full((2, 4), value, np.float32)},
        **extra,  # type: ignore[arg-type]
    )
    return path


def test_golden_check_passes_within_tolerance(tmp_path: Path, session: object) -> None:
    golden = read_golden(golden_file(tmp_path / "g.npz", 3.00001), {"x"})
    assert golden is not None
    check_golden(session, *golden)
    assert read_golden(tmp_path / "none.npz", {"x"}) is None


def test_golden_check_fails_with_the_worst_difference(tmp_path: Path, session: object) -> None:
    golden = read_golden(golden_file(tmp_path / "g.npz", 3.5, atol=0.1, rtol=0.0), {"x"})
    assert golden is not None
    with pytest.raises(ModelLoadError, match=r"output 'a' differs by up to 0\.5 \(atol 0\.1"):
        check_golden(session, *golden)


def test_golden_file_problems_are_reasons(tmp_path: Path) -> None:
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ModelLoadError, match="unreadable"):
        read_golden(tmp_path / "bad.npz", {"x"})
    np.savez(tmp_path / "empty.npz", other=np.zeros(1))
    with pytest.raises(ModelLoadError, match="needs input"):
        read_golden(tmp_path / "empty.npz", {"x"})
    with pytest.raises(ModelLoadError, match="unknown inputs"):
        read_golden(golden_file(tmp_path / "g.npz", 3), {"y"})


# -- memory -------------------------------------------------------------------------------------


def test_peak_memory_covers_an_allocation_after_a_reset() -> None:
    memory.reset_peak()
    before = memory.rss_bytes()
    block = np.ones(64 * 1024 * 1024, np.uint8)  # 64 MiB, touched
    peak = memory.peak_rss_bytes()
    del block
    assert before > 0
    assert peak >= before + 60 * 1024 * 1024


# -- loader priority ----------------------------------------------------------------------------


def test_builds_run_niced_and_their_threads_return_to_serving_priority() -> None:
    import threading

    from edge_agent.runtime.priority import Priority

    priority = Priority(10)
    if not priority.enabled:  # an unprivileged user without RLIMIT_NICE: nothing is lowered
        assert "RLIMIT_NICE" in str(priority.disabled_reason)
        return
    seen: dict[str, int] = {}
    release = threading.Event()

    def pool_thread() -> None:  # stands in for a thread ONNX Runtime spawns during a build
        seen["spawned"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        release.wait(10)
        seen["after"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def loader() -> None:
        priority.lower_this_thread()
        seen["loader"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        with priority.spawned() as spawned:
            child = threading.Thread(target=pool_thread)
            child.start()
            while "spawned" not in seen:
                pass
        priority.restore(spawned)
        release.set()
        child.join()

    runner = threading.Thread(target=loader)
    runner.start()
    runner.join()
    assert seen["loader"] == priority.base + 10
    assert seen["spawned"] == priority.base + 10  # inherited from the loader
    assert seen["after"] == priority.base  # back to serving priority
    assert Priority(0).enabled is False
