"""The executor interface: the scheduler hands a task and a slot to `submit`, then `poll`s the
handle until it has an exit code, and `cancel`s it on Ctrl-C or a timeout."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from runner.executors.specs import ExecutorSettings
from runner.system import cpu_count, pid_alive, stop_group, visible_gpus


@dataclass(frozen=True)
class Slot:
    """Where one task runs: a GPU (its index) or a CPU slot."""

    name: str
    gpu: int | None = None


@dataclass
class Handle:
    task_id: str
    slot: Slot
    started: float
    pid: int | None = None
    node: str = field(default_factory=lambda: os.uname().nodename)
    state: object = None  # the backend's own (a Popen, a container, an ObjectRef)


class Executor(ABC):
    name: str = "base"
    Spec: type[ExecutorSettings] = ExecutorSettings  # the backend's manifest section (a subclass with `kind`)

    def bind(self, results: Path, run_name: str) -> None:
        """Called once before the first submit: the results dir and run this executor works for."""

    def adopt(self, attempts: list) -> dict[int, Handle]:  # noqa: ANN001 - rows of the store's attempts table
        """Attempts a killed runner left marked running whose work still exists (a container): their
        handles by attempt id, for the scheduler to watch instead of starting them again. A handle
        whose work ended while no runner watched reports its exit code at the first poll."""
        return {}

    @classmethod
    @abstractmethod
    def from_spec(cls, spec, limit: int | None) -> tuple["Executor", list[Slot]]:  # noqa: ANN001 - the backend's Spec
        """This executor and its slots, from the manifest's `executor` section (at most `limit` slots)."""

    @classmethod
    def stop_leftovers(cls, attempts: list, results: Path, grace_s: float) -> None:  # noqa: ANN001
        """Stop whatever is left of these attempts of this backend that a dead runner started and no
        executor adopted: by default, a worker process still alive on this machine."""
        for a in attempts:
            pid = a["pid"]
            if pid and pid_alive(pid) and a["node"] == os.uname().nodename:
                stop_group(pid, grace_s, lambda p=pid: not pid_alive(p))

    @classmethod
    def checks(cls, spec) -> list[tuple[str, str, str, str]]:  # noqa: ANN001 - the backend's Spec
        """`doctor`'s checks of what this backend needs on this host: (name, ok | warn | fail | skip, what
        was seen, what to do). The docker and ray checks predate this hook and are in `runner.doctor`."""
        return []

    def close(self) -> None:
        """Called once when the run ends: release what the executor holds (the local executor's preloader)."""

    @abstractmethod
    def submit(self, task_id: str, task_json: Path, results: Path, slot: Slot, attempt_id: int = 0, number: int = 1) -> Handle:
        """Start one attempt (`number` counts the task's attempts; `attempt_id` is its row in runner.db)."""

    @abstractmethod
    def poll(self, handle: Handle) -> int | None:
        """The exit code once the task has ended, else None."""

    @abstractmethod
    def cancel(self, handle: Handle, grace_s: float = 10.0) -> None:
        """Stop the task: SIGTERM (it saves nothing more than its last checkpoint), then SIGKILL."""


def append_error_event(folder: Path, task_id: str, message: str, error_type: str | None) -> None:
    """An `error` event written for a worker by its executor (what the worker could not say itself: its
    container was killed, its Ray node was lost): the scheduler records it as the attempt's error."""
    from runner.contracts import EventKind, event_line

    with open(folder / "events.jsonl", "a") as f:
        f.write(event_line(task_id, EventKind.ERROR, message=message, error_type=error_type))


def this_machine(spec, limit: int | None) -> tuple[list[Slot], int | None]:  # noqa: ANN001
    """Slots on this machine (one per GPU, or CPU slots) and the threads each CPU slot gets."""
    slots = make_slots(spec.gpus, limit)
    cpu_slots = sum(1 for s in slots if s.gpu is None)
    return slots, max(1, cpu_count() // cpu_slots) if cpu_slots else None


def make_slots(gpus: str | int | list[int], max_parallel: int | None) -> list[Slot]:
    """One slot per GPU (gpus: auto | N | [ids]); CPU slots (max_parallel, default 1) when none."""
    visible = visible_gpus()
    if gpus == "auto":
        chosen = visible
    elif isinstance(gpus, int):
        if gpus > len(visible):
            raise ValueError(f"executor.gpus: {gpus} asked, {len(visible)} visible")
        chosen = visible[:gpus]
    else:
        missing = [g for g in gpus if g not in visible]
        if missing:
            raise ValueError(f"executor.gpus: GPU {missing[0]} is not visible (visible: {visible or 'none'})")
        chosen = list(gpus)
    if chosen:
        slots = [Slot(f"gpu{g}", g) for g in chosen]
        return slots[:max_parallel] if max_parallel else slots
    return [Slot(f"cpu{i}") for i in range(max_parallel or 1)]
