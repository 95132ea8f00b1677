"""Executors: how a task's worker is started, watched and stopped, one module per backend.

A backend is one module with an `Executor` subclass and one entry in `EXECUTORS` (name ->
"module:Class", imported only when used: the docker SDK and Ray load only for their runs). The class
makes itself and its slots from the manifest's `executor` section (`from_spec`), adopts the attempts a
killed runner left that still run (`adopt`), and stops what is left of the others (`stop_leftovers`),
so the scheduler names no backend.
"""

from __future__ import annotations

import importlib

from runner.executors.base import Executor, Handle, Slot

EXECUTORS = {
    "local": "runner.executors.local:LocalExecutor",
    "docker": "runner.executors.docker:DockerExecutor",
    "ray": "runner.executors.ray:RayExecutor",
}


def executor_class(kind: str) -> type[Executor]:
    if kind not in EXECUTORS:
        raise ValueError(f"unknown executor {kind!r}: one of {', '.join(EXECUTORS)}")
    module, _, name = EXECUTORS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def make_executor(kind: str, spec, max_parallel: int | None = None) -> tuple[Executor, list[Slot]]:  # noqa: ANN001
    """The executor of a kind and the slots it offers: one per GPU (or CPU slots) on this machine for
    `local` and `docker`, the cluster's GPUs or CPUs for `ray`. `spec` is the manifest's ExecutorSpec."""
    return executor_class(kind).from_spec(spec, max_parallel or spec.max_parallel)


def recover(executor: Executor, stale: list, results, grace_s: float) -> dict[int, Handle]:  # noqa: ANN001
    """Attempts a dead runner left marked running: the handles `executor` adopts (their work still
    runs), by attempt id; every other attempt's leftovers are stopped by the backend that started it."""
    adopted = executor.adopt(stale) if stale else {}
    for kind in EXECUTORS:
        left = [a for a in stale if a["executor"] == kind and a["id"] not in adopted]
        if left:
            executor_class(kind).stop_leftovers(left, results, grace_s)
    return adopted


__all__ = ["EXECUTORS", "Executor", "Handle", "Slot", "executor_class", "make_executor", "recover"]
