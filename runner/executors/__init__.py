"""Executors: how a task's worker is started, watched and stopped, one module per backend.

A backend is one module with an `Executor` subclass and one entry in `EXECUTORS` (name ->
"module:Class"). The class names its manifest section, `Spec` (a pydantic model with `kind: Literal[name]`:
the manifest's `executor` is the discriminated union of them), makes itself and its slots from it
(`from_spec`), adopts the attempts a killed runner left that still run (`adopt`), and stops what is
left of the others (`stop_leftovers`), so the scheduler names no backend. Importing a backend module
must not import its SDK (the manifest reads every backend's Spec): the docker SDK and Ray load only
when an executor is made.
"""

from __future__ import annotations

import importlib

from runner.executors.base import Executor, ExecutorSettings, Handle, Slot

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


def executor_specs() -> tuple[type[ExecutorSettings], ...]:
    """Every backend's manifest section, in registry order."""
    return tuple(executor_class(kind).Spec for kind in EXECUTORS)


def spec_for(spec: ExecutorSettings, kind: str) -> tuple[ExecutorSettings, list[str]]:
    """The manifest's executor section as backend `kind` reads it (`run --executor KIND` on a manifest
    written for another backend): the shared settings carry over, the other backend's own settings are
    dropped and named, so the caller can say so."""
    if getattr(spec, "kind", None) == kind:
        return spec, []
    target = executor_class(kind).Spec
    given = spec.model_dump(exclude_unset=True, exclude={"kind"})
    kept = {k: v for k, v in given.items() if k in target.model_fields}
    return target.model_validate({**kept, "kind": kind}), sorted(set(given) - set(kept))


def make_executor(kind: str, spec, max_parallel: int | None = None) -> tuple[Executor, list[Slot]]:  # noqa: ANN001
    """The executor of a kind and the slots it offers: one per GPU (or CPU slots) on this machine for
    `local` and `docker`, the cluster's GPUs or CPUs for `ray`. `spec` is that backend's Spec
    (`spec_for` makes it from a manifest written for another backend)."""
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


__all__ = ["EXECUTORS", "Executor", "ExecutorSettings", "Handle", "Slot", "executor_class", "executor_specs", "make_executor",
           "recover", "spec_for"]
