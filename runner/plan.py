"""Manifest -> tasks: a small DAG with content-hash ids.

One `pretrain` per (dataset, seed, model and pretrain settings) serves every label budget and both
BYOL evaluations; `finetune` and `linear` depend on it; `supervised`, `supervised-imagenet` and
`random-linear` stand alone. A task id hashes everything that changes the task's result: the data
set's fingerprint (pixels, classes, splits), the kind, seed, label budget, the settings the kind
uses, the ids of its dependencies and ENGINE_VERSION. Not in it: the data set's name and path, the
device, compile and logging settings. Same inputs, same id, in any manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from runner.atomic import atomic_write_text
from runner.data.cache import Progress, no_progress
from runner.data.dataset import accounting, prepare
from runner.data.sources import RootedSource
from runner.errors import DataError
from runner.manifest import Manifest
from runner.worker import ENGINE_VERSION

METHOD_KIND = {
    "byol-finetune": "finetune",
    "byol-linear": "linear",
    "supervised": "supervised",
    "supervised-imagenet": "supervised-imagenet",
    "random-linear": "random-linear",
}
# which settings sections change each kind's result
KIND_SETTINGS = {
    "pretrain": ("model", "pretrain"),
    "finetune": ("model", "finetune"),
    "linear": ("model", "probe"),
    "supervised": ("model", "finetune"),
    "supervised-imagenet": ("model", "finetune"),
    "random-linear": ("model", "probe"),
    "noop": (),
}


@dataclass
class PlannedTask:
    id: str
    kind: str
    dataset: str
    method: str  # the arm: a METHOD_KIND key, or "byol-pretrain"
    seed: int
    budget: str | None  # e.g. "10%" or "2/class"
    deps: list[str]
    spec: dict  # the task.json

    @property
    def label(self) -> str:
        parts = [self.dataset, self.method, self.budget or "", f"seed {self.seed}"]
        return " ".join(p for p in parts if p)


@dataclass
class Plan:
    name: str
    tasks: list[PlannedTask]  # dependencies before dependents
    data: dict[str, dict] = field(default_factory=dict)  # per data set: every image accounted for (data.json)

    def by_id(self) -> dict[str, PlannedTask]:
        return {t.id: t for t in self.tasks}


def task_id(identity: dict) -> str:
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def data_spec(spec) -> dict:
    data = spec.model_dump(mode="json")
    if isinstance(spec, RootedSource):
        data["root"] = str(spec.root_path)  # absolute: the worker may start anywhere
    elif "path" in data:
        data["path"] = os.path.abspath(os.path.expanduser(data["path"]))
    return data


def _check_imagenet_weights(arch: str) -> None:
    import torch
    import torchvision

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not path.is_file():
        raise DataError(
            f"methods: supervised-imagenet needs the ImageNet weights of {arch} at {path} (byol-runner never downloads "
            f"during a run): fetch {weights.url} there once, or drop the method"
        )


def make_plan(manifest: Manifest, results: Path, progress: Progress = no_progress) -> Plan:
    """The tasks of a manifest. Prepares (decodes, caches, audits, splits) every data set, so bad data
    and too-small label budgets fail here, before anything runs."""
    if "supervised-imagenet" in manifest.methods:
        _check_imagenet_weights(manifest.model.arch)
    settings = {k: getattr(manifest, k).model_dump(mode="json") for k in ("model", "pretrain", "finetune", "probe", "run")}
    budgets = manifest.labels.budgets()
    tasks: list[PlannedTask] = []
    accounts: dict[str, dict] = {}
    for name, spec in manifest.datasets.items():
        ds = prepare(name, spec, results / "cache", progress)
        accounts[name] = accounting(ds)
        fingerprint = ds.fingerprint
        data = data_spec(spec)
        for seed in manifest.seeds:
            for b in budgets:
                ds.labeled(b, seed)  # a budget too small for a class fails now, naming both

            def make(kind: str, method: str, budget=None, deps: tuple[PlannedTask, ...] = ()) -> PlannedTask:
                identity = {
                    "kind": kind, "data": fingerprint, "seed": seed, "engine": ENGINE_VERSION,
                    "budget": None if budget is None else {"fraction": budget.fraction, "per_class": budget.per_class,
                                                           "validation": manifest.labels.validation,
                                                           "min_validation_per_class": manifest.labels.min_validation_per_class},
                    "settings": {k: settings[k] for k in KIND_SETTINGS[kind]}, "deps": [d.id for d in deps],
                }
                tid = task_id(identity)
                spec_json = {
                    "id": tid, "kind": kind, "dataset": name, "data": data, "seed": seed,
                    "budget": identity["budget"], "settings": settings, "cache_dir": "cache",
                    "encoder": f"tasks/{deps[0].id}/encoder.pt" if deps else None,
                }
                return PlannedTask(tid, kind, name, method, seed, budget.name if budget else None, [d.id for d in deps], spec_json)

            pre = None
            if any(m.startswith("byol-") for m in manifest.methods):
                pre = make("pretrain", "byol-pretrain")
                tasks.append(pre)
            for b in budgets:
                for method in manifest.methods:
                    kind = METHOD_KIND[method]
                    tasks.append(make(kind, method, b, (pre,) if kind in ("finetune", "linear") else ()))
    return Plan(manifest.name, tasks, accounts)


def write_task_files(plan: Plan, results: Path) -> None:
    """tasks/<id>/task.json for every task not done yet, written atomically. Rewritten each run: what
    the id leaves out (the data's path, the device) may have changed since."""
    for t in plan.tasks:
        d = results / "tasks" / t.id
        d.mkdir(parents=True, exist_ok=True)
        path = d / "task.json"
        if not is_done(results, t.id):
            atomic_write_text(path, json.dumps(t.spec, indent=1), fsync=False)


def is_done(results: Path, tid: str) -> bool:
    return (results / "tasks" / tid / "metrics.json").is_file()
