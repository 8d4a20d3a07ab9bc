"""A CPU-idle cgroup for local training, where systemd delegates the agent's cgroup to it.

Training shares the device's CPU with serving. The worker lowers itself (nice 19, SCHED_IDLE),
but that is per thread, set by the worker's own code once it runs, and kept only as long as
nothing in it changes its own policy. A cgroup v2 sibling of serving marked `cpu.idle` holds
everything the worker and its children run at idle priority against serving from the moment the
agent moves it there, whatever they do to themselves, and its cpu.stat counts training's CPU time
apart from serving's.

Under systemd with `Delegate=cpu` (systemd/edge-agent.service) the agent owns the subtree below
its unit's cgroup. cgroup v2 lets a cgroup hand a controller to its children only while it holds
no process itself (the no-internal-processes rule), so `prepare_learning` builds:

    <the unit's cgroup>/      cgroup.subtree_control: +cpu
        serving/              the agent, its threads and whatever it starts later
        learning/             cpu.idle = 1 (Linux 5.15+), else cpu.weight = 1

and the agent moves each worker into `learning/` with `enter`. Anywhere else (outside systemd,
no delegation, cgroup v1, a read-only /sys/fs/cgroup) `prepare_learning` returns None and the
reason, which the caller logs once; nothing is raised, the daemon serves as before, and
training keeps only the worker's own priority. Every path is a parameter, so the tests run
against a fake tree.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path, PurePosixPath

SERVING = "serving"
LEARNING = "learning"

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")

# Most passes at emptying the unit's cgroup: a thread may fork between reading cgroup.procs and
# moving its own process, and the kernel then answers the "+cpu" write with EBUSY.
_MOVE_PASSES = 3


class _Unavailable(Exception):
    """Why there is no learning cgroup; its message is the reason the caller logs."""


def prepare_learning(
    root: Path = CGROUP_ROOT, proc_self: Path = PROC_SELF_CGROUP
) -> tuple[Path | None, str]:
    """Split this process's delegated cgroup into serving/ and an idle learning/; repeatable.

    Returns `(learning directory, the knob that made it idle: "cpu.idle" or "cpu.weight")`, or
    `(None, reason)` when the process is not in a writable cgroup v2 subtree with the cpu
    controller; it never raises for that. Calling it again (a second task, the agent restarted
    inside the same unit, or this very process from inside serving/) finds the split made and
    returns the same directory. Call it early at startup, before READY=1: systemd's delegation
    rules expect the service to have left its unit's cgroup by then.
    """
    try:
        base = _delegated_cgroup(root, proc_self)
        learning = _split(base)
        return learning, _make_idle(learning)
    except _Unavailable as exc:
        return None, str(exc)


def enter(cgroup: Path, pid: int) -> None:
    """Move process `pid`, all its threads, into `cgroup`; OSError when the kernel refuses."""
    _write(cgroup / "cgroup.procs", f"{pid}\n")


def _delegated_cgroup(root: Path, proc_self: Path) -> Path:
    """This process's cgroup v2 directory below `root`, unless it is the root cgroup."""
    try:
        lines = proc_self.read_text().splitlines()
    except OSError as exc:
        raise _Unavailable(f"cannot read {proc_self}: {exc.strerror or exc}") from exc
    # cgroup v2 is the line with hierarchy 0 and no controller list; v1-only systems have none.
    own = next((line[3:] for line in lines if line.startswith("0::")), None)
    if own is None:
        raise _Unavailable("no cgroup v2 hierarchy (cgroup v1 only)")
    parts = PurePosixPath(own).parts
    if not own.startswith("/") or ".." in parts:
        raise _Unavailable(f"own cgroup {own!r} lies outside this cgroup namespace")
    if not (root / "cgroup.controllers").is_file():
        raise _Unavailable(f"{root} is not a cgroup v2 mount (cgroup v1 or hybrid layout)")
    path = root.joinpath(*parts[1:])
    if not (path / "cgroup.controllers").is_file():
        raise _Unavailable(f"own cgroup {own} is not under {root}")
    # Only the real root cgroup lacks cgroup.type; it belongs to the init system, never to us.
    if not (path / "cgroup.type").is_file():
        raise _Unavailable("in the root cgroup: nothing is delegated")
    # Already split (this process, or one started from it, calling again): the base is one up.
    if path.name == SERVING and (path.parent / LEARNING).is_dir():
        path = path.parent
    return path


def _split(base: Path) -> Path:
    """Make serving/ and learning/ below `base`, move base's processes, enable cpu for both."""
    if "cpu" not in _tokens(base / "cgroup.controllers"):
        raise _Unavailable(f"the cpu controller is not delegated to {base} (Delegate=cpu)")
    serving, learning = base / SERVING, base / LEARNING
    for child in (serving, learning):
        try:
            child.mkdir(exist_ok=True)
        except OSError as exc:
            raise _Unavailable(_refused(child, exc)) from exc
    control = base / "cgroup.subtree_control"
    if "cpu" not in _tokens(control):  # else split earlier, and base/ holds no process
        _enable_cpu(control, base, serving)
    return learning


def _enable_cpu(control: Path, base: Path, serving: Path) -> None:
    for _ in range(_MOVE_PASSES):
        _move_all(base, serving)
        try:
            _write(control, "+cpu\n")
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:  # EBUSY: a process is left in base/, move it too
                raise _Unavailable(_refused(control, exc)) from exc
    raise _Unavailable(f"{control}: {base} still holds processes after {_MOVE_PASSES} moves")


def _move_all(base: Path, serving: Path) -> None:
    for pid in _pids(base / "cgroup.procs"):
        try:
            enter(serving, pid)
        except ProcessLookupError:
            continue  # exited since cgroup.procs was read
        except OSError as exc:
            raise _Unavailable(f"pid {pid}: {_refused(serving / 'cgroup.procs', exc)}") from exc


def _make_idle(learning: Path) -> str:
    # cpu.idle (Linux 5.15+) puts the whole cgroup at SCHED_IDLE against its siblings; before it,
    # the lowest weight (1 against serving's default 100) is the nearest the cpu controller has.
    errors = []
    for knob in ("cpu.idle", "cpu.weight"):
        path = learning / knob
        if not path.exists():
            continue
        try:
            _write(path, "1\n")
            return knob
        except OSError as exc:
            errors.append(_refused(path, exc))
    raise _Unavailable("; ".join(errors) or f"{learning} has neither cpu.idle nor cpu.weight")


def _refused(path: Path, exc: OSError) -> str:
    """A reason an operator can act on, for a write to cgroupfs that failed."""
    if exc.errno == errno.EROFS:
        why = "read-only file system (ProtectControlGroups=yes without this cgroup writable)"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        why = "permission denied (the unit's cgroup is not delegated: Delegate=)"
    else:
        why = exc.strerror or str(exc)
    return f"{path}: {why}"


def _tokens(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError as exc:
        raise _Unavailable(f"cannot read {path}: {exc.strerror or exc}") from exc


def _pids(path: Path) -> list[int]:
    return [int(token) for token in _tokens(path)]


def _write(path: Path, value: str) -> None:
    # One write(2) per value, unbuffered: cgroupfs parses exactly one value per write, and
    # reports a refusal (EBUSY, EACCES, ESRCH) as that write's error. O_APPEND changes nothing
    # on cgroupfs but lets a plain-file fake in the tests keep every value written.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)
