"""What each kind of task does, once `run.run_task` has its data set and device: a pretraining, a
classifier (fine-tune, supervised), a linear probe (on the pretrained encoder, or a control's), the
scoring every labeled kind ends in, and the evaluation of an external test set with a saved model.pt."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Protocol

import numpy as np

from runner.arms import PRETRAININGS
from runner.contracts import TaskSpec
from runner.data.cache import file_sha
from runner.errors import StartError


class EventLog(Protocol):
    """Where a kind reports (run.EventLog: a line in events.jsonl)."""

    def emit(self, kind: str, epoch: int | None = None, step: int | None = None, **values) -> None: ...  # noqa: ANN003

def save_model(task: TaskSpec, ds, labels: "Labels", metrics: dict, temperature: float | None, network: dict, ctx) -> None:  # noqa: ANN001
    """model.pt: what scoring an image needs (runner/ml/saved.py), for external test sets and `predict`."""
    from runner.ml import saved

    image = {"image_size": ds.spec.image_size, "fit": ds.spec.fit, "channels": ds.channels}
    if getattr(ds.spec, "windows", None) is not None or getattr(ds.spec, "slice_axis", "axial") != "axial":
        image |= {"windows": [list(w) for w in ds.spec.windows or ()] or None, "slice_axis": ds.spec.slice_axis}
    run = task.settings.run.model_dump(mode="json") | {"precision": "bf16" if ctx.bf16 else "fp32"}  # as it was scored
    train_counts = np.bincount(ds.labels[labels.train], minlength=len(ds.class_names)).tolist()
    saved.save(ctx.task_dir / "model.pt", task_id=task.id, kind=task.kind, arch=task.settings.model.arch, channels=ds.channels,
               class_names=ds.class_names, positive=metrics["positive"], image=image, input_size=input_size(task), run=run,
               temperature=temperature, selection=metrics["selection"], train_counts=train_counts, **network)


def evaluate(task: TaskSpec, results: Path, ctx, log: EventLog) -> dict:  # noqa: ANN001 - a train.Context
    """Score an external test set, all of it, with a classifier task's saved model.pt: the same
    calibrated probabilities and metrics as that task's own test split."""
    from runner.data.dataset import prepare
    from runner.ml import saved
    from runner.ml.metrics import apply_temperature, classification_metrics, prior_loss, stored_probs

    if task.model is None or not inside(results / task.model, results):
        raise StartError(f"task {task.id}: model {task.model!r} is not a model.pt inside the results dir {results}")
    try:
        model = saved.load(results / task.model, Path(task.model).parent.name)
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
        "predictions": {"test_probs": stored_probs(probs), "test_labels": labels.tolist(), **test_groups(ds, test),
                        "test_images": [ds.keys[i] for i in test]},
        "seconds": round(time.perf_counter() - started, 2),
    }


def inside(path: Path, root: Path) -> bool:
    path, root = path.resolve(), root.resolve()
    return path == root or root in path.parents


def _imagenet(task: TaskSpec) -> str:
    """Where a task's ImageNet weights come from: the manifest's file, else torchvision's ("DEFAULT")."""
    return task.settings.model.imagenet_weights or "DEFAULT"


def input_size(task: TaskSpec) -> int:
    return task.settings.model.image_size or task.data.image_size


def pretrain(task: TaskSpec, ds, ctx, log: EventLog | None = None) -> dict:  # noqa: ANN001 - a PreparedDataset, a train.Context
    from runner.ml.pretrain import pretrain as run_pretraining

    p = PRETRAININGS[task.pretraining or "byol"]
    summary = run_pretraining(ds.pixels(ds.splits["train"]), task.settings, p.method, p.init, task.settings.model.arch, input_size(task),
                              ctx, weights_sha256=task.imagenet_sha256, monitor=monitor_data(task, ds, log))
    # what the dependants read, with its checksum: a damaged encoder.pt reopens this task instead of failing them
    return {"pretrain": summary, "artifacts": {"encoder.pt": file_sha(ctx.task_dir / "encoder.pt")}}


def monitor_data(task: TaskSpec, ds, log: EventLog | None = None):  # noqa: ANN001, ANN201 - a PreparedDataset; a KnnData or None
    """The pretraining monitor's labeled images: the smallest budget's train labels as the memory bank,
    its validation labels as the queries (the whole validation split under labels.validation: full),
    drawn as that budget's tasks draw them. None when it is off, or two classes are not there to score."""
    from runner.data.splits import LabelBudget
    from runner.ml.monitor import KnnData
    from runner.scoring import too_few

    b = task.monitor_labels
    if b is None or task.settings.run.monitor_every_steps == 0:
        return None
    budget = LabelBudget(fraction=b.fraction, per_class=b.per_class)
    bank = ds.labeled(budget, task.seed)
    queries = ds.validation(budget, task.seed) if b.validation == "budget" else ds.splits["val"]
    k = len(ds.class_names)
    positive = ds.class_names.index(ds.spec.positive) if ds.spec.positive else (1 if k == 2 else 0)
    if len(np.unique(ds.labels[queries])) < 2 or len(np.unique(ds.labels[bank])) < 2:
        if log is not None:
            log.emit("log", message=f"pretraining monitor off: the smallest budget's labels hold one class ({len(bank)} bank, "
                                    f"{len(queries)} query images)")
        return None
    data = KnnData(ds.pixels(bank), ds.labels[bank], ds.pixels(queries), ds.labels[queries], positive, k)
    n = data.counts()
    if log is not None and too_few(n["queries"], n["query_classes"]):
        log.emit("log", message=f"pretraining monitor: {n['queries']} labelled query images ({_per_class(ds, n)}) are too few for "
                                "its kNN AUROC to tell an encoder that learned from one that did not: read it as a rough sign "
                                "(run.monitor_labels: largest gives it the most labels)")
    return data


def _per_class(ds, n: dict) -> str:  # noqa: ANN001 - a PreparedDataset
    return ", ".join(f"{c} {ds.class_names[i]}" for i, c in enumerate(n["query_classes"]))


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


def classifier(task: TaskSpec, ds, labels: Labels, encoder_path: Path | None, ctx) -> tuple:  # noqa: ANN001
    """Fine-tune the pretrained encoder, or train from random init or ImageNet weights (the torch hub
    cache; the plan checked they are there); (val probabilities or None, test probabilities, selection)."""
    from runner.ml import train as T
    from runner.ml.models import Backbone

    size = input_size(task)
    if task.kind == "finetune":
        backbone = T.load_encoder(encoder_path, ctx.device)
    else:
        backbone = Backbone(task.settings.model.arch, ds.channels, weights=_imagenet(task) if task.kind == "supervised-imagenet" else None,
                            weights_sha256=task.imagenet_sha256)
    model, selection = T.train_classifier(
        backbone, task.kind != "supervised", (ds.pixels(labels.train), ds.labels[labels.train]),
        (ds.pixels(labels.val), ds.labels[labels.val]) if labels.selecting else None, labels.k, task.settings.finetune, size, ctx,
    )
    from runner.ml.weights import round_

    round_(model, task.settings.run.weights)  # the network as model.pt keeps it is the one scored (run.weights)
    val_probs = T.predict(model, T.to_device_images(ds.pixels(labels.val), ctx.device), size, ctx).numpy() if labels.selecting else None
    probs = T.predict(model, T.to_device_images(ds.pixels(labels.test), ctx.device), size, ctx).numpy()
    from runner.ml.saved import cpu_state
    from runner.ml.weights import pack

    return val_probs, probs, selection, {"state_dict": pack(cpu_state(model), task.settings.run.weights)}


def probe(task: TaskSpec, ds, labels: Labels, encoder_path: Path | None, ctx) -> tuple:  # noqa: ANN001
    """A linear probe on the pretrained encoder, or on a random-init or ImageNet one (the controls)."""
    import torch

    from runner.ml import train as T
    from runner.ml.models import Backbone

    if task.kind == "linear":
        backbone = T.load_encoder(encoder_path, ctx.device)
    else:  # the controls: a random-init network, or its ImageNet weights (the torch hub cache; the plan checked)
        rng_state = torch.get_rng_state()  # what builds the same network again (model.pt keeps this, not the weights)
        weights = _imagenet(task) if task.kind == "imagenet-linear" else None
        backbone = Backbone(task.settings.model.arch, ds.channels, weights=weights, weights_sha256=task.imagenet_sha256)
    feats = {name: T.extract_features(backbone, ds.pixels(idx), input_size(task), ctx)
             for name, idx in (("train", labels.train), ("val", labels.val), ("test", labels.test)) if labels.selecting or name != "val"}
    proba, selection, (scaler, clf) = T.linear_probe(feats, {"train": ds.labels[labels.train], "val": ds.labels[labels.val]}, task.settings.probe, labels.k)
    from runner.ml.saved import cpu_state, probe_state, rebuild_recipe

    network = {"probe": probe_state(scaler, clf, selection["C"], task.settings.probe.max_iter)}
    if task.kind == "linear":  # the pretraining's encoder is kept already: named with its checksum, not copied
        network["encoder"] = {"path": task.encoder, "sha256": file_sha(encoder_path)}
    else:
        network["rebuild"] = rebuild_recipe(rng_state, weights, task.imagenet_sha256, cpu_state(backbone))
    return (proba(feats["val"]) if labels.selecting else None), proba(feats["test"]), selection, network


def score(task: TaskSpec, ds, labels: Labels, val_probs, probs, selection: dict) -> tuple[dict, float]:  # noqa: ANN001
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
                        **test_groups(ds, labels.test), "test_images": [ds.keys[i] for i in labels.test],
                        **_validation_predictions(ds, labels, val_probs, temperature)},
    }, temperature


def _validation_predictions(ds, labels: Labels, val_probs, temperature: float) -> dict:  # noqa: ANN001
    """The budget's validation probabilities (calibrated as the test ones) and labels: what the report
    chooses an operating threshold on. Nothing when too few validation labels chose anything."""
    from runner.ml.metrics import apply_temperature, stored_probs

    if not labels.selecting or val_probs is None:
        return {}
    return {"val_probs": stored_probs(apply_temperature(val_probs, temperature)), "val_labels": ds.labels[labels.val].tolist()}


def test_groups(ds, test: np.ndarray) -> dict:  # noqa: ANN001 - a PreparedDataset
    """The test images' groups (patients), the units the report's intervals resample, when the data
    set has groups; nothing when every image is its own."""
    groups = [ds.groups[i] for i in test]
    return {"test_groups": groups} if any(g != ds.keys[i] for g, i in zip(groups, test)) else {}


