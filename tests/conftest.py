"""Shared fixtures: the real data sets in ../shared/data, a per-session image cache, a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# The tests stop runs with SIGINT and SIGHUP as a terminal does, and a runner keeps a signal it was
# started with ignored (nohup's SIGHUP, a background job's SIGINT: runner.watch.stop_signals). So the
# suite's own children must not inherit such an ignore from however the suite was started (CI under
# nohup, or as a background job). A Python handler, unlike an ignore, is reset to the default in a
# child at exec; this process still shrugs the signal off, as it was asked to.
import signal as _signal  # noqa: E402

for _sig in (_signal.SIGHUP, _signal.SIGINT):
    if _signal.getsignal(_sig) == _signal.SIG_IGN:
        _signal.signal(_sig, lambda signum, frame: None)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BYOL_SHARED_DATA", REPO.parent / "shared" / "data")).resolve()


def real_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data set not found: {path} (set BYOL_SHARED_DATA to the shared data folder)")
    return path


# fixtures that start real runs or a real engine: a test that takes one is end-to-end (`-m e2e`)
E2E_FIXTURES = {"tiny_reference", "finished", "pretrained", "client", "cluster", "slurm"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`make test-quick` (`-m "not e2e"`) must not start a real run behind a test's back: a test that takes
    one of E2E_FIXTURES has to say it is end-to-end, or the session stops before any test runs."""
    unmarked = [item.nodeid for item in items
                if E2E_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("e2e") is None]
    if unmarked:
        raise pytest.UsageError("tests that take a real run's fixture but are not marked @pytest.mark.e2e:\n  "
                                + "\n  ".join(unmarked))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One image cache for the whole session: each real data set is decoded once per test run."""
    return tmp_path_factory.mktemp("cache")


TINY = """\
name: tiny
datasets:
  syn:
    source: synthetic
    per_class: 40
    size: 32
    image_size: 24
    classes: {{normal: [class0], finding: [class1]}}
    positive: finding
    split: {{val: 0.25, test: 0.25}}
methods: [byol-finetune, byol-linear, supervised, random-linear]
labels: {{fractions: [0.25, 1.0]}}
seeds: [0]
model: {{arch: resnet18}}
pretrain: {{epochs: {pre_epochs}, min_steps: 0, batch_size: 16, proj_hidden: 128, pred_hidden: 128, proj_dim: 32, warmup_epochs: 1}}
finetune: {{epochs: 2, min_steps: {ft_steps}, batch_size: 16}}
run: {{device: cpu, progress_every_s: 0.2, checkpoint_every_steps: 5}}
executor: {{max_parallel: 2, retries: 1}}
"""


def tiny(tmp_path: Path, name: str = "tiny.yaml", pre_epochs: int = 4, ft_steps: int = 10) -> Path:
    """TINY with Model 1 and Model 2 only (5 tasks): the runner's behaviour does not need more arms."""
    p = tmp_path / name
    p.write_text(TINY.format(pre_epochs=pre_epochs, ft_steps=ft_steps).replace(
        "methods: [byol-finetune, byol-linear, supervised, random-linear]", "methods: [byol-finetune, supervised]"))
    return p


REFERENCE = {"pre_epochs": 8, "ft_steps": 5}  # the shared tiny run: pretraining long enough to be caught mid-way


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory: pytest.TempPathFactory):
    """One finished run of `tiny(**REFERENCE)` with the local executor, two tasks at a time (5 tasks), for
    every test that needs a finished run or an uninterrupted reference to compare with: (manifest,
    results dir, the run's stdout). Tests that change it work on a copy (`copy_results`)."""
    tmp = tmp_path_factory.mktemp("reference")
    manifest = tiny(tmp, **REFERENCE)
    results = tmp / "results"
    r = run_cli("run", str(manifest), "--results", str(results))
    assert r.returncode == 0, r.stdout + r.stderr
    return manifest, results, r.stdout


def copy_results(results: Path, to: Path) -> Path:
    """A finished results dir copied (its runner.db, task folders and cache), to rerun or change."""
    import shutil

    shutil.copytree(results, to, symlinks=True)
    return to


@pytest.fixture
def write_manifest(tmp_path: Path):
    def write(text: str, name: str = "manifest.yaml") -> Path:
        p = tmp_path / name
        p.write_text(textwrap.dedent(text))
        return p

    return write


def fake_imagenet_weights(home: Path, arch: str = "resnet18", loadable: bool = True) -> tuple[Path, dict | None]:
    """A weights file of `arch`'s ImageNet layout (random values; nothing is downloaded) for
    `model.imagenet_weights`, and its state dict: with the right keys when `loadable`, else a few
    bytes (the plan only hashes it). torchvision's own file cannot be faked: its name carries its hash."""
    import torch
    import torchvision

    path = home / f"fake-{arch}-imagenet.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not loadable:
        path.write_bytes(b"not weights")
        return path, None
    torch.manual_seed(11)
    state = getattr(torchvision.models, arch)().state_dict()
    torch.save(state, path)
    return path, state


def torchvision_weights_path(home: Path, arch: str = "resnet18") -> Path:
    """Where torchvision keeps `arch`'s ImageNet weights under TORCH_HOME=home."""
    import torchvision

    return home / "hub" / "checkpoints" / Path(torchvision.models.get_model_weights(arch).DEFAULT.url).name


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


def cli_here(*args: str) -> subprocess.CompletedProcess:
    """`byol-runner ARGS` called in this process: its exit code, stdout and stderr, as `run_cli` gives
    them. For commands whose process is not what a test checks (`report`, `status`, `plan`, `predict`,
    `doctor`, `data audit`): a fresh Python spends seconds importing what this one has loaded. Never
    for `run`, which starts workers."""
    import contextlib
    import io

    from runner.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return subprocess.CompletedProcess(["byol-runner", *args], rc, out.getvalue(), err.getvalue())
