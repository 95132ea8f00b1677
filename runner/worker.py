"""`byol-runner worker TASK_JSON`: train ONE task, as a container, a Ray task or a local process runs it.

Input: `tasks/<id>/task.json` (a `TaskSpec`). Output, in the same folder: `events.jsonl` (one JSON
object a line, flushed as training goes), `metrics.json` (written last and atomically: its presence
means done), artifacts (`encoder.pt`; `checkpoint.pt` while training). Paths in the spec are
relative to the results dir, which is the task folder's grandparent unless `--results` says so.

Exit codes: 0 done; 1 training failed (error event with the exception); 2 the task cannot start
(bad task.json, missing encoder, no GPU for a GPU task); 143 stopped by SIGTERM.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from runner.arms import CLASSIFIER_KINDS, EVALUATE, PRETRAININGS
from runner.contracts import ENGINE_VERSION, EventKind, TaskSpec, event_line
from runner.data.cache import file_sha


class StartError(Exception):
    """The task cannot start: exit 2 with an error event that says why."""


class EventLog:
    """Appends one JSON line per event and flushes it, so a reader (the runner, the TUI) sees it now."""

    def __init__(self, path: Path, task: str) -> None:
        self.task = task
        self.f = open(path, "a", buffering=1)

    def emit(self, kind: EventKind | str, epoch: int | None = None, step: int | None = None, **values) -> None:
        self.f.write(event_line(self.task, kind, epoch, step, **values))
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
    """Train one task; its metrics.json content. Each kind is a small function below; every labeled
    kind ends in the same scoring step (`_score`)."""
    if task.kind == "noop":
        return {"noop": True}
    import torch

    from runner.data.dataset import prepare
    from runner.ml import train as T

    device = resolve_device(task.settings.run.device)
    for what, rel in (("cache_dir", task.cache_dir), ("encoder", task.encoder)):
        if rel is not None and not _inside(results / rel, results):
            raise StartError(f"task {task.id}: {what} {rel!r} points outside the results dir {results}: task.json was edited by hand")
    encoder_path = results / task.encoder if task.encoder else None
    if task.kind in ("finetune", "linear"):
        if encoder_path is None or not encoder_path.is_file():
            raise StartError(f"task {task.id} ({task.kind}) needs the pretrained encoder {encoder_path}, which does not exist: run its pretrain task first")
    torch.manual_seed(task.seed)
    ctx = T.Context(device=device, run=task.settings.run, task_dir=task_dir, seed=task.seed, emit=log.emit)
    if task.kind == EVALUATE:
        return _evaluate(task, results, ctx, log)
    ds = prepare(task.dataset, task.data, results / task.cache_dir)
    log.emit("log", message=f"{task.kind} on {task.dataset}: {len(ds.keys)} images, {ds.channels} channel(s), device {device}")
    started = time.perf_counter()
    if task.kind == "pretrain":
        return _pretrain(task, ds, ctx) | {"seconds": round(time.perf_counter() - started, 2)}
    if task.budget is None:
        raise StartError(f"task {task.id} ({task.kind}) has no label budget")
    labels = Labels(task, ds, log)
    train = _classifier if task.kind in CLASSIFIER_KINDS else _probe
    val_probs, probs, selection, network = train(task, ds, labels, encoder_path, ctx)
    metrics, temperature = _score(task, ds, labels, val_probs, probs, selection)
    _save_model(task, ds, labels, metrics, temperature if labels.selecting else None, network, ctx)
    return metrics | {"seconds": round(time.perf_counter() - started, 2),
                      "artifacts": {"model.pt": file_sha(task_dir / "model.pt")}}


def _save_model(task: TaskSpec, ds, labels: "Labels", metrics: dict, temperature: float | None, network: dict, ctx) -> None:  # noqa: ANN001
    """model.pt: what scoring an image needs (runner/ml/saved.py), for external test sets and `predict`."""
    from runner.ml import saved

    image = {"image_size": ds.spec.image_size, "fit": ds.spec.fit, "channels": ds.channels}
    run = task.settings.run.model_dump(mode="json") | {"precision": "bf16" if ctx.bf16 else "fp32"}  # as it was scored
    train_counts = np.bincount(ds.labels[labels.train], minlength=len(ds.class_names)).tolist()
    saved.save(ctx.task_dir / "model.pt", task_id=task.id, kind=task.kind, arch=task.settings.model.arch, channels=ds.channels,
               class_names=ds.class_names, positive=metrics["positive"], image=image, input_size=_size(task), run=run,
               temperature=temperature, selection=metrics["selection"], train_counts=train_counts, **network)


def _evaluate(task: TaskSpec, results: Path, ctx, log: EventLog) -> dict:  # noqa: ANN001 - a train.Context
    """Score an external test set, all of it, with a classifier task's saved model.pt: the same
    calibrated probabilities and metrics as that task's own test split."""
    from runner.data.dataset import prepare
    from runner.ml import saved
    from runner.ml.metrics import apply_temperature, classification_metrics, prior_loss, stored_probs

    if task.model is None or not _inside(results / task.model, results):
        raise StartError(f"task {task.id}: model {task.model!r} is not a model.pt inside the results dir {results}")
    try:
        model = saved.load(results / task.model)
        # scored as the classifier scored its own test split (its evaluation view and precision), here
        ctx = dataclasses.replace(ctx, run=saved.scoring_run(model, task.settings.run.device))
        scorer = saved.Scorer(model, results, ctx.device, ctx)
    except saved.ModelFileError as e:
        raise StartError(f"task {task.id} scores the classifier of {task.model}: {e}") from None
    ds = prepare(task.dataset, task.data, results / task.cache_dir, classes_of=model["class_names"])
    test = ds.splits["test"]
    log.emit("log", message=f"evaluate {task.model} on {task.dataset} (external test set of {task.data.external_test_of}): "
                            f"{len(test)} images")
    started = time.perf_counter()
    raw_probs = scorer.raw(ds.pixels(test))
    if not np.isfinite(raw_probs).all():
        raise RuntimeError("the classifier predicts non-finite probabilities on the external test set; no result is recorded")
    probs = apply_temperature(raw_probs, scorer.temperature)
    labels = ds.labels[test]
    k = len(model["class_names"])
    raw = classification_metrics(raw_probs, labels, model["positive"])
    return {
        "test": classification_metrics(probs, labels, model["positive"]) | {"loss_uncalibrated": raw["loss"]},
        "temperature": None if model["temperature"] is None else round(model["temperature"], 4),
        "selection": model["selection"],
        # the constant guess a classifier could have made: its training labels' class frequencies (the
        # external set's own would hold a prevalence shift against it)
        "prior_loss": prior_loss(np.repeat(np.arange(k), model["train_counts"]), labels, k),
        "prior": "training labels",
        "scored": {task.model: file_sha(results / task.model)},  # a classifier trained again makes this stale
        "validation": task.budget.validation if task.budget else None,  # the classifier's: what chose its step and temperature
        "external_test_of": task.data.external_test_of,
        "classifier": model["task"],
        "classifier_kind": model["kind"],
        "class_names": model["class_names"],
        "positive": model["positive"],
        "predictions": {"test_probs": stored_probs(probs), "test_labels": labels.tolist(), **_test_groups(ds, test)},
        "seconds": round(time.perf_counter() - started, 2),
    }


def _inside(path: Path, root: Path) -> bool:
    path, root = path.resolve(), root.resolve()
    return path == root or root in path.parents


def _size(task: TaskSpec) -> int:
    return task.settings.model.image_size or task.data.image_size


def _pretrain(task: TaskSpec, ds, ctx) -> dict:  # noqa: ANN001 - a PreparedDataset, a train.Context
    from runner.ml.pretrain import pretrain

    p = PRETRAININGS[task.pretraining or "byol"]
    summary = pretrain(ds.pixels(ds.splits["train"]), task.settings, p.method, p.init, task.settings.model.arch, _size(task), ctx)
    # what the dependants read, with its checksum: a damaged encoder.pt reopens this task instead of failing them
    return {"pretrain": summary, "artifacts": {"encoder.pt": file_sha(ctx.task_dir / "encoder.pt")}}


class Labels:
    """The labels a task may touch: its training subset, and the validation labels for any choice,
    drawn at the budget's rate (or the whole split, labels.validation: full). Too few validation
    labels in some class and nothing is chosen: `selecting` is False and `val` is empty."""

    def __init__(self, task: TaskSpec, ds, log: EventLog) -> None:  # noqa: ANN001 - a PreparedDataset
        from runner.data.splits import LabelBudget

        budget = LabelBudget(fraction=task.budget.fraction, per_class=task.budget.per_class)
        self.train = ds.labeled(budget, task.seed)
        val = ds.validation(budget, task.seed) if task.budget.validation == "budget" else ds.splits["val"]
        self.k = len(ds.class_names)
        self.selecting = len(val) > 0 and int(np.bincount(ds.labels[val], minlength=self.k).min()) >= task.budget.min_validation_per_class
        if not self.selecting:
            log.emit("log", message=f"{len(val)} validation labels under the budget ({task.budget.min_validation_per_class} per class "
                                    "needed to choose anything): fixed schedule, no selection, no temperature")
            val = val[:0]
        self.val = val
        self.test = ds.splits["test"]


def _classifier(task: TaskSpec, ds, labels: Labels, encoder_path: Path | None, ctx) -> tuple:  # noqa: ANN001
    """Fine-tune the pretrained encoder, or train from random init or ImageNet weights (the torch hub
    cache; the plan checked they are there); (val probabilities or None, test probabilities, selection)."""
    from runner.ml import train as T
    from runner.ml.models import Backbone

    size = _size(task)
    if task.kind == "finetune":
        backbone = T.load_encoder(encoder_path, ctx.device)
    else:
        backbone = Backbone(task.settings.model.arch, ds.channels, weights="DEFAULT" if task.kind == "supervised-imagenet" else None)
    model, selection = T.train_classifier(
        backbone, task.kind != "supervised", (ds.pixels(labels.train), ds.labels[labels.train]),
        (ds.pixels(labels.val), ds.labels[labels.val]) if labels.selecting else None, labels.k, task.settings.finetune, size, ctx,
    )
    val_probs = T.predict(model, T.to_device_images(ds.pixels(labels.val), ctx.device), size, ctx).numpy() if labels.selecting else None
    probs = T.predict(model, T.to_device_images(ds.pixels(labels.test), ctx.device), size, ctx).numpy()
    from runner.ml.saved import cpu_state

    return val_probs, probs, selection, {"state_dict": cpu_state(model)}


def _probe(task: TaskSpec, ds, labels: Labels, encoder_path: Path | None, ctx) -> tuple:  # noqa: ANN001
    """A linear probe on the pretrained encoder, or on a random-init or ImageNet one (the controls)."""
    from runner.ml import train as T
    from runner.ml.models import Backbone

    if task.kind == "linear":
        backbone = T.load_encoder(encoder_path, ctx.device)
    else:  # the controls: a random-init network, or its ImageNet weights (the torch hub cache; the plan checked)
        backbone = Backbone(task.settings.model.arch, ds.channels, weights="DEFAULT" if task.kind == "imagenet-linear" else None)
    feats = {name: T.extract_features(backbone, ds.pixels(idx), _size(task), ctx)
             for name, idx in (("train", labels.train), ("val", labels.val), ("test", labels.test)) if labels.selecting or name != "val"}
    proba, selection, (scaler, clf) = T.linear_probe(feats, {"train": ds.labels[labels.train], "val": ds.labels[labels.val]}, task.settings.probe, labels.k)
    from runner.ml.saved import cpu_state, probe_state

    network = {"probe": probe_state(scaler, clf, selection["C"], task.settings.probe.max_iter)}
    if task.kind == "linear":  # the pretraining's encoder is kept already: named with its checksum, not copied
        network["encoder"] = {"path": task.encoder, "sha256": file_sha(encoder_path)}
    else:
        network["backbone"] = cpu_state(backbone)
    return (proba(feats["val"]) if labels.selecting else None), proba(feats["test"]), selection, network


def _score(task: TaskSpec, ds, labels: Labels, val_probs, probs, selection: dict) -> tuple[dict, float]:  # noqa: ANN001
    """Test metrics, calibrated by a temperature fitted on the budget's validation labels (no
    prediction changes; the raw loss is kept beside it), and the label accounting; and the
    temperature as applied (metrics.json rounds it: model.pt keeps it whole)."""
    from runner.ml.metrics import apply_temperature, classification_metrics, fit_temperature, prior_loss, stored_probs

    positive = ds.class_names.index(ds.spec.positive) if ds.spec.positive else (1 if labels.k == 2 else None)
    if not np.isfinite(probs).all():
        raise RuntimeError(f"the {task.kind} model predicts non-finite probabilities (its training diverged): lower the learning "
                           "rate (finetune.lr, pretrain.base_lr) and rerun; no result is recorded")
    test_labels = ds.labels[labels.test]
    temperature = fit_temperature(val_probs, ds.labels[labels.val]) if labels.selecting else 1.0
    raw = classification_metrics(probs, test_labels, positive)
    probs = apply_temperature(probs, temperature)
    return {
        "test": classification_metrics(probs, test_labels, positive) | {"loss_uncalibrated": raw["loss"]},
        "temperature": round(temperature, 4) if labels.selecting else None,
        "selection": selection,
        # the bar a degenerate model does not clear: always predicting the test split's class frequencies
        "prior_loss": prior_loss(test_labels, test_labels, labels.k),
        "n_labeled": int(len(labels.train) + len(labels.val)),  # every label the task touched: training + validation
        "n_train_labels": int(len(labels.train)),
        "n_val_labels": int(len(labels.val)),
        "validation": task.budget.validation,
        "class_names": ds.class_names,
        "positive": positive,
        "predictions": {"test_probs": stored_probs(probs), "test_labels": test_labels.tolist(),
                        **_test_groups(ds, labels.test)},
    }, temperature


def _test_groups(ds, test: np.ndarray) -> dict:  # noqa: ANN001 - a PreparedDataset
    """The test images' groups (patients), the units the report's intervals resample, when the data
    set has groups; nothing when every image is its own."""
    groups = [ds.groups[i] for i in test]
    return {"test_groups": groups} if any(g != ds.keys[i] for g, i in zip(groups, test)) else {}


def _environment(task: TaskSpec) -> dict:
    import platform

    import torch

    device = resolve_device(task.settings.run.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    return {"device": name, "torch": torch.__version__, "python": platform.python_version(), "host": os.uname().nodename}


def _disk_full(e: BaseException) -> bool:
    import errno

    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


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
        if task.kind != "noop":
            result["environment"] = _environment(task)  # for the report's provenance: where and with what it ran
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
        elif _disk_full(e):
            from runner.errors import free_space

            kind = "disk_full"
            text = (f"no space left on the disk of {task_dir} ({free_space(str(task_dir))} free): free some space, then `byol-runner run` "
                    f"resumes from the last checkpoint ({text})")
        log.emit("error", message=text, error_type=kind)
        traceback.print_exc()
        return 1
    finally:
        log.close()
