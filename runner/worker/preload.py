"""Workers forked from a process that has already loaded PyTorch (the local executor's default).

A fresh `python -m runner.worker` spends about two seconds importing PyTorch (and torch._dynamo,
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

The runner's side of it is `runner.worker.launch.Preloader`.

Protocol (JSON lines): runner -> preloader `{"argv": [...], "env": {...}, "log": path, "cwd": path}`
(argv: the worker's arguments, `runner.worker.entry`);
preloader -> runner `{"ready": pid}` once, `{"spawned": pid}` or `{"error": text}` per request, and
`{"exited": pid, "code": c}` whenever a child ends (c < 0: killed by signal -c, as Popen reports it).
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time


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
        sys.argv = ["python -m runner.worker", *req["argv"]]
        from runner.worker.entry import main

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


def _load() -> None:
    """Import what a worker imports, once: each forked worker finds it loaded."""
    import numpy  # noqa: F401
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401 - imported by torch.optim at a worker's first step

    import runner.data.dataset  # noqa: F401
    import runner.ml.pretrain  # noqa: F401
    import runner.ml.train  # noqa: F401
    import runner.worker.entry  # noqa: F401
    import runner.worker.run  # noqa: F401


def _reap() -> None:
    """Report every child that ended."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send({"exited": pid, "code": os.waitstatus_to_exitcode(status)})


def _fork(line: bytes, wake: list[int], preloader: int) -> None:
    """One request: fork its worker and say its pid (or why not)."""
    import numpy as np

    try:
        req = json.loads(line)
        pid = os.fork()
    except (ValueError, OSError) as e:
        _send({"error": f"{type(e).__name__}: {e}"})
        return
    if pid == 0:
        np.random.seed()  # numpy's global generator was seeded at import: each worker gets its own
        _child(req, wake, preloader)
    _wait_for_session(pid)  # a cancel right after the answer reaches the worker's whole group
    _send({"spawned": pid})


def serve() -> None:
    import threading

    from runner.worker.run import die_with_parent

    _load()
    die_with_parent()
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
        _reap()
        if 0 in ready:
            chunk = os.read(0, 65536)
            if not chunk:
                return  # the runner closed its end: no more tasks (children still running end on their own)
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                _fork(line, [wake_r, wake_w], preloader)


if __name__ == "__main__":
    serve()
