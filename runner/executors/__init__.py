"""Executors: how a task's worker is started, watched and stopped (one module per backend)."""

from __future__ import annotations

from runner.executors.base import Executor, Handle, Slot, make_slots


def _this_machine(spec, limit: int | None) -> tuple[list[Slot], int | None]:  # noqa: ANN001
    """Slots on this machine (one per GPU, or CPU slots) and the threads each CPU slot gets."""
    from runner.data.cache import cpu_count

    slots = make_slots(spec.gpus, limit)
    cpu_slots = sum(1 for s in slots if s.gpu is None)
    return slots, max(1, cpu_count() // cpu_slots) if cpu_slots else None


def make_executor(kind: str, spec, max_parallel: int | None = None) -> tuple[Executor, list[Slot]]:  # noqa: ANN001
    """The executor of a kind and the slots it offers: one per GPU (or CPU slots) on this machine for
    `local` and `docker`, the cluster's GPUs or CPUs for `ray`. `spec` is the manifest's ExecutorSpec."""
    limit = max_parallel or spec.max_parallel
    if kind == "local":
        from runner.executors.local import LocalExecutor

        slots, threads = _this_machine(spec, limit)
        return LocalExecutor(cpu_threads=threads), slots
    if kind == "docker":
        from runner.executors.docker import DockerExecutor

        slots, threads = _this_machine(spec, limit)
        return DockerExecutor(spec.docker, cpu_threads=threads), slots
    if kind == "ray":
        from runner.executors.ray import RayExecutor

        ex = RayExecutor(spec.address, spec.cpus_per_task)
        return ex, ex.cluster_slots(limit)
    raise ValueError(f"unknown executor {kind!r}")


__all__ = ["Executor", "Handle", "Slot", "make_executor"]
