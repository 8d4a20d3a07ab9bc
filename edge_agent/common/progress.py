"""Progress for the long commands (publish's uploads, optimize, distill, learn start --wait), on a
terminal only: bytes with their rate and ETA, the current phase, epochs with their loss, and lines
as events come.

A command opens `progress(enabled=not args.json)` and calls what it yields. When stderr is not a
terminal (piped, redirected, a service's journal) or the command prints --json, it yields `NULL`,
whose every method does nothing: the command's output is what it was before progress existed.
Progress is written to stderr only, never stdout, and never while the command prints its answer.

Only this module imports rich, and only once it has found a terminal. The code the commands call
(compression, training, the upload stream) takes plain callbacks, e.g. `phase(name)` or
`advance(nbytes)`, so it neither depends on rich nor pays for progress off a terminal.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    import rich.progress

# What a transfer's callback takes: the bytes just sent (or received).
Advance = Callable[[int], None]


def _ignore(nbytes: int) -> None:
    del nbytes


class Progress:
    """What a command reports. This base class does nothing: it is what off-terminal runs get."""

    # Whether anything is shown: a caller may skip work done only for progress.
    active = False

    @contextlib.contextmanager
    def transfer(self, description: str, total: int) -> Iterator[Advance]:
        """A byte count towards `total` (it ends the current phase); yields the callback to give
        each chunk's size to."""
        del description, total
        yield _ignore

    def phase(self, name: str) -> None:
        """The command has moved on to `name` (the one before it is done)."""

    def epoch(self, done: int, total: int, loss: float) -> None:
        """Training in the current phase finished epoch `done` of `total` with this loss."""

    def status(self, text: str) -> None:
        """The one line of how things stand now (replaced by the next)."""

    def line(self, text: str) -> None:
        """An event worth keeping on screen (printed above the live lines)."""


NULL = Progress()


def is_terminal(stream: TextIO) -> bool:
    """`stream.isatty()`, asked ourselves: rich's own test also says yes when FORCE_COLOR or
    TTY_COMPATIBLE=1 is set in the environment (CI sets them), even on a pipe."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty is not None and isatty())
    except ValueError:  # a closed stream
        return False


@contextlib.contextmanager
def progress(enabled: bool = True, stream: TextIO | None = None) -> Iterator[Progress]:
    """Progress on `stream` (default stderr) when it is a terminal and `enabled`; else `NULL`.
    Whatever the command prints must come after this block: the live lines are erased at its
    end, leaving the lines the command kept (phases done, transfers' totals, events)."""
    stream = sys.stderr if stream is None else stream
    if not enabled or not is_terminal(stream):
        yield NULL
        return
    shown = _Terminal(_bars(stream, redirect_stderr=stream is sys.stderr))
    with shown.bars:
        try:
            yield shown
        except KeyboardInterrupt:
            shown.finish_phase("interrupted after")
            raise
        except BaseException:
            # The command's own error message follows the block: the phase did not finish.
            shown.finish_phase("failed after")
            raise
        shown.finish_phase()


class _Terminal(Progress):
    active = True

    def __init__(self, bars: rich.progress.Progress) -> None:
        self.bars = bars
        self._phase: tuple[Any, str, float] | None = None  # (task, name, started)
        self._status: Any = None

    @contextlib.contextmanager
    def transfer(self, description: str, total: int) -> Iterator[Advance]:
        self.finish_phase()  # a transfer is a step of its own
        task = self.bars.add_task(description, total=total, kind="bytes")
        started = time.monotonic()

        def advance(nbytes: int) -> None:
            # Called on gRPC's thread that reads the request stream (rich's Progress locks),
            # which may still resume once a failed upload has ended the transfer: the display
            # must never fail the upload, so a call for a task that is gone is dropped.
            with contextlib.suppress(KeyError, IndexError):
                self.bars.advance(task, nbytes)

        try:
            yield advance
        finally:
            sent = int(self.bars.tasks[self.bars.task_ids.index(task)].completed)
            self.bars.remove_task(task)
        # Reached when the transfer succeeded (a failure's own message follows the block).
        from rich.filesize import decimal

        seconds = time.monotonic() - started
        rate = f", {decimal(int(sent / seconds))}/s" if seconds > 0 else ""
        self.line(f"{description}: {decimal(sent)} in {seconds:.1f} s{rate}")

    def phase(self, name: str) -> None:
        self.finish_phase()
        self._phase = (self.bars.add_task(name, total=None, kind="phase"), name, time.monotonic())

    def finish_phase(self, outcome: str = "done in") -> None:
        if self._phase is None:
            return
        task, name, started = self._phase
        self._phase = None
        self.bars.remove_task(task)
        self.line(f"{name}: {outcome} {time.monotonic() - started:.1f} s")

    def epoch(self, done: int, total: int, loss: float) -> None:
        if self._phase is None:
            self.phase("training")
        assert self._phase is not None
        self.bars.update(self._phase[0], total=total, completed=done, kind="epochs", loss=loss)
        self.line(f"  epoch {done}/{total}  loss {loss:.4f}")

    def status(self, text: str) -> None:
        if self._status is None:
            self._status = self.bars.add_task(text, total=None, kind="status")
        else:
            self.bars.update(self._status, description=text)

    def line(self, text: str) -> None:
        # rich redraws its last frame below a printed line: a fresh one, not one with the bar of
        # a transfer that has just ended.
        self.bars.refresh()
        # Printed as given: a model or file name in brackets is not rich markup.
        self.bars.console.print(text, markup=False, highlight=False, soft_wrap=True)


def _bars(stream: TextIO, redirect_stderr: bool) -> rich.progress.Progress:
    """rich's live display on `stream`: a spinner, the description, a bar where there is a
    total, and what each kind of task counts (bytes and their rate, epochs, time).
    `redirect_stderr`: other writes to stderr (a library's warning) print above the display
    instead of into it."""
    import rich.progress
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        ProgressColumn,
        SpinnerColumn,
        Task,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    from rich.text import Text

    class Bar(BarColumn):
        def render(self, task: Task) -> Any:
            measured = task.fields.get("kind") in ("bytes", "epochs") and task.total
            return super().render(task) if measured else Text("")

    class Detail(ProgressColumn):
        def __init__(self) -> None:
            super().__init__()
            self._size, self._rate = DownloadColumn(), TransferSpeedColumn()
            self._eta, self._elapsed = TimeRemainingColumn(), TimeElapsedColumn()

        def render(self, task: Task) -> Text:
            kind = task.fields.get("kind")
            if kind == "bytes":
                return Text.assemble(
                    self._size.render(task), "  ", self._rate.render(task), "  eta ",
                    self._eta.render(task),
                )  # fmt: skip
            if kind == "epochs":
                epochs = f"epoch {int(task.completed)}/{int(task.total or 0)}"
                loss = f"loss {task.fields.get('loss', float('nan')):.4f}"
                return Text.assemble(f"{epochs}  {loss}  ", self._elapsed.render(task))
            return self._elapsed.render(task)

    # The terminal test was ours (is_terminal); rich must not redo it with FORCE_COLOR and co.
    console = Console(file=stream, force_terminal=True)
    return rich.progress.Progress(
        SpinnerColumn(),
        TextColumn("{task.description}", markup=False),
        Bar(bar_width=20),  # rich's 40 leaves too little of 80 columns for the figures
        Detail(),
        console=console,
        transient=True,
        # Left alone, rich would reroute the process' stdout into its display on stderr.
        redirect_stdout=False,
        redirect_stderr=redirect_stderr,
    )
