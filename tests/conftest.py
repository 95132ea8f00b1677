"""Shared fixtures: the real data sets in ../shared/data, a per-session image cache, a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BYOL_SHARED_DATA", REPO.parent / "shared" / "data")).resolve()


def real_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data set not found: {path} (set BYOL_SHARED_DATA to the shared data folder)")
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One image cache for the whole session: each real data set is decoded once per test run."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def write_manifest(tmp_path: Path):
    def write(text: str, name: str = "manifest.yaml") -> Path:
        p = tmp_path / name
        p.write_text(textwrap.dedent(text))
        return p

    return write


def fake_imagenet_weights(home: Path, arch: str = "resnet18", loadable: bool = True) -> dict | None:
    """A weights file where torchvision keeps ImageNet weights (`home` as TORCH_HOME; nothing is
    downloaded): with the right keys when `loadable` (its state dict is returned), else empty (the
    plan only checks that it is there)."""
    import torch
    import torchvision

    url = torchvision.models.get_model_weights(arch).DEFAULT.url
    path = home / "hub" / "checkpoints" / Path(url).name
    path.parent.mkdir(parents=True, exist_ok=True)
    if not loadable:
        path.touch()
        return None
    torch.manual_seed(11)
    state = getattr(torchvision.models, arch)().state_dict()
    torch.save(state, path)
    return state


def fault_env(kind: str) -> dict[str, str]:
    """The environment that makes every worker task of `kind` fail (tests/faults/sitecustomize.py)."""
    path = os.pathsep.join(p for p in (str(REPO / "tests" / "faults"), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "BYOL_RUNNER_TEST_FAULT": kind}


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`byol-runner ARGS` in a fresh process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "runner.cli", *args],
        cwd=cwd or REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
