"""`local`: one process per task on this machine, its GPU through CUDA_VISIBLE_DEVICES (empty on a
CPU slot), its output in worker.log, in a process group of its own so that stopping it stops the
decoder processes it started too. The worker side starts it (`runner.worker.launch`): by default
forked from a process that has PyTorch loaded already (about two seconds less per task); `preload:
false` (or BYOL_RUNNER_PRELOAD=0) starts a fresh Python per task instead."""

from __future__ import annotations

import os
import time
from pathlib import Path

from runner.executors.base import Executor, Handle, Slot, this_machine
from runner.executors.specs import LocalSpec
from runner.system import stop_group
from runner.worker.launch import Launcher, WorkerProcess, ended_code


class LocalExecutor(Executor):
    name = "local"
    Spec = LocalSpec

    def __init__(self, cpu_threads: int | None = None, preload: bool = True) -> None:
        # CPU tasks side by side share the cores: each gets its share of threads, not all of them
        # (oversubscribed OpenMP threads spin against each other and run several times slower)
        self.cpu_threads = cpu_threads
        self.preload = preload
        self.launcher: Launcher | None = None  # made at bind (it knows where the preloader's log goes)

    @classmethod
    def from_spec(cls, spec, limit: int | None) -> tuple[LocalExecutor, list[Slot]]:  # noqa: ANN001
        slots, threads = this_machine(spec, limit)
        return cls(cpu_threads=threads, preload=getattr(spec, "preload", True)), slots

    def bind(self, results: Path, run_name: str) -> None:
        self.launcher = Launcher(self._thread_env(), results / "preloader.log", self.preload)

    def _thread_env(self) -> dict[str, str]:
        return {"OMP_NUM_THREADS": str(self.cpu_threads), "MKL_NUM_THREADS": str(self.cpu_threads)} if self.cpu_threads else {}

    def close(self) -> None:
        if self.launcher is not None:
            self.launcher.close()

    def submit(self, task_id: str, task_json: Path, results: Path, slot: Slot, attempt_id: int = 0, number: int = 1) -> Handle:
        if self.launcher is None:  # submitted without bind (a test's executor): no preloader log
            self.launcher = Launcher(self._thread_env(), None, self.preload)
        env = dict(os.environ)
        env["CUDA_VISIBLE_DEVICES"] = "" if slot.gpu is None else str(slot.gpu)
        if slot.gpu is None:
            env.update(self._thread_env())
        env["BYOL_RUNNER_PARENT_PID"] = str(os.getpid())  # the worker stops itself if the runner dies
        worker = self.launcher.start(task_json, results, env, task_json.parent / "worker.log", os.getcwd())
        return Handle(task_id, slot, time.time(), pid=worker.pid, state=worker)

    def poll(self, handle: Handle) -> int | None:
        if isinstance(handle.state, WorkerProcess):
            return handle.state.poll()
        return ended_code(handle.pid)

    def cancel(self, handle: Handle, grace_s: float = 10.0) -> None:
        stop_group(handle.pid, grace_s, lambda: self.poll(handle) is not None)
