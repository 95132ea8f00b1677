"""`local`: one subprocess per task, `byol-runner worker tasks/<id>/task.json`, its GPU through
CUDA_VISIBLE_DEVICES (empty on a CPU slot), its output in worker.log, in a process group of its own
so that stopping it stops the decoder processes it started too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

from runner.executors.base import Executor, Handle, MachineSettings, Slot, this_machine


class LocalSpec(MachineSettings):
    """local: one subprocess per task on this machine (the default)."""

    kind: Literal["local"] = "local"


class LocalExecutor(Executor):
    name = "local"
    Spec = LocalSpec

    def __init__(self, cpu_threads: int | None = None) -> None:
        # CPU tasks side by side share the cores: each gets its share of threads, not all of them
        # (oversubscribed OpenMP threads spin against each other and run several times slower)
        self.cpu_threads = cpu_threads

    @classmethod
    def from_spec(cls, spec, limit: int | None) -> tuple[LocalExecutor, list[Slot]]:  # noqa: ANN001
        slots, threads = this_machine(spec, limit)
        return cls(cpu_threads=threads), slots

    def submit(self, task_id: str, task_json: Path, results: Path, slot: Slot, attempt_id: int = 0, number: int = 1) -> Handle:
        env = dict(os.environ)
        env["CUDA_VISIBLE_DEVICES"] = "" if slot.gpu is None else str(slot.gpu)
        if slot.gpu is None and self.cpu_threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.cpu_threads)
        env["BYOL_RUNNER_PARENT_PID"] = str(os.getpid())  # the worker stops itself if the runner dies
        log = open(task_json.parent / "worker.log", "ab")
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "runner.cli", "worker", str(task_json), "--results", str(results)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )
        finally:
            log.close()
        return Handle(task_id, slot, time.time(), pid=proc.pid, state=proc)

    def poll(self, handle: Handle) -> int | None:
        return handle.state.poll()

    def cancel(self, handle: Handle, grace_s: float = 10.0) -> None:
        proc: subprocess.Popen = handle.state
        stop_group(proc.pid, grace_s, lambda: proc.poll() is not None)


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
