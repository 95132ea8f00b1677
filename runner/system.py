"""This machine, as every layer sees it: whether a process lives, how to stop a process group, the
CPUs this process may use, the GPUs it may see, and the torch device a task asks for. A leaf: it
imports nothing of the project but its errors, so the data layer, the executors, the worker and the
TUI can all ask without reaching into each other."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

from runner.errors import StartError


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(pid: int, grace_s: float, ended) -> None:  # noqa: ANN001 - ended() -> bool
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


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity: a container's or a Slurm job's share, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def visible_gpus() -> list[int]:
    """GPU indices this process may use, without importing torch: CUDA_VISIBLE_DEVICES if set, else
    what `nvidia-smi -L` lists, else none."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [i for i, part in enumerate(p for p in env.split(",") if p.strip() and p.strip() != "-1")]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [i for i, line in enumerate(line for line in out.splitlines() if line.startswith("GPU "))]


def resolve_device(want: str):  # noqa: ANN201 - a torch.device (torch is imported only when asked)
    """The torch device of `run.device` (auto | cpu | cuda); StartError when a GPU is asked and none is seen."""
    import torch

    if want == "cuda" and not torch.cuda.is_available():
        raise StartError(
            "this task asks for a GPU (run.device: cuda) but torch sees none: check nvidia-smi, CUDA_VISIBLE_DEVICES "
            "and that torch is a CUDA build (torch.version.cuda is " + repr(torch.version.cuda) + "), or set run.device: auto"
        )
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        # every training loop runs one batch shape: cuDNN times its convolution algorithms once per
        # shape and keeps the fastest, instead of taking its heuristic's first pick
        torch.backends.cudnn.benchmark = True
    return torch.device(want)
