"""`local`: one process per task, `byol-runner worker tasks/<id>/task.json`, its GPU through
CUDA_VISIBLE_DEVICES (empty on a CPU slot), its output in worker.log, in a process group of its own
so that stopping it stops the decoder processes it started too. By default each worker is forked
from a process that has PyTorch loaded already (`preload.py`: about two seconds less per task);
`preload: false` (or BYOL_RUNNER_PRELOAD=0) starts a fresh Python per task instead."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from runner.executors.base import Executor, Handle, MachineSettings, Slot, this_machine


class LocalSpec(MachineSettings):
    """local: one subprocess per task on this machine (the default)."""

    kind: Literal["local"] = "local"
    preload: bool = Field(True, description="fork each task's worker from a process that has PyTorch loaded (about "
                          "two seconds less per task); false: a fresh Python per task (BYOL_RUNNER_PRELOAD=0 sets it)")


class LocalExecutor(Executor):
    name = "local"
    Spec = LocalSpec

    def __init__(self, cpu_threads: int | None = None, preload: bool = True) -> None:
        # CPU tasks side by side share the cores: each gets its share of threads, not all of them
        # (oversubscribed OpenMP threads spin against each other and run several times slower)
        self.cpu_threads = cpu_threads
        self.preload = preload and os.environ.get("BYOL_RUNNER_PRELOAD", "1") != "0"
        self.preloader = None  # started at the first task
        self.preloaders: list = []  # every one started (a replaced one still watches its running workers)
        self.results: Path | None = None

    @classmethod
    def from_spec(cls, spec, limit: int | None) -> tuple[LocalExecutor, list[Slot]]:  # noqa: ANN001
        slots, threads = this_machine(spec, limit)
        return cls(cpu_threads=threads, preload=getattr(spec, "preload", True)), slots

    def bind(self, results: Path, run_name: str) -> None:
        self.results = results

    def _thread_env(self) -> dict[str, str]:
        return {"OMP_NUM_THREADS": str(self.cpu_threads), "MKL_NUM_THREADS": str(self.cpu_threads)} if self.cpu_threads else {}

    def _preloader(self):  # noqa: ANN202
        from runner.executors.preload import PreloadFailed, Preloader

        if self.preload and self.preloader is None:
            try:
                log = self.results / "preloader.log" if self.results is not None else None
                self.preloader = Preloader(self._thread_env(), log)
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

    def submit(self, task_id: str, task_json: Path, results: Path, slot: Slot, attempt_id: int = 0, number: int = 1) -> Handle:
        env = dict(os.environ)
        env["CUDA_VISIBLE_DEVICES"] = "" if slot.gpu is None else str(slot.gpu)
        if slot.gpu is None:
            env.update(self._thread_env())
        env["BYOL_RUNNER_PARENT_PID"] = str(os.getpid())  # the worker stops itself if the runner dies
        argv = ["worker", str(task_json), "--results", str(results)]
        preloader = self._preloader()
        if preloader is not None:
            from runner.executors.preload import PreloadFailed

            try:
                pid = preloader.spawn(argv, env, str(task_json.parent / "worker.log"), os.getcwd())
                return Handle(task_id, slot, time.time(), pid=pid, state=preloader)
            except PreloadFailed as e:
                print(f"note: the preloader failed ({e}); starting workers as fresh processes", file=sys.stderr)
                self.preload, self.preloader = False, None
        log = open(task_json.parent / "worker.log", "ab")
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "runner.cli", *argv],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )
        finally:
            log.close()
        return Handle(task_id, slot, time.time(), pid=proc.pid, state=proc)

    def poll(self, handle: Handle) -> int | None:
        if isinstance(handle.state, subprocess.Popen):
            return handle.state.poll()
        if handle.state is not None:  # the preloader that forked it, even if it was replaced since
            return handle.state.poll(handle.pid)
        return _ended_code(handle.pid)

    def cancel(self, handle: Handle, grace_s: float = 10.0) -> None:
        stop_group(handle.pid, grace_s, lambda: self.poll(handle) is not None)


def _ended_code(pid: int) -> int | None:
    """A forked worker whose preloader is gone: still running, or ended with an unknown code (1)."""
    from runner.executors.base import pid_alive

    return None if pid_alive(pid) else 1


def stop_group(pid: int, grace_s: float, ended) -> None:  # noqa: ANN001
    """SIGTERM the process group, wait up to grace_s for `ended()`, then SIGKILL it."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + grace_s
    while time.time() < deadline:
        if ended():
            return
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
