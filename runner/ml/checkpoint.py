"""Checkpoints written atomically (temporary file, fsync, rename) and read with weights_only=True.

A crash at any moment leaves the previous checkpoint or the new one, never half of one. Only
tensors, numbers, strings, lists and dicts go in: nothing is unpickled from disk.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def atomic_save(obj: Any, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def safe_load(path: str | Path, device: str | torch.device = "cpu") -> Any:
    return torch.load(path, map_location=device, weights_only=True)


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
