"""Checkpoints written atomically (temporary file, fsync, rename) and read with weights_only=True.

A crash at any moment leaves the previous checkpoint or the new one, never half of one. Only
tensors, numbers, strings, lists and dicts go in: nothing is unpickled from disk. Training loops
write theirs through `CheckpointWriter`: the state is copied to the host at once (a consistent
snapshot) and written to disk by a background thread while training goes on.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import torch

from runner.atomic import temp_path


def atomic_save(obj: Any, path: str | Path) -> None:
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # a full disk, SIGTERM (SystemExit) mid-write: no partial file is left behind
        full = _no_space(e, tmp)
        tmp.unlink(missing_ok=True)
        if full:  # torch.save reports a full disk as RuntimeError "unexpected pos": say what it is
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from e
        raise


def _no_space(e: BaseException, tmp: Path) -> bool:
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    try:
        return isinstance(e, RuntimeError) and shutil.disk_usage(tmp.parent).free < 2**20
    except OSError:
        return False


def safe_load(path: str | Path, device: str | torch.device = "cpu") -> Any:
    """torch.load of tensors and plain values only (never unpickles code), from a regular file only (a
    FIFO in its place would block the reader)."""
    from runner.atomic import open_regular

    with open_regular(path) as f:
        return torch.load(f, map_location=device, weights_only=True)


def rng_state(device_gen: torch.Generator) -> dict:
    """Every random state a resumed task needs: torch's global ones and the augmentation generator's.
    (Batch order needs none: it is a pure function of the seed and the step.)"""
    state = {"cpu": torch.get_rng_state(), "device": device_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, device_gen: torch.Generator) -> None:
    torch.set_rng_state(state["cpu"])
    device_gen.set_state(state["device"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def host_copy(obj: Any) -> Any:
    """The same structure with every tensor copied to host memory: a snapshot that later in-place
    updates of the live tensors (optimizer steps, EMA) do not reach."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v) for v in obj)
    return obj


class CheckpointWriter:
    """Checkpoints written in the background, one at a time.

    `save` snapshots the state to the host (the only part the training loop waits for) and hands
    the write (serialize, fsync, rename) to a thread; the next `save`, and leaving the `with`
    block, wait for the previous write first, so checkpoints land in order and none is being
    written when the task's files are finalized. A failed write is raised by the next `save` or
    at the end of the block."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, state: dict, path: str | Path) -> None:
        self.wait()
        snapshot = host_copy(state)
        thread = threading.Thread(target=self._write, args=(snapshot, Path(path)), name="checkpoint-writer")
        thread.start()  # (a SIGTERM between these lines leaves a started, non-daemon thread: the exit waits for it)
        self._thread = thread

    def _write(self, state: dict, path: Path) -> None:
        try:
            atomic_save(state, path)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread at its next wait
            self._error = e

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
        if exc_type is None:
            self.wait()
        elif self._thread is not None:  # leaving on an error: let the write finish (atomic), keep the first error
            self._thread.join()
            self._thread = None
