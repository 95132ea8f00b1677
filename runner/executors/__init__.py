"""Executors: how a task's worker is started, watched and stopped (one module per backend)."""

from __future__ import annotations

from runner.executors.base import Executor, Handle, Slot


def make_executor(kind: str, slots: list[Slot]) -> Executor:
    if kind == "local":
        from runner.data.cache import cpu_count
        from runner.executors.local import LocalExecutor

        cpu_slots = sum(1 for s in slots if s.gpu is None)
        return LocalExecutor(cpu_threads=max(1, cpu_count() // cpu_slots) if cpu_slots else None)
    raise ValueError(f"unknown executor {kind!r}")


__all__ = ["Executor", "Handle", "Slot", "make_executor"]
