"""`byol-runner worker TASK_JSON`: train ONE task, as a container, a Ray task or a local process runs it.

Input: `tasks/<id>/task.json` (a `TaskSpec`). Output, in the same folder: `events.jsonl` (one JSON
object a line, flushed as training goes), `metrics.json` (written last and atomically: its presence
means done), artifacts (`encoder.pt`; `checkpoint.pt` while training). Paths in the spec are
relative to the results dir, which is the task folder's grandparent unless `--results` says so.

Exit codes: 0 done; 1 training failed (error event with the exception); 2 the task cannot start
(bad task.json, missing encoder, no GPU for a GPU task); 143 stopped by SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, ValidationError

from runner.data.sources import DatasetSpec, StrictModel
from runner.ml.config import TrainSettings

ENGINE_VERSION = 4  # bump when a code change alters results: it is part of every task id (4: RandomResizedCrop sampling)
KINDS = ("pretrain", "finetune", "linear", "supervised", "supervised-imagenet", "random-linear", "noop")
# `noop` writes its metrics at once and imports no torch: the runner's own overhead is measured with it.
# BYOL_RUNNER_FAIL_KIND=<kind> makes every task of that kind fail (fault injection for the runner's tests).


class BudgetSpec(StrictModel):
    fraction: float | None = Field(None, gt=0, le=1)
    per_class: int | None = Field(None, ge=1)
    validation: Literal["budget", "full"] = "budget"  # the manifest's labels.validation
    min_validation_per_class: int = Field(5, ge=1)


class TaskSpec(StrictModel):
    """Everything that decides a task's result (the task id is a hash of it), and nothing else."""

    id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    kind: Literal[KINDS]  # type: ignore[valid-type]
    dataset: str
    data: DatasetSpec
    seed: int = 0
    budget: BudgetSpec | None = None
    settings: TrainSettings
    encoder: str | None = Field(None, description="the pretrain task's encoder.pt, relative to the results dir")
    cache_dir: str = "cache"
    engine_version: int = ENGINE_VERSION


class StartError(Exception):
    """The task cannot start: exit 2 with an error event that says why."""


class EventLog:
    """Appends one JSON line per event and flushes it, so a reader (the runner, the TUI) sees it now."""

    def __init__(self, path: Path, task: str) -> None:
        self.task = task
        self.f = open(path, "a", buffering=1)

    def emit(self, kind: str, epoch: int | None = None, step: int | None = None, **values) -> None:
        line = {"ts": round(time.time(), 3), "task": self.task, "kind": kind, "epoch": epoch, "step": step, **values}
        self.f.write(json.dumps(line, default=float) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def load_task(path: Path, data_root: str | None = None) -> TaskSpec:
    """The task spec; with `data_root`, its data set's folder (or npz file's folder) is that path, as
    where a container mounts it: the spec is checked against the data set where it is, not where the
    runner saw it."""
    try:
        raw = json.loads(path.read_bytes())
        if data_root is not None and isinstance(raw, dict) and isinstance(raw.get("data"), dict):
            data = raw["data"]
            if "root" in data:
                data["root"] = data_root
            elif "path" in data:
                data["path"] = str(Path(data_root) / Path(str(data["path"])).name)
        return TaskSpec.model_validate(raw)
    except FileNotFoundError:
        raise StartError(f"{path}: no such task file") from None
    except ValueError as e:
        if not isinstance(e, ValidationError):  # not JSON at all
            raise StartError(f"{path}: not a valid task spec: not JSON ({e})") from None
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise StartError(f"{path}: not a valid task spec: {where}: {first['msg']} ({e.error_count()} errors)") from None


def resolve_device(want: str):
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


def run_task(task: TaskSpec, task_dir: Path, results: Path, log: EventLog) -> dict:
    if os.environ.get("BYOL_RUNNER_FAIL_KIND") == task.kind:
        raise RuntimeError(f"injected failure for kind {task.kind} (BYOL_RUNNER_FAIL_KIND)")
    if task.kind == "noop":
        return {"noop": True}
    import torch

    from runner.data.dataset import prepare
    from runner.data.splits import LabelBudget
    from runner.ml import train as T
    from runner.ml.metrics import apply_temperature, classification_metrics, fit_temperature, prior_loss
    from runner.ml.models import Backbone

    device = resolve_device(task.settings.run.device)
    encoder_path = results / task.encoder if task.encoder else None
    if task.kind in ("finetune", "linear"):
        if encoder_path is None or not encoder_path.is_file():
            raise StartError(f"task {task.id} ({task.kind}) needs the pretrained encoder {encoder_path}, which does not exist: run its pretrain task first")
    torch.manual_seed(task.seed)
    ctx = T.Context(device=device, run=task.settings.run, task_dir=task_dir, seed=task.seed, emit=log.emit)
    ds = prepare(task.dataset, task.data, results / task.cache_dir)
    size = task.settings.model.image_size or task.data.image_size
    arch = task.settings.model.arch
    train_idx = ds.splits["train"]
    log.emit("log", message=f"{task.kind} on {task.dataset}: {len(ds.keys)} images, {ds.channels} channel(s), device {device}")
    started = time.perf_counter()
    if task.kind == "pretrain":
        summary = T.pretrain_byol(ds.pixels(train_idx), task.settings.pretrain, arch, size, ctx)
        return {"pretrain": summary, "seconds": round(time.perf_counter() - started, 2)}

    if task.budget is None:
        raise StartError(f"task {task.id} ({task.kind}) has no label budget")
    budget = LabelBudget(fraction=task.budget.fraction, per_class=task.budget.per_class)
    labeled = ds.labeled(budget, task.seed)
    # the validation labels this task may use for any choice: drawn at the budget's rate (or the
    # whole split, labels.validation: full); too few in some class and nothing is chosen
    val = ds.validation(budget, task.seed) if task.budget.validation == "budget" else ds.splits["val"]
    test = ds.splits["test"]
    k = len(ds.class_names)
    selecting = len(val) > 0 and int(np.bincount(ds.labels[val], minlength=k).min()) >= task.budget.min_validation_per_class
    if not selecting:
        log.emit("log", message=f"{len(val)} validation labels under the budget ({task.budget.min_validation_per_class} per class "
                                "needed to choose anything): fixed schedule, no selection, no temperature")
        val = val[:0]
    positive = ds.class_names.index(ds.spec.positive) if ds.spec.positive else (1 if k == 2 else None)
    if task.kind in ("finetune", "supervised", "supervised-imagenet"):
        pretrained = task.kind != "supervised"
        if task.kind == "finetune":
            backbone = T.load_encoder(encoder_path, device)
        else:  # ImageNet weights come from the torch hub cache; the plan checked they are there
            backbone = Backbone(arch, ds.channels, weights="DEFAULT" if pretrained else None)
        model, selection = T.train_classifier(
            backbone, pretrained, (ds.pixels(labeled), ds.labels[labeled]), (ds.pixels(val), ds.labels[val]) if selecting else None,
            k, task.settings.finetune, size, ctx,
        )
        val_probs = T.predict(model, T.to_device_images(ds.pixels(val), device), size, ctx).numpy() if selecting else None
        probs = T.predict(model, T.to_device_images(ds.pixels(test), device), size, ctx).numpy()
    else:  # linear probe on the pretrained encoder, or on a random-init one (the control)
        backbone = T.load_encoder(encoder_path, device) if task.kind == "linear" else Backbone(arch, ds.channels)
        feats = {name: T.extract_features(backbone, ds.pixels(idx), size, ctx)
                 for name, idx in (("train", labeled), ("val", val), ("test", test)) if selecting or name != "val"}
        labels = {"train": ds.labels[labeled], "val": ds.labels[val]}
        proba, selection = T.linear_probe(feats, labels, task.settings.probe, k)
        val_probs, probs = (proba(feats["val"]) if selecting else None), proba(feats["test"])
    test_labels = ds.labels[test]
    # every arm's probabilities get a temperature fitted on val: the loss compares calibrated
    # models, and no prediction changes (the raw loss is kept beside it)
    temperature = fit_temperature(val_probs, ds.labels[val]) if selecting else 1.0
    raw = classification_metrics(probs, test_labels, positive)
    probs = apply_temperature(probs, temperature)
    return {
        "test": classification_metrics(probs, test_labels, positive) | {"loss_uncalibrated": raw["loss"]},
        "temperature": round(temperature, 4) if selecting else None,
        "selection": selection,
        # the bar a degenerate model does not clear: always predicting the test split's class frequencies
        "prior_loss": prior_loss(test_labels, test_labels, k),
        "n_labeled": int(len(labeled) + len(val)),  # every label the task touched: training + validation
        "n_train_labels": int(len(labeled)),
        "n_val_labels": int(len(val)),
        "validation": task.budget.validation,
        "class_names": ds.class_names,
        "positive": positive,
        "predictions": {"test_probs": np.round(probs, 6).tolist(), "test_labels": test_labels.tolist(),
                        **_test_groups(ds, test)},
        "seconds": round(time.perf_counter() - started, 2),
    }


def _test_groups(ds, test: np.ndarray) -> dict:  # noqa: ANN001 - a PreparedDataset
    """The test images' groups (patients), the units the report's intervals resample, when the data
    set has groups; nothing when every image is its own."""
    groups = [ds.groups[i] for i in test]
    return {"test_groups": groups} if any(g != ds.keys[i] for g, i in zip(groups, test)) else {}


def _on_sigterm(signum, frame):  # noqa: ANN001
    raise SystemExit(143)


def _die_with_parent() -> None:
    """Under the local executor: get SIGTERM when the runner dies (even by SIGKILL), so no worker
    trains on unwatched; its last checkpoint is where the next run resumes."""
    parent = os.environ.get("BYOL_RUNNER_PARENT_PID")
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # the runner died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def main(task_json: str, results: str | None = None, data_root: str | None = None) -> int:
    from runner.atomic import atomic_write_json

    path = Path(task_json).resolve()
    task_dir = path.parent
    results_dir = Path(results).resolve() if results else task_dir.parent.parent
    log = EventLog(task_dir / "events.jsonl", task_dir.name)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        _die_with_parent()
        task = load_task(path, data_root)  # data_root: the same task, its data mounted elsewhere (/data/<name>)
        log.task = task.id
        log.emit("log", message=f"worker pid {os.getpid()} on {os.uname().nodename}, engine {ENGINE_VERSION}")
        result = run_task(task, task_dir, results_dir, log)
        metrics = {"task": task.id, "kind": task.kind, "dataset": task.dataset, "seed": task.seed,
                   "budget": task.budget.model_dump() if task.budget else None, "engine_version": ENGINE_VERSION, **result}
        atomic_write_json(metrics, task_dir / "metrics.json")
        (task_dir / "checkpoint.pt").unlink(missing_ok=True)  # done: the checkpoint has served
        log.emit("done", message="metrics.json written")
        return 0
    except StartError as e:
        log.emit("error", message=str(e), error_type="start")
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:
        if e.code == 143:
            log.emit("error", message="stopped by SIGTERM", error_type="interrupted")
            return 143
        raise
    except KeyboardInterrupt:
        log.emit("error", message="interrupted", error_type="interrupted")
        return 130
    except Exception as e:  # noqa: BLE001 - every failure must end as an error event and an exit code
        text = f"{type(e).__name__}: {e}"
        oom = "CUDA out of memory" in str(e) or type(e).__name__ == "OutOfMemoryError"
        from runner.errors import UserError

        kind = "cuda_oom" if oom else ("data" if isinstance(e, UserError) else "exception")
        if oom:
            text = f"CUDA out of memory: lower pretrain/finetune batch_size or image_size, or use a larger GPU ({text})"
        log.emit("error", message=text, error_type=kind)
        traceback.print_exc()
        return 1
    finally:
        log.close()
