"""How an executor starts a worker on this machine: the worker side's one interface to the executors.

`Launcher.start(task_json, results, env, log, cwd)` starts the worker of one task and returns a
`WorkerProcess` (its pid, `poll()` for its exit code). By default the worker is forked from a
*preloader* (`runner.worker.preload`: a process that has imported PyTorch and the worker already,
about two seconds less per task); when that cannot start or fails, and with `preload=False`
(BYOL_RUNNER_PRELOAD=0), each worker is a fresh `python -m runner.worker`. Both run the same
`runner.worker.run.main`, so both compute the same thing. This module imports nothing of the worker's
internals: the preloader is a separate process, reached through its JSON-lines protocol (its
module docstring).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from runner.system import pid_alive


class PreloadFailed(RuntimeError):
    pass


@dataclass
class WorkerProcess:
    """One started worker: its pid (the leader of its own process group) and how to learn its exit."""

    pid: int
    source: object  # a Popen (a fresh process) or the Preloader that forked it

    def poll(self) -> int | None:
        """The worker's exit code once it has ended (negative: killed by that signal), else None."""
        if isinstance(self.source, subprocess.Popen):
            return self.source.poll()
        return self.source.poll(self.pid)


class Launcher:
    """Starts the workers of one run on this machine (the local executor holds one)."""

    def __init__(self, thread_env: dict[str, str] | None = None, log: Path | None = None, preload: bool = True) -> None:
        """`thread_env`: the workers' thread settings, which a preloader must have before its imports;
        `log`: where the preloader's own output goes."""
        self.thread_env = thread_env or {}
        self.log = log
        self.preload = preload and os.environ.get("BYOL_RUNNER_PRELOAD", "1") != "0"
        self.preloader: Preloader | None = None  # started at the first task
        self.preloaders: list[Preloader] = []  # every one started (a replaced one still watches its running workers)

    def start(self, task_json: Path, results: Path, env: dict[str, str], log: Path, cwd: str) -> WorkerProcess:
        """Start the worker of `task_json` with environment `env`, its output appended to `log`."""
        argv = [str(task_json), "--results", str(results)]
        preloader = self._preloader()
        if preloader is not None:
            try:
                return WorkerProcess(preloader.spawn(argv, env, str(log), cwd), preloader)
            except PreloadFailed as e:
                print(f"note: the preloader failed ({e}); starting workers as fresh processes", file=sys.stderr)
                self.preload, self.preloader = False, None
        with open(log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "runner.worker", *argv], stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        return WorkerProcess(proc.pid, proc)

    def _preloader(self) -> Preloader | None:
        if self.preload and self.preloader is None:
            try:
                self.preloader = Preloader(self.thread_env, self.log)
                self.preloaders.append(self.preloader)
            except (PreloadFailed, OSError, ValueError) as e:
                print(f"note: starting each worker as a fresh process ({e})", file=sys.stderr)
                self.preload = False
        return self.preloader

    def close(self) -> None:
        for p in self.preloaders:
            p.close()
        self.preloaders.clear()
        self.preloader = None


def ended_code(pid: int) -> int | None:
    """A worker nobody here started (a dead runner's): still running (None), or ended with an unknown code (1)."""
    return None if pid_alive(pid) else 1


class Preloader:
    """The runner's handle on its preloader process (`python -m runner.worker.preload`)."""

    def __init__(self, env: dict[str, str] | None = None, log: Path | None = None, timeout_s: float = 120.0) -> None:
        """`env`: what the workers' environment sets beyond the runner's (their thread counts); `log`:
        where the preloader's own output goes (an import error, a child that failed before its log)."""
        env = {**os.environ, **(env or {}), "BYOL_RUNNER_PARENT_PID": str(os.getpid())}
        err = open(log, "ab") if log is not None else subprocess.DEVNULL
        try:
            # its own session: a Ctrl-C at the terminal goes to the runner, which stops the tasks itself
            self.proc = subprocess.Popen([sys.executable, "-m", "runner.worker.preload"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err, env=env, start_new_session=True)
        finally:
            if log is not None:
                err.close()
        self._buf = b""
        self.codes: dict[int, int] = {}
        try:
            reply = self._reply(timeout_s)
            if "ready" not in reply:
                raise PreloadFailed(f"the preloader did not start: {reply.get('error', reply)}")
        except PreloadFailed:
            self.proc.kill()
            self.proc.wait()
            raise

    def _lines(self, timeout_s: float) -> list[dict]:
        fd = self.proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], timeout_s)
        if not ready:
            return []
        chunk = os.read(fd, 65536)
        if not chunk:
            raise PreloadFailed("the preloader exited")
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        out = []
        for line in lines:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "exited" in msg:
                self.codes[msg["exited"]] = msg["code"]
            else:
                if "spawned" in msg:  # a pid the system reuses must not inherit an earlier worker's exit code
                    self.codes.pop(msg["spawned"], None)
                out.append(msg)
        return out

    def _reply(self, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            replies = self._lines(max(0.0, deadline - time.monotonic()))
            if replies:
                return replies[0]
        raise PreloadFailed(f"no answer from the preloader in {timeout_s:.0f} s")

    def spawn(self, argv: list[str], env: dict[str, str], log: str, cwd: str) -> int:
        """Fork a worker: `argv` as the worker's arguments (`TASK_JSON [--results DIR]`); its pid."""
        try:
            self.proc.stdin.write(json.dumps({"argv": argv, "env": env, "log": log, "cwd": cwd}).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError as e:
            raise PreloadFailed(f"the preloader is gone ({e})") from None
        reply = self._reply(30.0)
        if "spawned" not in reply:
            raise PreloadFailed(reply.get("error", str(reply)))
        return int(reply["spawned"])

    def poll(self, pid: int) -> int | None:
        """The worker's exit code once it has ended, else None."""
        if pid not in self.codes:
            try:  # every line there is, also after the preloader died (its last exit codes are in the pipe)
                while self._lines(0.0):
                    pass
            except PreloadFailed:
                pass
        if pid in self.codes:
            return self.codes[pid]
        if self.proc.poll() is not None:  # the preloader died: its children are nobody's to reap
            # and were stopped by the SIGTERM its death sends them (PR_SET_PDEATHSIG): a kill from outside,
            # not the task's failure (a worker that had finished has its metrics.json: done all the same)
            return None if ended_code(pid) is None else 143
        return None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # end of input: it exits on its own
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
