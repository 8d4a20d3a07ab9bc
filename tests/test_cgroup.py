"""learn/cgroup.py against a fake cgroup v2 tree in tmp_path, never the real /sys/fs/cgroup.

Doing it for real would move the pytest process itself. The fake is plain files and
directories; `FakeCgroupFs` gives the two operations the code performs the kernel's answers:
mkdir creates a cgroup's interface files, and a write to cgroup.procs moves a pid out of every
other cgroup, "+cpu" in cgroup.subtree_control fails with EBUSY while the cgroup holds a process
and adds cpu.weight (and cpu.idle, Linux 5.15+) to its children. Tests run as root, where a
chmod does not stop a write, so a read-only mount or a cgroup not delegated to us is the fake
answering EROFS or EACCES.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_agent.learn import cgroup

UNIT = "system.slice/edge-agent.service"
AGENT, THREADED_HELPER = 4242, 4243


class FakeCgroupFs:
    def __init__(
        self,
        tmp_path: Path,
        *,
        controllers: str = "cpu io memory pids",
        cpu_idle: bool = True,
        refuse: int | None = None,
    ) -> None:
        self.root = tmp_path / "cgroup"
        self.proc_self = tmp_path / "proc-self-cgroup"
        self.unit = self.root / UNIT
        self.cpu_idle = cpu_idle
        self.refuse = refuse  # errno for every mkdir and write: EROFS, EACCES
        self.on_move: Callable[[int], None] = lambda pid: None
        self.root.mkdir()
        (self.root / "cgroup.controllers").write_text(controllers + "\n")
        (self.root / "cgroup.procs").write_text("1\n")
        self.unit.mkdir(parents=True)
        self._interface(self.unit, controllers)
        (self.unit / "cgroup.procs").write_text(f"{AGENT}\n{THREADED_HELPER}\n")
        self.proc_self.write_text(f"0::/{UNIT}\n")

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_mkdir = os.mkdir

        def mkdir(path: str | os.PathLike[str], mode: int = 0o777, **kwargs: object) -> None:
            target = Path(path)
            if self.root not in target.parents:
                real_mkdir(path, mode)
                return
            if self.refuse is not None:
                raise OSError(self.refuse, os.strerror(self.refuse), str(target))
            real_mkdir(target, mode)
            parent = target.parent
            self._interface(target, (parent / "cgroup.subtree_control").read_text())
            if "cpu" in self._tokens(parent / "cgroup.subtree_control"):
                self._cpu_files(target)

        monkeypatch.setattr(os, "mkdir", mkdir)
        monkeypatch.setattr(cgroup, "_write", self._write)

    def pids(self, directory: Path) -> list[int]:
        return [int(t) for t in self._tokens(directory / "cgroup.procs")]

    def _write(self, path: Path, value: str) -> None:
        if not path.is_file():
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
        if self.refuse is not None:
            raise OSError(self.refuse, os.strerror(self.refuse), str(path))
        directory, value = path.parent, value.strip()
        if path.name == "cgroup.procs":
            self._move(int(value), directory)
        elif path.name == "cgroup.subtree_control":
            self._enable(value, directory)
        else:
            path.write_text(value + "\n")

    def _move(self, pid: int, directory: Path) -> None:
        if "cpu" in self._tokens(directory / "cgroup.subtree_control"):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))  # an inner cgroup
        for procs in self.root.rglob("cgroup.procs"):
            kept = [t for t in self._tokens(procs) if int(t) != pid]
            procs.write_text("".join(f"{t}\n" for t in kept))
        with (directory / "cgroup.procs").open("a") as procs:
            procs.write(f"{pid}\n")
        self.on_move(pid)

    def _enable(self, value: str, directory: Path) -> None:
        assert value == "+cpu", value
        if "cpu" not in self._tokens(directory / "cgroup.controllers"):
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        if self.pids(directory):  # the no-internal-processes rule
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        (directory / "cgroup.subtree_control").write_text("cpu\n")
        for child in directory.iterdir():
            if child.is_dir():
                self._cpu_files(child)

    def _interface(self, directory: Path, controllers: str) -> None:
        for name, text in [
            ("cgroup.controllers", controllers),
            ("cgroup.procs", ""),
            ("cgroup.subtree_control", ""),
            ("cgroup.type", "domain\n"),
        ]:
            (directory / name).write_text(text)

    def _cpu_files(self, directory: Path) -> None:
        (directory / "cpu.weight").write_text("100\n")
        if self.cpu_idle:
            (directory / "cpu.idle").write_text("0\n")

    @staticmethod
    def _tokens(path: Path) -> list[str]:
        return path.read_text().split()


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeCgroupFs:
    fs = FakeCgroupFs(tmp_path)
    fs.install(monkeypatch)
    return fs


def prepare(fs: FakeCgroupFs) -> tuple[Path | None, str]:
    return cgroup.prepare_learning(fs.root, fs.proc_self)


def test_a_delegated_cgroup_is_split_into_serving_and_an_idle_learning(
    fake: FakeCgroupFs,
) -> None:
    learning, knob = prepare(fake)

    assert learning == fake.unit / "learning"
    assert knob == "cpu.idle"
    assert fake.pids(fake.unit) == []
    assert fake.pids(fake.unit / "serving") == [AGENT, THREADED_HELPER]
    assert (fake.unit / "cgroup.subtree_control").read_text().split() == ["cpu"]
    assert (learning / "cpu.idle").read_text().strip() == "1"
    assert (learning / "cpu.weight").read_text().strip() == "100"  # cpu.idle is enough
    assert (fake.unit / "serving" / "cpu.idle").read_text().strip() == "0"
    assert cgroup.prepare_learning(fake.root, fake.proc_self)[0] == learning


def test_a_worker_enters_the_learning_cgroup(fake: FakeCgroupFs) -> None:
    learning, _ = prepare(fake)
    assert learning is not None

    cgroup.enter(learning, 5151)

    assert fake.pids(learning) == [5151]


def test_without_cpu_idle_the_learning_cgroup_gets_the_lowest_weight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = FakeCgroupFs(tmp_path, cpu_idle=False)  # Linux before 5.15
    fs.install(monkeypatch)

    learning, knob = prepare(fs)

    assert learning is not None and knob == "cpu.weight"
    assert (learning / "cpu.weight").read_text().strip() == "1"
    assert (fs.unit / "serving" / "cpu.weight").read_text().strip() == "100"


@pytest.mark.parametrize(
    ("refused", "hint"),
    [(errno.EROFS, "ProtectControlGroups"), (errno.EACCES, "Delegate=")],
    ids=["read-only", "not-delegated"],
)
def test_an_unwritable_cgroup_gives_none_and_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refused: int, hint: str
) -> None:
    fs = FakeCgroupFs(tmp_path, refuse=refused)
    fs.install(monkeypatch)

    learning, reason = prepare(fs)

    assert learning is None
    assert hint in reason and str(fs.unit / "serving") in reason
    assert fs.pids(fs.unit) == [AGENT, THREADED_HELPER]
    assert not (fs.unit / "serving").exists()


def test_cgroup_v1_gives_none(fake: FakeCgroupFs) -> None:
    fake.proc_self.write_text("12:cpu,cpuacct:/system.slice/edge-agent.service\n1:name=systemd:/\n")

    learning, reason = prepare(fake)

    assert learning is None and "cgroup v1" in reason
    assert not (fake.unit / "serving").exists()


def test_a_hybrid_layout_without_cgroup2_at_the_root_gives_none(fake: FakeCgroupFs) -> None:
    (fake.root / "cgroup.controllers").unlink()  # /sys/fs/cgroup a tmpfs of v1 hierarchies

    learning, reason = prepare(fake)

    assert learning is None and "not a cgroup v2 mount" in reason


@pytest.mark.parametrize(
    ("proc_self", "expected"),
    [
        (f"0::/{UNIT}-gone\n", "not under"),
        ("0::/../outside.service\n", "outside this cgroup namespace"),
        ("0::/\n", "root cgroup"),
    ],
    ids=["missing", "outside-namespace", "root-cgroup"],
)
def test_a_cgroup_that_is_not_ours_gives_none(
    fake: FakeCgroupFs, proc_self: str, expected: str
) -> None:
    fake.proc_self.write_text(proc_self)  # (the fake's root, like the real one, has no cgroup.type)

    learning, reason = prepare(fake)

    assert learning is None and expected in reason
    assert not (fake.root / "serving").exists()


def test_an_unreadable_proc_self_cgroup_gives_none(fake: FakeCgroupFs) -> None:
    fake.proc_self.unlink()

    learning, reason = prepare(fake)

    assert learning is None and str(fake.proc_self) in reason


def test_without_the_cpu_controller_nothing_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = FakeCgroupFs(tmp_path, controllers="memory pids")  # Delegate= without cpu
    fs.install(monkeypatch)

    learning, reason = prepare(fs)

    assert learning is None and "Delegate=cpu" in reason
    assert fs.pids(fs.unit) == [AGENT, THREADED_HELPER]
    assert not [child for child in fs.unit.iterdir() if child.is_dir()]


def test_a_second_call_from_inside_serving_returns_the_same_cgroup(fake: FakeCgroupFs) -> None:
    first, _ = prepare(fake)
    fake.proc_self.write_text(f"0::/{UNIT}/serving\n")  # where the kernel now shows us

    second, knob = prepare(fake)

    assert second == first and knob == "cpu.idle"
    assert not (fake.unit / "serving" / "serving").exists()
    assert fake.pids(fake.unit / "serving") == [AGENT, THREADED_HELPER]


def test_a_second_call_finds_the_split_made_by_the_first(fake: FakeCgroupFs) -> None:
    first, _ = prepare(fake)
    (first / "cpu.idle").write_text("0\n")  # whatever happened in between

    second, _ = prepare(fake)

    assert second == first
    assert (second / "cpu.idle").read_text().strip() == "1"
    assert (fake.unit / "cgroup.subtree_control").read_text().split() == ["cpu"]


def test_a_process_forked_during_the_move_is_moved_as_well(fake: FakeCgroupFs) -> None:
    def fork_once(pid: int) -> None:
        if pid == AGENT:
            fake.on_move = lambda pid: None
            with (fake.unit / "cgroup.procs").open("a") as procs:
                procs.write("4244\n")  # forked by a thread before its process was moved

    fake.on_move = fork_once

    learning, _ = prepare(fake)

    assert learning is not None
    assert sorted(fake.pids(fake.unit / "serving")) == [AGENT, THREADED_HELPER, 4244]
    assert fake.pids(fake.unit) == []


def test_a_cgroup_that_never_empties_gives_none(fake: FakeCgroupFs) -> None:
    spawned = iter(range(5000, 6000))

    def keep_forking(pid: int) -> None:
        with (fake.unit / "cgroup.procs").open("a") as procs:
            procs.write(f"{next(spawned)}\n")

    fake.on_move = keep_forking

    learning, reason = prepare(fake)

    assert learning is None and "still holds processes" in reason


def test_enter_writes_the_pid_and_raises_when_refused(tmp_path: Path) -> None:
    group = tmp_path / "learning"
    group.mkdir()
    (group / "cgroup.procs").write_text("")

    cgroup.enter(group, 77)
    cgroup.enter(group, 78)  # one write per pid, as cgroupfs wants

    assert (group / "cgroup.procs").read_text() == "77\n78\n"
    with pytest.raises(OSError):
        cgroup.enter(tmp_path / "gone", 79)
