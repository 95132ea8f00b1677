"""`byol-runner worker` on real head CT images and real files: as the executors run it (a real process)
where the process is what is tested (its exit codes, a SIGKILL, what it imports), else the same
`worker` command called in this process (what a task computes does not depend on the process it runs
in, and a fresh one spends seconds importing PyTorch)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, real_data


def head_ct_task(results: Path, task_id: str, kind: str, **over) -> Path:
    spec = {
        "id": task_id,
        "kind": kind,
        "dataset": "hemorrhage",
        "data": {
            "source": "csv", "root": str(real_data("head_ct")), "image_column": "id", "label_column": "hemorrhage",
            "image_pattern": "{}.png", "classes": {"normal": ["0"], "hemorrhage": ["1"]}, "positive": "hemorrhage",
            "image_size": 32, "split": {"val": 0.2, "test": 0.2},
        },
        "seed": 0,
        "settings": {
            "model": {"arch": "resnet18"},
            "run": {"device": "cpu", "progress_every_s": 0.5, "checkpoint_every_steps": 5},
            "pretrain": {"epochs": 1000, "max_steps": 30, "batch_size": 32, "proj_hidden": 512, "pred_hidden": 512, "proj_dim": 64},
            "finetune": {"epochs": 3, "min_steps": 20, "batch_size": 32},
        },
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            for k, v in value.items():
                spec[key][k] = {**spec[key][k], **v} if isinstance(v, dict) and isinstance(spec[key].get(k), dict) else v
        else:
            spec[key] = value
    d = results / "tasks" / task_id
    d.mkdir(parents=True, exist_ok=True)
    (d / "task.json").write_text(json.dumps(spec))
    return d / "task.json"


def worker(task_json: Path, *extra: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner.cli", "worker", str(task_json), *extra], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def worker_here(task_json: Path) -> int:
    """`byol-runner worker TASK_JSON` in this process: its exit code (the SIGTERM handler it sets is put back)."""
    from runner.cli import main

    handler = signal.getsignal(signal.SIGTERM)
    try:
        return main(["worker", str(task_json)])
    finally:
        signal.signal(signal.SIGTERM, handler)


def events(task_json: Path) -> list[dict]:
    return [json.loads(line) for line in (task_json.parent / "events.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """One BYOL pretraining on the real head CT images (CPU, 32 px, resnet18, 30 steps)."""
    results = tmp_path_factory.mktemp("results")
    task = head_ct_task(results, "pre", "pretrain")
    assert worker_here(task) == 0, events(task)[-1]
    return task


@pytest.mark.e2e
def test_byol_on_real_head_ct_lowers_the_loss_without_collapse(pretrained):
    ev = events(pretrained)
    epochs = [e for e in ev if e["kind"] == "metric"]
    assert len(epochs) == 10  # 119 train images, batch 32: 3 steps an epoch
    first = sum(e["loss"] for e in epochs[:3]) / 3
    last = sum(e["loss"] for e in epochs[-3:]) / 3
    assert last < first - 0.2, (first, last)
    healthy = 1 / math.sqrt(64)
    stds = [e["proj_std"] for e in epochs]
    assert min(stds) > 0.5 * healthy, stds  # far from the 0 of a collapsed representation
    progress = [e for e in ev if e["kind"] == "progress"]
    assert progress and all({"loss", "lr", "tau", "proj_std"} <= set(e) for e in progress)
    assert any("img_per_s" in e for e in progress)
    assert all({"ts", "task", "kind", "epoch", "step"} <= set(e) for e in ev)
    assert ev[-1]["kind"] == "done"
    m = json.loads((pretrained.parent / "metrics.json").read_text())
    assert m["pretrain"]["steps"] == 30 and (pretrained.parent / "encoder.pt").is_file()


@pytest.mark.parametrize("kind", ["finetune", "linear", "supervised", "random-linear"])
@pytest.mark.e2e
def test_every_evaluation_arm_scores_the_test_split_once(pretrained, kind):
    results = pretrained.parent.parent.parent
    task = head_ct_task(results, f"eval-{kind}", kind, budget={"fraction": 0.5}, encoder="tasks/pre/encoder.pt")
    assert worker_here(task) == 0, events(task)[-1]
    m = json.loads((task.parent / "metrics.json").read_text())
    t = m["test"]
    assert t["n"] == 40 and 0 <= t["accuracy"] <= 1 and math.isfinite(t["loss"])
    assert {"auroc", "balanced_accuracy", "sensitivity", "specificity", "confusion_matrix"} <= set(t)
    assert sum(map(sum, t["confusion_matrix"])) == 40
    # 60 training labels and, for the choices, half of the 40 validation images: every label counted
    assert m["n_train_labels"] == 60 and m["n_val_labels"] == 20 and m["n_labeled"] == 80
    assert m["class_names"] == ["normal", "hemorrhage"] and m["positive"] == 1
    assert len(m["predictions"]["test_probs"]) == 40
    if kind in ("linear", "random-linear"):
        assert m["selection"]["C"] in [10.0**k for k in range(-4, 3)]
    else:
        assert 0 < m["selection"]["selected_step"] <= m["selection"]["steps"]
        assert m["selection"]["backbone_lr_scale"] == (0.1 if kind == "finetune" else 1.0)


@pytest.mark.e2e
def test_two_labels_per_class_fine_tune_stays_near_the_prior_loss(pretrained):
    results = pretrained.parent.parent.parent
    for kind in ("finetune", "supervised"):
        # the whole validation split chooses here (an explicit opt-out): this is about not diverging
        task = head_ct_task(results, f"few-{kind}", kind, budget={"per_class": 2, "validation": "full"}, encoder="tasks/pre/encoder.pt")
        assert worker_here(task) == 0, events(task)[-1]
        m = json.loads((task.parent / "metrics.json").read_text())
        assert m["n_train_labels"] == 4 and m["n_labeled"] == 4 + 40 and m["validation"] == "full"
        assert math.isfinite(m["test"]["loss"]) and math.isfinite(m["test"]["loss_uncalibrated"])
        # val-selected step (step 0 predicts the prior) + temperature fitted on val
        assert m["test"]["loss"] < m["prior_loss"] * 1.15, (kind, m["test"]["loss"], m["prior_loss"])


def test_start_errors_are_error_events_and_non_zero_exits(tmp_path):
    bad = tmp_path / "tasks" / "bad" / "task.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"id": "bad", "kind": "pretrain", "datas')
    r = worker(bad, timeout=60)
    assert r.returncode == 2 and "not a valid task spec" in r.stderr
    assert events(bad)[-1]["kind"] == "error" and events(bad)[-1]["error_type"] == "start"

    nodep = head_ct_task(tmp_path, "nodep", "finetune", budget={"fraction": 0.5}, encoder="tasks/missing/encoder.pt")
    r = worker(nodep, timeout=60)
    assert r.returncode == 2 and "needs the pretrained encoder" in r.stderr
    assert "run its pretrain task first" in events(nodep)[-1]["message"]

    gpu = head_ct_task(tmp_path, "gpu", "pretrain", settings={"run": {"device": "cuda"}})
    r = worker(gpu, env={"CUDA_VISIBLE_DEVICES": ""}, timeout=60)
    assert r.returncode == 2 and "asks for a GPU" in r.stderr
    assert events(gpu)[-1]["kind"] == "error" and not (gpu.parent / "metrics.json").exists()


@pytest.mark.e2e
def test_sigkilled_fine_tune_resumes_from_its_checkpoint(pretrained):
    results = pretrained.parent.parent.parent
    task = head_ct_task(results, "ft-kill", "finetune", budget={"fraction": 1.0}, encoder="tasks/pre/encoder.pt",
                        settings={"finetune": {"min_steps": 20, "eval_every_steps": 5}})
    proc = subprocess.Popen([sys.executable, "-m", "runner.cli", "worker", str(task)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = task.parent / "checkpoint.pt"
    deadline = time.time() + 120
    while time.time() < deadline and not ckpt.exists():
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), "no checkpoint within 120 s"
    assert not (task.parent / "metrics.json").exists()
    r = worker(task)
    assert r.returncode == 0, r.stderr
    resumed = [e for e in events(task) if e["kind"] == "log" and "resumed from checkpoint" in e["message"]]
    assert len(resumed) == 1 and "step 0 " not in resumed[0]["message"]
    m = json.loads((task.parent / "metrics.json").read_text())
    assert m["selection"]["steps"] == 20 and math.isfinite(m["test"]["loss"])


def test_the_worker_path_imports_neither_textual_nor_torch_for_a_noop_task(tmp_path):
    d = tmp_path / "tasks" / "n"
    d.mkdir(parents=True)
    (d / "task.json").write_text(json.dumps({"id": "n", "kind": "noop", "dataset": "x", "data": {"source": "synthetic"}, "settings": {}}))
    code = ("import sys; from runner.cli import main; rc = main(['worker', sys.argv[1]]); "
            "assert not {'textual', 'torch', 'sqlite3'} & set(sys.modules), 'heavy import'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, str(d / "task.json")], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads((d / "metrics.json").read_text())["noop"] is True


def test_sigterm_that_torch_save_turns_into_its_own_error_is_still_a_stop(tmp_path, monkeypatch):
    """SIGTERM while torch.save writes (a checkpoint, a model) comes out of its C++ writer as a
    RuntimeError ("enforce fail at inline_container.cc ... unexpected pos"), not as the SystemExit the
    handler raised: the worker still ends as stopped by SIGTERM (143: not the task's failure), seen
    in a full-suite run where such a kill had used up a task's only attempt."""
    import signal
    import time

    import runner.worker.run as W

    def interrupted_save(task, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the real signal, to the real handler main() installs
            time.sleep(5)
        except SystemExit as e:  # what torch's writer does with the exception its Python write raised
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 35303488 vs 35303384") from e
        raise AssertionError("SIGTERM did not arrive")

    d = tmp_path / "tasks" / "n"
    d.mkdir(parents=True)
    (d / "task.json").write_text(json.dumps({"id": "n", "kind": "noop", "dataset": "x", "data": {"source": "synthetic"}, "settings": {}}))
    monkeypatch.setattr(W, "run_task", interrupted_save)
    monkeypatch.setattr(W, "_STOPPED", [])
    previous = signal.getsignal(signal.SIGTERM)
    try:
        code = W.main(str(d / "task.json"))
    finally:
        signal.signal(signal.SIGTERM, previous)
    events = [json.loads(line) for line in (d / "events.jsonl").read_text().splitlines()]
    assert code == 143 and events[-1]["message"] == "stopped by SIGTERM" and events[-1]["error_type"] == "interrupted", events
