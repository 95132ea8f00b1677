"""What the scheduler keeps watch with: the results dir's lock (one runner at a time), the tail of a
task's events.jsonl, how a worker's exit by a signal reads, and Ctrl-C/SIGTERM while a run goes on."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import sys
import threading
from pathlib import Path

from runner.contracts import read_events
from runner.errors import UserError


class RunnerLock:
    """An flock on <results>/runner.lock holding the owner's pid; released when the process dies."""

    def __init__(self, results: Path) -> None:
        self.path = results / "runner.lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        import stat

        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:  # never through a link: the pid written below would land in the file it points at
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError:
            if not (self.path.is_symlink() or self.path.is_dir()):
                raise  # a read-only or full disk, no permission: said as such further up
            what = "a link" if self.path.is_symlink() else "a directory"
            raise UserError(f"{self.path} is {what}, not byol-runner's lock file: remove it (no runner is using it) and "
                            "run again") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UserError(f"{self.path} is not a regular file (a FIFO or a device), not byol-runner's lock file: remove it "
                            "and run again")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode().strip() or "unknown"
            os.close(fd)
            raise UserError(
                f"another byol-runner (pid {owner}) is running on {self.path.parent}: wait for it, stop it, "
                "or use another --results"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class EventTail:
    """New complete lines of a task's events.jsonl since the last read: from its current end, or, for
    an adopted attempt, from the start with only the events newer than `after_ts`."""

    def __init__(self, path: Path, after_ts: float | None = None) -> None:
        self.after_ts = after_ts
        self.path, self.offset = path, 0 if after_ts is not None else (path.stat().st_size if path.exists() else 0)
        self.last_error: str | None = None
        self.last_error_type: str | None = None

    def read(self) -> list[dict]:
        events, self.offset = read_events(self.path, self.offset)
        if self.after_ts is not None:
            events = [e for e in events if (e.get("ts") or 0) > self.after_ts]
        for e in events:
            if e.get("kind") == "error":
                self.last_error, self.last_error_type = e.get("message"), e.get("error_type")
        return events


OUTSIDE_KILLS = 3  # kills from outside a task survives in one run before they count as its failure


def killed_from_outside(code: int, error_type: str | None) -> bool:
    """SIGKILL, SIGTERM or SIGINT that byol-runner did not send (the runner's own stops take other paths):
    the worker says nothing (SIGKILL), says it was stopped or interrupted (SIGTERM, SIGINT: exit 143 or
    130), or its executor says it was killed. Not the task's fault, so not one of its retries."""
    signals = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)
    return code in (*(-s for s in signals), *(128 + s for s in signals)) and error_type in (None, "killed", "interrupted")


def signal_text(code: int) -> str:
    sig = -code if code < 0 else code - 128
    return f"killed ({signal.Signals(sig).name}, exit {code})"


def _detach_output() -> None:
    """Point stdout and stderr at /dev/null: writing to a closed terminal fails (EIO), and a stop must not
    fail half way for want of a screen."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            os.dup2(null, fd)
        os.close(null)
    except OSError:
        pass


class ReportInterrupted(KeyboardInterrupt):
    """A stop while a finished run's report was written: its tasks are recorded, the report is not."""


def stop_signals() -> list[int]:
    """SIGINT, SIGTERM and SIGHUP, less those this process was started with ignored: `nohup` ignores
    SIGHUP (the user asked the run to outlive its terminal) and a shell without job control ignores
    SIGINT for a background job (`cmd &`); a stop handler there would undo that choice."""
    return [sig for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) if signal.getsignal(sig) != signal.SIG_IGN]


def _quiet_interrupts(previous):  # noqa: ANN001, ANN202
    """An unraisablehook. Python runs finalizers and weakref callbacks (garbage collection) between any
    two bytecodes; a KeyboardInterrupt a signal handler raises inside one is printed as 'Exception
    ignored in ...' with a traceback, and dropped: the stop would be lost, with a traceback said. While
    the handlers below are in place such a KeyboardInterrupt is not printed, and the stop is raised
    again at their next check (found by bench/damage.py: SIGTERM while the report's figures were drawn)."""

    def hook(unraisable) -> None:  # noqa: ANN001
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            return
        previous(unraisable)

    return hook


@contextlib.contextmanager
def stops_as_interrupt():  # noqa: ANN201
    """SIGTERM and SIGHUP raise KeyboardInterrupt inside the block, as Ctrl-C does, instead of ending the
    process on the spot with nothing said (a stop during the final report). A stop that came while a
    finalizer ran (where Python drops the exception) is raised when the block ends. Only the main
    thread can set signal handlers: elsewhere, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []

    def handle(signum, frame) -> None:  # noqa: ANN001
        if signum == signal.SIGHUP:
            _detach_output()
        got.append(signum)
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handle) for sig in stop_signals()}
    hook, sys.unraisablehook = sys.unraisablehook, _quiet_interrupts(sys.unraisablehook)
    try:
        yield
        if got:  # raised inside a finalizer and dropped there: the stop still stands
            raise KeyboardInterrupt
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sys.unraisablehook = hook


class StopSignals:
    """Ctrl-C, SIGTERM and SIGHUP (a closed terminal or ssh session) stop the run: the first raises KeyboardInterrupt in the loop and is named in the
    attempts' records; any further one while the runner stops its tasks and records them is ignored
    (it would leave the run and its attempts marked running), with a line saying so. Once the run has
    ended (`closing`: the executor shuts down its preloader or containers) a stop is kept in `late`
    for the caller, not raised: it would cut that shutdown short."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.stopping = False
        self.closing = False
        self.late: str | None = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in stop_signals()}
        self.hook, sys.unraisablehook = sys.unraisablehook, _quiet_interrupts(sys.unraisablehook)

    def _handle(self, signum, frame) -> None:  # noqa: ANN001
        if signum == signal.SIGHUP:  # its terminal (or ssh session) is gone: what it prints from now on goes nowhere
            _detach_output()
        name = {signal.SIGINT: "Ctrl-C", signal.SIGHUP: "SIGHUP (its terminal closed)"}.get(signum, "SIGTERM")
        if self.closing:
            if self.name is None:
                self.late = self.late or name
            return
        if self.name is None and not self.stopping:
            self.name = name
            raise KeyboardInterrupt
        print("byol-runner: stopping the running tasks and recording them; this takes a few seconds", file=sys.stderr)

    def check(self) -> None:
        """Raise the stop a finalizer dropped (see _quiet_interrupts): a signal came, and no
        KeyboardInterrupt reached the loop."""
        if self.name is not None and not self.stopping:
            raise KeyboardInterrupt

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        sys.unraisablehook = self.hook
