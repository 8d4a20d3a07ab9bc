"""The documentation's commands run as written.

A code block preceded by ``<!-- example: NAME -->`` is part of example NAME; the blocks of one
example run in order, in one working directory, as a reader would type them. Each command (a
line, with backslash continuations) runs in bash; a command marked ``# runs until stopped`` is
started in the background and waited for (its listening ports, given here), and one that also says
``instead of the one above`` stops the newest background command first. A ``python`` block runs
with this interpreter. A block preceded by ``<!-- output -->`` right after an example's block holds
lines that the last command's output must contain (whitespace collapsed; date-times match any
date-time); ``<!-- output: retry -->`` retries the command until they appear, and
``<!-- output: fails -->`` expects the command to fail with them on stdout or stderr.

The only edits made to a command are the addresses below: every example runs on free ports, so
the tests never collide with a daemon someone already runs on Triton's."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = re.compile(
    r"^<!-- (example: (?P<name>[\w-]+)|output(?:: (?P<how>retry|fails))?) -->\n```(\w*)\n(.*?)^```",
    re.S | re.M,
)
DATETIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


@dataclass
class Block:
    page: str
    language: str
    text: str
    output: list[str] = field(default_factory=list)
    retry: bool = False
    fails: bool = False  # the command must fail, and say so (its stderr is read too)


def blocks(page: Path, name: str) -> list[Block]:
    found: list[Block] = []
    for match in MARK.finditer(page.read_text()):
        language, text = match.group(4), match.group(5)
        if match.group("name") == name:
            found.append(Block(page.name, language, text))
        elif match.group("name") is None and found and text.strip():
            found[-1].output = [line for line in text.splitlines() if line.strip()]
            found[-1].retry = match.group("how") == "retry"
            found[-1].fails = match.group("how") == "fails"
    return found


def commands(text: str) -> list[str]:
    """Shell commands: lines with their backslash continuations joined, and a quoted string that
    spans lines kept whole (as bash reads them); comment lines and blank lines dropped (a trailing
    comment stays: it carries ``runs until stopped``)."""
    out: list[str] = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending and not pending.endswith("\n"):
            line = line.lstrip()  # a continuation's indentation
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
        elif (pending + line).count("'") % 2:  # inside a quoted string: the newline is in it
            pending += line + "\n"
        else:
            out.append(pending + line)
            pending = ""
    assert not pending, f"unterminated command: {pending}"
    return out


def normal(text: str) -> str:
    return DATETIME.sub("DATETIME", " ".join(text.split()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], seconds: float, log: Path) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"exited {process.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.2)
    raise AssertionError(f"port {port} not listening after {seconds} s:\n{log.read_text()[-3000:]}")


class Runner:
    """Runs an example's commands in one directory, with its address substitutions."""

    def __init__(
        self, cwd: Path, addresses: dict[str, str], ports: list[list[int]], env: dict[str, str]
    ):
        self.cwd, self.addresses, self.ports = cwd, addresses, list(ports)
        self.env = {
            **os.environ,
            **env,
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        }
        self.background: list[subprocess.Popen[bytes]] = []
        self.transcript: list[str] = []

    def edit(self, command: str) -> str:
        for doc, real in self.addresses.items():
            command = command.replace(doc, real)
        return command

    def start(self, command: str, wait_seconds: float = 60) -> None:
        if "instead of the one above" in command:
            self.stop(self.background.pop())
        log = self.cwd / f"background-{len(self.background)}.log"
        process = subprocess.Popen(
            ["bash", "-c", self.edit(command)],
            cwd=self.cwd,
            env=self.env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.background.append(process)
        for port in self.ports.pop(0):
            wait_for_port(port, process, wait_seconds, log)

    def run(self, block: Block) -> None:
        if block.language == "python":
            steps = [[sys.executable, "-c", self.edit(block.text)]]
        else:
            steps = []
            for command in commands(block.text):
                if "runs until stopped" in command:
                    self.start(command)
                else:
                    steps.append(["bash", "-c", self.edit(command)])
        for index, argv in enumerate(steps):
            last = index == len(steps) - 1
            if last:
                self.check(argv, block.output, block.retry, block.fails)
            else:
                self.check(argv, [], retry=False, fails=False)

    def check(self, argv: list[str], expected: list[str], retry: bool, fails: bool) -> None:
        deadline = time.monotonic() + (60 if retry else 0)
        while True:
            done = subprocess.run(
                argv, cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=300
            )
            self.transcript.append(f"$ {argv[-1]}\n{done.stdout}{done.stderr}")
            assert (done.returncode != 0) == fails, "\n".join(self.transcript[-3:])
            got = normal(done.stdout + done.stderr if fails else done.stdout)
            missing = [line for line in expected if normal(self.edit(line)) not in got]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"missing {missing} in:\n{done.stdout}")
            time.sleep(1)

    @staticmethod
    def stop(process: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def close(self) -> None:
        while self.background:
            self.stop(self.background.pop())


@contextlib.contextmanager
def runner(
    cwd: Path, addresses: dict[str, str], ports: list[list[int]], env: dict[str, str]
) -> Iterator[Runner]:
    run = Runner(cwd, addresses, ports, env)
    try:
        yield run
    finally:
        run.close()


def agent_ports() -> tuple[dict[str, int], dict[str, str]]:
    """Free ports for an agent's listeners, set through the environment as a reader's settings
    would be, so that a command shown without addresses is run exactly as shown."""
    ports = {name: free_port() for name in ("grpc", "metrics", "control", "http")}
    env = {
        "EDGE_AGENT_GRPC_ADDRESS": f"127.0.0.1:{ports['grpc']}",
        "EDGE_AGENT_METRICS_ADDRESS": f"127.0.0.1:{ports['metrics']}",
        "EDGE_AGENT_CONTROL_ADDRESS": f"127.0.0.1:{ports['control']}",
    }
    return ports, env


def test_the_parser_reads_examples_and_outputs(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- example: x -->\n```sh\na --flag \\\n    b   # runs until stopped\n# note\nc\n```\n"
        "<!-- output: retry -->\n```\nok  1\n```\n<!-- example: y -->\n```sh\nd\n```\n"
    )
    (found,) = blocks(page, "x")
    assert commands(found.text) == ["a --flag b   # runs until stopped", "c"]
    assert found.output == ["ok  1"] and found.retry
    assert normal("at 2026-12-03 09:43:56  ok") == "at DATETIME ok"


def quick_start_command() -> str:
    """The README's first command, which installs and serves."""
    readme = (ROOT / "README.md").read_text()
    quick_start = re.search(r"## Quick start\n.*?```sh\n(.*?)\n", readme, re.S)
    assert quick_start, "README.md has no quick start"
    command = quick_start.group(1)
    assert (
        command == "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/edge-agent serve"
    )
    return command


def checkout_copy(destination: Path) -> Path:
    """The files a fresh clone has (tracked, and new ones not ignored), without this venv."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, listed):
        source = ROOT / name.decode()
        if source.is_file():
            target = destination / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


def test_the_quick_start_and_the_tour_run_as_written(tmp_path: Path) -> None:
    """The README's install-and-serve command in a copy of the checkout (a new venv, `pip install
    .`), then the tour of the README and of Getting started against that daemon."""
    checkout = checkout_copy(tmp_path / "checkout")
    ports, env = agent_ports()
    addresses = {
        "127.0.0.1:8001": f"127.0.0.1:{ports['grpc']}",
        "127.0.0.1:8002": f"127.0.0.1:{ports['metrics']}",
        "127.0.0.1:8000": f"127.0.0.1:{ports['http']}",
    }
    tour = blocks(ROOT / "README.md", "tour") + blocks(ROOT / "docs" / "getting-started.md", "tour")
    assert len(tour) >= 5 and any(b.language == "python" for b in tour)
    # The quick start's serve, then the tour's HTTP serve that replaces it.
    with runner(checkout, addresses, [[ports["grpc"]], [ports["grpc"], ports["http"]]], env) as run:
        run.start(quick_start_command() + "   # runs until stopped", wait_seconds=600)
        for block in tour:
            run.run(block)
        # The tour ran on the freshly installed package, not on this checkout's.
        installed = checkout / ".venv" / "bin" / "edge-agent"
        assert installed.exists()


def test_the_fleet_quick_start_runs_as_written(tmp_path: Path) -> None:
    """Keys, a control plane, one device enrolled and started, a publish it installs, fleet status
    and an inference on the device: docs/fleet/quickstart.md, command for command."""
    (tmp_path / "models").symlink_to(ROOT / "models")
    ports, env = agent_ports()
    control_plane = free_port()
    addresses = {
        "127.0.0.1:8010": f"127.0.0.1:{control_plane}",
        "127.0.0.1:8001": f"127.0.0.1:{ports['grpc']}",
    }
    fleet = blocks(ROOT / "docs" / "fleet" / "quickstart.md", "fleet")
    assert len(fleet) >= 5
    with runner(tmp_path, addresses, [[control_plane], [ports["grpc"]]], env) as run:
        for block in fleet:
            run.run(block)
    assert (tmp_path / "device" / "models" / "digits" / "2" / "model.onnx").exists()


def test_the_troubleshooting_messages_are_the_real_ones(tmp_path: Path) -> None:
    """docs/operations/troubleshooting.md: a daemon on the shipped repository, then each failing
    command with the exact line the page shows."""
    (tmp_path / "models").symlink_to(ROOT / "models")
    ports, env = agent_ports()
    addresses = {
        "127.0.0.1:8001": f"127.0.0.1:{ports['grpc']}",
        "127.0.0.1:8003": f"127.0.0.1:{ports['control']}",
        "127.0.0.1:9102": f"127.0.0.1:{free_port()}",
        "127.0.0.1:9103": f"127.0.0.1:{free_port()}",
    }
    page = blocks(ROOT / "docs" / "operations" / "troubleshooting.md", "troubleshooting")
    assert sum(block.fails for block in page) >= 4
    with runner(tmp_path, addresses, [[ports["grpc"]]], env) as run:
        for block in page:
            run.run(block)
