"""Progress on a terminal (edge_agent/common/progress.py): the real commands run under a
pseudo-terminal against a real control plane show their bytes, phases, epochs and global
versions there; the same commands piped, or with --json, print exactly what they printed before
progress existed. No timing is asserted: a busy machine only makes the commands slower."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import select
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from test_sync import Fleet

from conftest import ROOT, Daemon, wait_for
from edge_agent.common import progress as progress_module
from edge_agent.common.progress import NULL, Progress, progress

DIGITS = ROOT / "models" / "digits" / "1" / "model.onnx"
DIGITS_SET = ROOT / "models" / "digits" / "validation.npz"
# A redraw's line erase or lone carriage return starts a line of its own; other control
# sequences (colours, cursor moves) and the terminal's \r before \n go.
REDRAW = re.compile(r"\x1b\[2K|\r(?!\n)")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


def on_a_terminal(draw: Callable[[io.TextIOWrapper], None]) -> str:
    """What `draw(terminal)` leaves on a pseudo-terminal's screen."""
    master, child_end = os.openpty()
    raw = bytearray()
    with open(child_end, "w") as terminal:
        draw(terminal)
        terminal.flush()
        while select.select([master], [], [], 0.5)[0]:
            raw += os.read(master, 65536)
    os.close(master)
    return screen(bytes(raw))


def screen(raw: bytes) -> str:
    """What a terminal's bytes say: each drawn frame and kept line on lines of their own."""
    return ANSI.sub("", REDRAW.sub("\n", raw.decode(errors="replace")))


# The children's environment: a terminal type that redraws. FORCE_COLOR and TTY_COMPATIBLE
# make rich call a pipe a terminal; the piped runs set them to prove they are not obeyed.
CHILD_ENV = {
    **{k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")},
    "TERM": "xterm-256color",
}
PIPED_ENV = {**CHILD_ENV, "FORCE_COLOR": "1", "TTY_COMPATIBLE": "1"}


class Terminal:
    """`python -m edge_agent ARGS` with a pseudo-terminal as its stderr, and as its stdout too
    unless `stdout_piped`. A thread drains the terminal as the child writes (a full one would
    block it); `text` is what arrived, control sequences removed."""

    def __init__(self, *args: str, stdout_piped: bool = False) -> None:
        master, child_end = os.openpty()
        # 120 columns: the live lines fit without wrapping, whatever the test runner's width.
        fcntl.ioctl(child_end, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self._master = master
        self._raw = bytearray()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge_agent", *args],
            cwd=ROOT,
            env=CHILD_ENV,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_piped else child_end,
            stderr=child_end,
        )
        os.close(child_end)  # the child holds it now: EOF once the child is gone
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        while True:
            ready, _, _ = select.select([self._master], [], [], 1.0)
            if not ready:
                continue
            try:
                data = os.read(self._master, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                return
            if not data:
                return
            self._raw += data

    @property
    def text(self) -> str:
        return screen(bytes(self._raw))

    def finish(self, timeout: float = 300) -> tuple[int, str, str]:
        """(exit code, the terminal's text, stdout when piped)."""
        stdout = self.proc.communicate(timeout=timeout)[0] if self.proc.stdout else b""
        self.proc.wait(timeout)
        self._reader.join(30)
        os.close(self._master)
        return self.proc.returncode, self.text, (stdout or b"").decode()


def on_terminal(*args: str, stdout_piped: bool = False) -> tuple[int, str, str]:
    return Terminal(*args, stdout_piped=stdout_piped).finish()


def piped(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", *args], cwd=ROOT, env=PIPED_ENV,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def no_progress(text: str) -> None:
    """Nothing progress draws or keeps: no control sequence, no spinner, none of its lines."""
    assert "\x1b" not in text
    assert not re.search(r"done in [\d.]+ s|epoch \d+/\d+|eta |uploading ", text), text


# Off a terminal: the no-op.


def test_off_a_terminal_progress_is_the_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich's own test would call the pipe a terminal
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    stream = io.StringIO()
    with progress(stream=stream) as shown:
        assert shown is NULL and not shown.active
        shown.phase("loading")
        shown.epoch(1, 2, 0.5)
        shown.status("task 1 running")
        shown.line("global v1: accuracy 0.9")
        with shown.transfer("uploading", 10) as sent:
            sent(10)
    assert stream.getvalue() == ""

    class Closed(io.StringIO):
        def isatty(self) -> bool:
            raise ValueError("I/O operation on closed file")

    assert not progress_module.is_terminal(Closed())
    with progress(stream=Closed()) as shown:
        assert shown is NULL
    # rich is not even imported for it (a command's start stays as quick as before).
    code = (
        "import sys; from edge_agent.common.progress import progress\n"
        "with progress() as p: p.phase('x')\n"
        "print('rich' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=PIPED_ENV, capture_output=True, text=True
    )
    assert (done.stdout, done.stderr) == ("False\n", "")


def test_on_a_terminal_but_disabled_it_is_the_no_op_too() -> None:
    master, child_end = os.openpty()
    with open(child_end, "w") as terminal, progress(enabled=False, stream=terminal) as shown:
        assert progress_module.is_terminal(terminal)
        assert shown is NULL
    os.close(master)


def test_on_a_terminal_it_draws_and_keeps_its_lines() -> None:
    def draw(terminal: io.TextIOWrapper) -> None:
        with progress(stream=terminal) as shown:
            assert isinstance(shown, Progress) and shown.active
            shown.phase("calibrating [int8]")  # brackets are not markup
            shown.phase("fine-tuning")
            shown.epoch(1, 2, 0.75)
            shown.epoch(2, 2, 0.5)
            with shown.transfer("uploading mlp v1", 3_000_000) as sent:
                for _ in range(3):
                    sent(1_000_000)
            shown.status("task 1 running")
            shown.line("global v1: accuracy 0.9000")

    text = on_a_terminal(draw)
    assert re.search(r"calibrating \[int8\]: done in [\d.]+ s", text)
    assert "epoch 1/2  loss 0.7500" in text and "epoch 2/2  loss 0.5000" in text
    assert re.search(r"uploading mlp v1: 3\.0 MB in [\d.]+ s", text)
    assert "global v1: accuracy 0.9000" in text


def test_a_failed_step_is_not_shown_as_done_and_a_late_callback_is_dropped() -> None:
    late: list[Callable[[int], None]] = []

    def draw(terminal: io.TextIOWrapper) -> None:
        with pytest.raises(RuntimeError, match="register"), progress(stream=terminal) as shown:
            with contextlib.suppress(ConnectionError), shown.transfer("uploading", 10) as sent:
                late.append(sent)
                sent(4)
                raise ConnectionError("the upload failed")
            # gRPC's request thread may still resume the stream once the transfer is over.
            late[0](6)
            shown.phase("registering the release")
            raise RuntimeError("register failed")

    text = on_a_terminal(draw)
    assert re.search(r"registering the release: failed after [\d.]+ s", text)
    assert "registering the release: done" not in text
    # A failed transfer leaves no total line behind (its error says what happened).
    assert "uploading:" not in text


def test_the_upload_stream_counts_every_byte_it_sends(tmp_path: Path) -> None:
    from edge_agent.fleet.connect import upload_chunks
    from edge_agent.fleet.release import CHUNK_SIZE

    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(2 * CHUNK_SIZE + 123))
    counted: list[int] = []
    sent_before: list[int] = []
    for message in upload_chunks("d", blob, counted.append):
        sent_before.append(sum(counted))  # a chunk counts once gRPC has taken it, not before
        assert message.size == blob.stat().st_size
    assert counted == [CHUNK_SIZE, CHUNK_SIZE, 123]
    assert sent_before == [0, CHUNK_SIZE, 2 * CHUNK_SIZE]
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert [m.data for m in upload_chunks("e", empty, counted.append)] == [b""]


def test_training_reports_each_epoch_and_its_loss() -> None:
    pytest.importorskip("torch", reason="the learn extra (PyTorch) is part of the test install")
    import onnx

    from edge_agent.learn.train import TrainSpec, train

    data = np.load(DIGITS_SET)
    x, y = data["input"][:64].astype(np.float32), data["labels"][:64].astype(np.int64)
    seen: list[tuple[int, float]] = []
    spec = TrainSpec(epochs=3, trainable="last:1")
    result = train(
        onnx.load(str(DIGITS)), {"input": x}, y, spec, after_epoch=lambda *e: seen.append(e)
    )
    assert [n for n, _ in seen] == [1, 2, 3] and result.epochs == 3
    assert all(np.isfinite(loss) and loss > 0 for _, loss in seen)


# The commands.


def test_publish_shows_its_upload_on_a_terminal_only(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    fleet = Fleet(tmp_path, start_daemon)
    # A 1024-wide hidden layer: a 4 MiB blob, sent as several chunks.
    models = [fleet.mlp(seed, width=1024) for seed in (1, 2, 3, 4)]

    def publish(version: int) -> list[str]:
        return [
            "publish", str(models[version - 1]), "--model", "mlp", "--version", str(version),
            "--control-plane", fleet.address, "--signing-key", str(fleet.key),
            "--token-file", str(fleet.token_file),
        ]  # fmt: skip

    code, text, _ = on_terminal(*publish(1))
    assert code == 0, text
    assert "splitting and signing the release: done in" in text
    assert re.search(r"uploading mlp v1 \(\d+ of \d+ blobs\): 4\.\d MB in [\d.]+ s", text), text
    assert re.search(r"asking the control plane which blobs it has: done in", text), text
    assert "registering the release: done in" in text
    assert re.search(r"published mlp v1: .* uploaded 4,\d{3},\d{3} B", text)

    # stderr a terminal, stdout a pipe: the progress is on the terminal, stdout is the answer.
    code, text, stdout = on_terminal(*publish(2), stdout_piped=True)
    assert code == 0, text
    assert "uploading mlp v2" in text and "published" not in text
    no_progress(stdout)
    lines = stdout.splitlines()
    assert re.fullmatch(r"published mlp v2: .* uploaded [\d,]+ B \(the rest was .*\)", lines[0])
    assert lines[1].startswith("rollout ") and len(lines) == 2

    done = piped(*publish(3))  # piped: exactly the lines publish printed before progress
    assert done.returncode == 0 and done.stderr == ""
    no_progress(done.stdout)
    assert re.fullmatch(
        r"published mlp v3: .* uploaded [\d,]+ B \(the rest was on the control plane already\)\n"
        r"rollout \d+: mlp v3 fleet .*\n",
        done.stdout,
    )

    code, text, _ = on_terminal(*publish(4), "--json")  # --json on a terminal: JSON alone
    assert code == 0, text
    no_progress(text)
    answer = json.loads(text)
    assert answer["model"] == "mlp" and int(answer["version"]) == 4


def test_optimize_and_distill_show_phases_and_epochs_on_a_terminal_only(tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="the learn extra (PyTorch) is part of the test install")
    from test_learning import small_student

    def optimize(mode: str, out: str, *extra: str) -> list[str]:
        return [
            "optimize", str(DIGITS), "--mode", mode, "--out", str(tmp_path / out),
            "--validation", str(DIGITS_SET), *extra,
        ]  # fmt: skip

    tune = optimize(
        "prune", "tuned.onnx", "--fine-tune", str(DIGITS_SET), "--fine-tune-epochs", "2"
    )
    code, text, _ = on_terminal(*tune)
    assert code == 0, text
    for phase in (
        "loading the model and data",
        "pruning 50% of each weight matrix",
        "fine-tuning (2 epochs, the mask held)",
        "measuring sizes",
        "measuring latency",
        "measuring accuracy on validation.npz",
    ):
        assert re.search(re.escape(phase) + r": done in [\d.]+ s", text), (phase, text)
    assert re.search(r"epoch 1/2  loss \d+\.\d{4}", text) and "epoch 2/2  loss" in text
    assert "mode prune:" in text  # the answer, after the progress

    # The answer on stdout is the same with progress on stderr as with none at all; only the
    # latency figures, measured afresh by each run, differ.
    def answer(stdout: str) -> list[str]:
        return [line for line in stdout.splitlines() if not line.startswith("  latency")]

    code, text, with_terminal = on_terminal(*tune, stdout_piped=True)
    assert code == 0 and "epoch 2/2" in text and "mode prune" not in text
    done = piped(*tune)
    assert done.returncode == 0 and done.stderr == ""
    no_progress(done.stdout)
    no_progress(with_terminal)
    assert answer(done.stdout) == answer(with_terminal)
    assert answer(done.stdout)[0] == f"mode prune: {DIGITS} -> {tmp_path / 'tuned.onnx'}"

    static = optimize("int8-static", "int8.onnx", "--calibration", str(DIGITS_SET))
    code, text, _ = on_terminal(*static)
    assert code == 0, text
    assert re.search(r"calibrating on \d+ rows \(int8-static\): done in", text), text
    assert "quantizing (int8-static): done in" in text
    done = piped(*static)
    assert done.returncode == 0 and done.stderr == ""
    no_progress(done.stdout)

    student = small_student(tmp_path / "student.onnx")
    distill = [
        "distill", "--teacher", str(DIGITS), "--student", str(student), "--data",
        str(DIGITS_SET), "--out", str(tmp_path / "distilled.onnx"), "--epochs", "2",
    ]  # fmt: skip
    code, text, _ = on_terminal(*distill)
    assert code == 0, text
    assert "distilling (2 epochs): done in" in text and "epoch 2/2  loss" in text
    assert "measuring the untrained student: done in" in text
    done = piped(*distill)
    assert done.returncode == 0 and done.stderr == ""
    no_progress(done.stdout)
    assert done.stdout.startswith("mode distill:")


def test_learn_start_wait_shows_global_versions_on_a_terminal_only(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    pytest.importorskip("torch", reason="the learn extra (PyTorch) is part of the test install")
    from test_learning import LearningFleet, _global, _published_fakes, _upload, split

    fleet = LearningFleet(tmp_path, start_daemon)
    fake = _published_fakes(fleet, 2)
    validation = fleet.npz("validation", *split()["validation"])
    remote = ["--control-plane", fleet.address, "--token-file", str(fleet.token_file)]
    start = [
        "learn", "start", "--model", "digits", "--validation", str(validation), "--buffer", "2",
        "--trainable", "last:1", "--max-accuracy-drop", "1", "--wait", *remote,
    ]  # fmt: skip

    def newest_task() -> int:
        stub, meta = fleet.stub()
        from edge_agent._proto import fleet_pb2 as pb

        tasks = stub.LearningStatus(pb.LearningStatusRequest(), metadata=meta).tasks
        return max((t.id for t in tasks), default=0)

    def stop(task_id: int) -> None:
        fleet.learn("stop", "--task", str(task_id))

    def printed_id(terminal: Terminal) -> int:
        found = re.search(r"^(\d+)$", terminal.text, re.MULTILINE)
        return int(found.group(1)) if found else 0

    watching = Terminal(*start)
    task_id = wait_for(lambda: printed_id(watching), "the task id", 120)
    wait_for(lambda: "global v0 (release v1): accuracy" in watching.text, "the base's line", 120)
    _, weights = _global(fake["d0"], task_id)
    small = {n: np.full(v.shape, 1e-3, np.float32) for n, v in weights.items()}
    for device in fake.values():
        assert _upload(device, task_id, small) == "buffered"
    wait_for(lambda: "global v1: accuracy" in watching.text, "the first global's line", 120)
    stop(task_id)
    code, text, _ = watching.finish()
    assert code == 0, text
    assert re.search(r"uploading validation\.npz: [\d.]+ kB in [\d.]+ s", text), text
    assert re.search(r"global v1: accuracy \d\.\d{4}, accepted, 2 updates", text), text
    assert f"task {task_id} running: v" in text  # the live status line
    assert f"task {task_id}: digits from v1 stopped" in text  # `learn status`'s block at the end

    # Piped: the id, then at the end `learn status`'s text; nothing on stderr.
    waiting = subprocess.Popen(
        [sys.executable, "-m", "edge_agent", *start], cwd=ROOT, env=PIPED_ENV,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    second = wait_for(lambda: (n := newest_task()) > task_id and n, "the second task", 120)
    stop(second)
    stdout, stderr = waiting.communicate(timeout=120)
    assert waiting.returncode == 0 and stderr == ""
    no_progress(stdout)
    assert "global v0 (release" not in stdout
    first, block = stdout.split("\n", 1)
    assert first == str(second)
    assert re.match(rf"task {second}: digits from v\d+ stopped", block)  # v2: the first's release
    assert fleet.learn("status", "--task", str(second)).stdout == block

    # --json --wait on a terminal: one JSON document, the task as it ended; no progress.
    watching = Terminal(*start, "--json")
    third = wait_for(lambda: (n := newest_task()) > second and n, "the third task", 120)
    stop(third)
    code, text, _ = watching.finish()
    assert code == 0, text
    no_progress(text)
    task = json.loads(text)
    assert task["state"] == "stopped" and int(task["id"]) == third


class _Refused(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "the control plane is restarting"


class _FlakyStatus:
    """LearningStatus answering `failures` first, then the task."""

    def __init__(self, failures: list[grpc.StatusCode], task: object) -> None:
        self.failures, self.task, self.calls = list(failures), task, 0

    def LearningStatus(self, request: object, metadata: object, timeout: float) -> object:
        self.calls += 1
        if self.failures:
            raise _Refused(self.failures.pop(0))
        from edge_agent._proto import fleet_pb2 as pb

        return pb.LearningStatusResponse(tasks=[self.task])


def test_learn_wait_rides_out_a_restarting_control_plane_and_gives_up_on_the_rest(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from edge_agent._proto import fleet_pb2 as pb
    from edge_agent.learn import cli as learn_cli

    monkeypatch.setattr(learn_cli, "WAIT_POLL_SECONDS", 0.0)
    running = pb.LearningTask(id=7, state="running")
    stopped = pb.LearningTask(id=7, state="stopped")
    transient = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED]
    stub = _FlakyStatus(transient, stopped)
    assert learn_cli._poll(stub, (), 7, NULL).state == "stopped"
    assert stub.calls == 3
    # Not a transient answer: no retry, and the wait ends with exit 1 and the hint.
    stub = _FlakyStatus([grpc.StatusCode.PERMISSION_DENIED], stopped)
    code = learn_cli._wait_and_show(stub, (), running, as_json=False)
    err = capsys.readouterr().err
    assert code == 1 and stub.calls == 1
    assert "PERMISSION_DENIED" in err and "task 7 runs on" in err and "learn stop --task 7" in err
    # Transient for longer than the wait rides out: it gives up too.
    monkeypatch.setattr(learn_cli, "WAIT_GIVE_UP_SECONDS", 0.0)
    stub = _FlakyStatus([grpc.StatusCode.UNAVAILABLE] * 3, stopped)
    assert learn_cli._wait_and_show(stub, (), running, as_json=True) == 1
    assert stub.calls == 1 and "UNAVAILABLE" in capsys.readouterr().err
