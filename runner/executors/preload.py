"""Workers forked from a process that has already loaded PyTorch (the local executor's default).

A fresh `python -m runner.cli worker` spends about two seconds importing PyTorch (and torch._dynamo,
which its optimizers import at their first step) before it reads its task: on a matrix of many short
tasks, or a two-core laptop's demo, that is a large share of the run. The local executor therefore
starts one *preloader* per run: a single-threaded process that imports what a worker imports and
then, for each task, forks a child that becomes that task's worker (its own session and process
group, its output in worker.log, the task's environment). The child's exit code comes back as a
line on the preloader's stdout.

What a fork shares is only what was imported: nothing has run (no CUDA context, no training, no
random draw the worker makes), so a forked worker computes what a fresh process computes. The
settings libraries read at their import (OMP_NUM_THREADS for libgomp and OpenBLAS) are the tasks'
own: the preloader is started with the environment's thread settings its workers get, and the
child sets torch's thread count again. The preloader dies with the runner (PR_SET_PDEATHSIG); its
children then get SIGTERM the same way (also when it exits at the end of a run with workers still
going) and stop after their last checkpoint, as a fresh worker would.

Protocol (JSON lines): runner -> preloader `{"argv": [...], "env": {...}, "log": path, "cwd": path}`;
preloader -> runner `{"ready": pid}` once, `{"spawned": pid}` or `{"error": text}` per request, and
`{"exited": pid, "code": c}` whenever a child ends (c < 0: killed by signal -c, as Popen reports it).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path


# ---- the runner's side ---------------------------------------------------------------------


class PreloadFailed(RuntimeError):
    pass


class Preloader:
    """The runner's handle on its preloader process."""

    def __init__(self, env: dict[str, str] | None = None, log: Path | None = None, timeout_s: float = 120.0) -> None:
        """`env`: what the workers' environment sets beyond the runner's (their thread counts); `log`:
        where the preloader's own output goes (an import error, a child that failed before its log)."""
        env = {**os.environ, **(env or {}), "BYOL_RUNNER_PARENT_PID": str(os.getpid())}
        err = open(log, "ab") if log is not None else subprocess.DEVNULL
        try:
            # its own session: a Ctrl-C at the terminal goes to the runner, which stops the tasks itself
            self.proc = subprocess.Popen([sys.executable, "-m", "runner.executors.preload"], stdin=subprocess.PIPE,
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
        """Fork a worker: `argv` as `byol-runner` arguments; its pid."""
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
            from runner.executors.base import pid_alive

            return None if pid_alive(pid) else 1
        return None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # end of input: it exits on its own
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---- the preloader ------------------------------------------------------------------------


def _send(msg: dict) -> None:
    os.write(1, json.dumps(msg).encode() + b"\n")


def _child(req: dict, inherited: list[int], preloader: int) -> None:
    """In the forked child: become the task's worker, then leave with its exit code (never returns)."""
    code = 1
    try:
        os.setsid()
        signal.set_wakeup_fd(-1)
        # the handlers a fresh Python starts with (SIGPIPE stays ignored, as Python sets it)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for fd in inherited:
            os.close(fd)
        log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.close(null)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        # it dies with the preloader, which dies with the runner (the pid from before the fork: if the
        # preloader died since, the worker sees it at once)
        os.environ["BYOL_RUNNER_PARENT_PID"] = str(preloader)
        threads = os.environ.get("OMP_NUM_THREADS")
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        sys.argv = ["byol-runner", *req["argv"]]
        from runner.cli import main

        code = main(req["argv"])
    except SystemExit as e:
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - the worker reports its own errors; this is what escaped it
        import traceback

        traceback.print_exc()
        code = 1
    _exit(code if 0 <= code < 256 else 1)


def _exit(code: int) -> None:
    """Leave as a fresh interpreter would, less its module teardown (about a second with PyTorch loaded):
    the threading exit hooks (a concurrent.futures pool stops) and the join of the threads still going
    (a checkpoint being written), the atexit hooks the libraries registered, the flushes."""
    import atexit
    import threading

    try:
        shutdown = getattr(threading, "_shutdown", None)
        if shutdown is not None:
            shutdown()
        else:
            for t in threading.enumerate():
                if t is not threading.current_thread() and not t.daemon:
                    t.join()
        getattr(atexit, "_run_exitfuncs", lambda: None)()
    except SystemExit as e:  # SIGTERM while waiting: stopped, as the worker would say
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - an exit hook failed: the exit code stands
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _wait_for_session(pid: int, timeout_s: float = 5.0) -> None:
    """Until the child has made its own session (its pgid is its pid), or has ended."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if os.getpgid(pid) == pid:
                return
        except ProcessLookupError:
            return
        time.sleep(0.001)


def serve() -> None:
    import runner.data.dataset  # noqa: F401 - what a worker imports, loaded once
    import runner.ml.pretrain  # noqa: F401
    import runner.ml.train  # noqa: F401
    import runner.worker  # noqa: F401
    import torch
    import torch._dynamo  # noqa: F401 - imported by torch.optim at a worker's first step

    import numpy as np
    import threading

    del torch
    runner.worker._die_with_parent()
    if threading.active_count() != 1:  # forking is only safe from a process with one (Python) thread
        _send({"error": f"{threading.active_count()} threads after the imports"})
        return
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    preloader = os.getpid()
    _send({"ready": preloader})
    buf = b""
    while True:
        try:
            ready, _, _ = select.select([0, wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in ready:
            os.read(wake_r, 4096)
        while True:  # reap every child that ended
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            _send({"exited": pid, "code": os.waitstatus_to_exitcode(status)})
        if 0 in ready:
            chunk = os.read(0, 65536)
            if not chunk:
                return  # the runner closed its end: no more tasks (children still running end on their own)
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                try:
                    req = json.loads(line)
                    pid = os.fork()
                except (ValueError, OSError) as e:
                    _send({"error": f"{type(e).__name__}: {e}"})
                    continue
                if pid == 0:
                    np.random.seed()  # numpy's global generator was seeded at import: each worker gets its own
                    _child(req, [wake_r, wake_w], preloader)
                _wait_for_session(pid)  # a cancel right after the answer reaches the worker's whole group
                _send({"spawned": pid})


if __name__ == "__main__":
    serve()
