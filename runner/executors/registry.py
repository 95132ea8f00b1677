"""The executors' public face: which backends exist, the executor a run asks for, and what a dead
runner left. Backends are named in `specs.SPECS` and imported only when a run needs one."""

from __future__ import annotations

import importlib

from runner.executors.base import Executor, Handle, Slot
from runner.executors.specs import SPECS, ExecutorSettings

EXECUTORS = tuple(SPECS)  # the backends' names, in registry order


def executor_class(kind: str) -> type[Executor]:
    if kind not in SPECS:
        raise ValueError(f"unknown executor {kind!r}: one of {', '.join(SPECS)}")
    module, _, name = SPECS[kind].executor.partition(":")
    return getattr(importlib.import_module(module), name)


def spec_for(spec: ExecutorSettings, kind: str) -> tuple[ExecutorSettings, list[str]]:
    """The manifest's executor section as backend `kind` reads it (`run --executor KIND` on a manifest
    written for another backend): the shared settings carry over, the other backend's own settings are
    dropped and named, so the caller can say so."""
    if getattr(spec, "kind", None) == kind:
        return spec, []
    if kind not in SPECS:
        raise ValueError(f"unknown executor {kind!r}: one of {', '.join(SPECS)}")
    target = SPECS[kind]
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
    for kind in SPECS:
        left = [a for a in stale if a["executor"] == kind and a["id"] not in adopted]
        if left:
            executor_class(kind).stop_leftovers(left, results, grace_s)
    return adopted
