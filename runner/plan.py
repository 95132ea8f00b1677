"""Manifest -> tasks: a small DAG with content-hash ids.

One `pretrain` per (dataset, seed, pretraining, its settings) serves every label budget and both
evaluations of it (`finetune`, `linear`), which depend on it; `supervised`, `supervised-imagenet`
and `random-linear` stand alone. The arms and pretrainings are `runner.arms`'s. A task id hashes everything that changes the task's result: the data
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

from runner.atomic import atomic_write_text, read_json
from runner.data.cache import Progress, file_sha256, no_progress
from runner.data.dataset import accounting, external_spec, prepare
from runner.data.sources import RootedSource
from runner.errors import DataError
from runner.manifest import Manifest
from runner.ml.config import TrainSettings
from runner.arms import ARMS, CLASSIFIER_KINDS, EVALUATE, KIND_SETTINGS, PRETRAININGS, needs_imagenet, pretraining_of
from runner.contracts import ENGINE_VERSION

@dataclass
class PlannedTask:
    id: str
    kind: str
    dataset: str
    method: str  # the arm (runner.arms.ARMS), or "<pretraining>-pretrain" (e.g. byol-pretrain)
    seed: int
    budget: str | None  # e.g. "10%" or "2/class"
    deps: list[str]
    spec: dict  # the task.json

    @property
    def label(self) -> str:
        parts = [self.dataset + (" (external)" if self.kind == EVALUATE else ""), self.method, self.budget or "", f"seed {self.seed}"]
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
    # settings added later, left out at their defaults so that adding them changed no task's id
    for key, default in (("encoding", None), ("delimiter", None), ("window", None), ("slice_axis", "axial")):
        if key in data and data[key] == default:
            data.pop(key)
    for key in ("group_tag", "near_duplicates"):
        if data.get("split", {}).get(key, 0) is None:
            data["split"].pop(key)
    if isinstance(spec, RootedSource):
        data["root"] = str(spec.root_path)  # absolute: the worker may start anywhere
    elif "path" in data:
        data["path"] = os.path.abspath(os.path.expanduser(data["path"]))
    return data


def _check_imagenet_weights(arch: str, arms: list[str], file: str | None = None) -> str:
    """The sha256 of the ImageNet weights these arms start from, verified (`verify_imagenet_weights`)."""
    from runner.ml.models import IMAGENET_URLS, WeightsError, imagenet_weights_path, verify_imagenet_weights

    path = imagenet_weights_path(arch)
    if file is None and not path.is_file():
        raise DataError(
            f"methods: {', '.join(arms)} start from the ImageNet weights of {arch}, expected at {path} (byol-runner never "
            f"downloads during a run): fetch {IMAGENET_URLS[arch]} there once (or set TORCH_HOME to where it is), or drop "
            f"{'the method' if len(arms) == 1 else 'those methods'}"
        )
    try:
        return verify_imagenet_weights(arch, file)
    except WeightsError as e:
        raise DataError(f"methods: {', '.join(arms)}: {e}") from None


@dataclass
class _TaskMaker:
    """What every task of one data set shares, and how one task of it is made (its identity and spec)."""

    manifest: Manifest
    name: str
    fingerprint: str
    data: dict
    settings: dict  # the manifest's training settings, as the worker gets them
    hashed: dict  # the same as the ids hash them: not the ImageNet weights file's path (its sha256 is)
    imagenet: str | None  # that sha256, where some arm starts from ImageNet weights
    monitor: dict | None = None  # the smallest budget, the pretraining monitor's labels (not hashed)

    def __call__(self, seed: int, kind: str, method: str, budget=None, deps: tuple[PlannedTask, ...] = (),  # noqa: ANN001
                 pretraining: str | None = None) -> PlannedTask:
        labels = self.manifest.labels
        sections = PRETRAININGS[pretraining].settings if pretraining else KIND_SETTINGS[kind]
        identity = {
            "kind": kind, "data": self.fingerprint, "seed": seed, "engine": ENGINE_VERSION,
            "budget": None if budget is None else {"fraction": budget.fraction, "per_class": budget.per_class,
                                                   "validation": labels.validation,
                                                   "min_validation_per_class": labels.min_validation_per_class},
            "settings": {k: self.hashed[k] for k in sections}, "deps": [d.id for d in deps],
            "precision": self.settings["run"]["precision"],  # as asked: auto resolves where the worker runs
        }
        if self.settings["run"].get("weights", "fp32") != "fp32" and kind in ("pretrain", *CLASSIFIER_KINDS):
            identity["weights"] = self.settings["run"]["weights"]  # the network kept is the one scored (fp32 hashes as before)
        if pretraining and pretraining != "byol":  # BYOL from random init hashes as it always has
            identity["pretraining"] = pretraining
        starts_imagenet = kind in ("supervised-imagenet", "imagenet-linear") or bool(pretraining and PRETRAININGS[pretraining].init == "imagenet")
        if starts_imagenet:  # another weights file is another result
            identity["imagenet_sha256"] = self.imagenet
        tid = task_id(identity)
        spec_json = {
            "id": tid, "kind": kind, "dataset": self.name, "data": self.data, "seed": seed,
            "budget": identity["budget"], "settings": self.settings, "cache_dir": "cache",
            "encoder": f"tasks/{deps[0].id}/encoder.pt" if deps else None,
            **({"pretraining": pretraining} if pretraining else {}),
            **({"imagenet_sha256": self.imagenet} if starts_imagenet else {}),
            **({"monitor_labels": self.monitor} if kind == "pretrain" and self.monitor else {}),
        }
        return PlannedTask(tid, kind, self.name, method, seed, budget.name if budget else None, [d.id for d in deps], spec_json)


def _monitor_budget(manifest: Manifest, budgets: list):  # noqa: ANN202 - a LabelBudget
    """The budget whose labels the pretraining monitor scores with (run.monitor_labels)."""
    want = manifest.run.monitor_labels
    if want == "smallest":
        return budgets[0]
    if want == "largest":
        return budgets[-1]
    for b in budgets:
        if b.name == want:
            return b
    raise DataError(f"run.monitor_labels: {want!r} is not one of the label budgets ({', '.join(b.name for b in budgets)}), "
                    "'smallest' or 'largest'")


def make_plan(manifest: Manifest, results: Path, progress: Progress = no_progress) -> Plan:
    """The tasks of a manifest. Prepares (decodes, caches, audits, splits) every data set, so bad data
    and too-small label budgets fail here, before anything runs."""
    arms = needs_imagenet(manifest.methods)
    imagenet = _check_imagenet_weights(manifest.model.arch, arms, manifest.model.imagenet_weights) if arms else None
    settings = {k: getattr(manifest, k).model_dump(mode="json") for k in TrainSettings.model_fields}
    hashed = {**settings, "model": {k: v for k, v in settings["model"].items() if k != "imagenet_weights"}}
    budgets = manifest.labels.budgets()
    tasks: list[PlannedTask] = []
    accounts: dict[str, dict] = {}
    trained: dict[str, tuple] = {}  # name -> (its PreparedDataset, its classifier tasks)
    for name, spec in manifest.datasets.items():
        if spec.external_test_of is not None:
            continue
        ds = prepare(name, spec, results / "cache", progress)
        trained[name] = (ds, [])
        accounts[name] = accounting(ds)
        chosen = _monitor_budget(manifest, budgets)
        monitor = {"fraction": chosen.fraction, "per_class": chosen.per_class, "validation": manifest.labels.validation,
                   "min_validation_per_class": manifest.labels.min_validation_per_class}
        make = _TaskMaker(manifest, name, ds.fingerprint, data_spec(spec), settings, hashed, imagenet, monitor)
        for seed in manifest.seeds:
            for b in budgets:
                ds.labeled(b, seed)  # a budget too small for a class fails now, naming both
            pre: dict[str, PlannedTask] = {}  # one pretraining per entry the arms evaluate, shared by them
            for method in manifest.methods:
                p = pretraining_of(method)
                if p and p.name not in pre:
                    pre[p.name] = make(seed, "pretrain", f"{p.name}-pretrain", pretraining=p.name)
                    tasks.append(pre[p.name])
            for b in budgets:
                for method in manifest.methods:
                    p = pretraining_of(method)
                    tasks.append(make(seed, ARMS[method].kind, method, b, (pre[p.name],) if p else ()))
                    trained[name][1].append(tasks[-1])
    for name, spec in manifest.datasets.items():
        if spec.external_test_of is not None:
            ds_of, classifiers = trained[spec.external_test_of]
            tasks += _evaluations(name, external_spec(spec, ds_of), ds_of, classifiers, results, progress, accounts)
    return Plan(manifest.name, tasks, accounts)


def _evaluations(name: str, spec, trained, classifiers: list[PlannedTask], results: Path, progress: Progress,
                 accounts: dict) -> list[PlannedTask]:
    """One `evaluate` task per classifier of the trained data set: it scores the external test set
    with that classifier's saved model.pt. Its id hashes the external images and the classifier's id,
    so adding an external test set to a finished study trains nothing."""
    ds = prepare(name, spec, results / "cache", progress, classes_of=trained.class_names, trained=trained)
    accounts[name] = accounting(ds)
    data = data_spec(spec)
    grouped = any(g != k for g, k in zip(ds.groups, ds.keys))
    groups = hashlib.sha256("\n".join(ds.groups).encode()).hexdigest()[:16] if grouped else None
    out = []
    for c in classifiers:
        identity = {"kind": EVALUATE, "data": ds.fingerprint, "classifier": c.id, "engine": ENGINE_VERSION}
        if groups:  # its patients: the units its intervals resample (not in the fingerprint: nothing is split by them)
            identity["groups"] = groups
        tid = task_id(identity)
        # its encoder: a linear probe's model.pt names its pretraining's encoder (an executor without the
        # results dir, Ray's, ships both)
        spec_json = {**c.spec, "id": tid, "kind": EVALUATE, "dataset": name, "data": data, "model": f"tasks/{c.id}/model.pt"}
        spec_json.pop("pretraining", None)
        out.append(PlannedTask(tid, EVALUATE, name, c.method, c.seed, c.budget, [c.id], spec_json))
    return out


def required_artifacts(plan: Plan) -> dict[str, tuple[str, ...]]:
    """What a finished task must also have for this plan: a classifier an external test set scores
    needs its model.pt (one finished before classifiers were kept is trained again)."""
    return {d: ("model.pt",) for t in plan.tasks if t.kind == EVALUATE for d in t.deps}


def plan_state(plan: Plan, results: Path) -> dict[str, tuple[str, str | None]]:
    """Each task's `inspect_result` under this plan's requirements."""
    need = required_artifacts(plan)
    return {t.id: inspect_result(results, t.id, need.get(t.id, ())) for t in plan.tasks}


def write_task_files(plan: Plan, results: Path) -> None:
    """tasks/<id>/task.json for every task not done yet, written atomically. Rewritten each run: what
    the id leaves out (the data's path, the device) may have changed since."""
    state = plan_state(plan, results)
    for t in plan.tasks:
        d = results / "tasks" / t.id
        d.mkdir(parents=True, exist_ok=True)
        path = d / "task.json"
        if state[t.id][0] != "done":
            atomic_write_text(path, json.dumps(t.spec, indent=1), fsync=False)


def is_done(results: Path, tid: str) -> bool:
    """metrics.json is there and is this task's (JSON naming it): a damaged one (truncated, overwritten,
    empty) is not a result, and the task runs again."""
    return metrics_state(results, tid) == "done"


def metrics_state(results: Path, tid: str) -> str:
    """"done", "missing" or "damaged" (there, but not this task's readable metrics, or an artifact it
    recorded no longer matches its checksum)."""
    return inspect_result(results, tid)[0]


def inspect_result(results: Path, tid: str, require: tuple[str, ...] = ()) -> tuple[str, str | None]:
    """metrics_state and, for "damaged", what is wrong. `require`: artifacts the result must have
    recorded (a classifier an external test set scores needs its model.pt)."""
    folder = results / "tasks" / tid
    try:
        data = read_json(folder / "metrics.json")
    except FileNotFoundError:
        return "missing", None
    except (OSError, ValueError):
        return "damaged", "its metrics.json is unreadable"
    if not isinstance(data, dict) or data.get("task") != tid:
        return "damaged", "its metrics.json is not this task's"
    artifacts = data.get("artifacts") or {}
    for name in require:
        if not isinstance(artifacts, dict) or name not in artifacts:
            return "damaged", f"it has no {name} (it finished before byol-runner kept its classifiers), which an external test set needs"
    for name, digest in artifacts.items() if isinstance(artifacts, dict) else ():
        if file_sha256(folder / str(name)) != digest:
            return "damaged", f"its {name} is missing or does not match the checksum its metrics.json recorded"
    scored = data.get("scored") or {}  # an evaluate task: the model.pt it scored must still be the classifier's
    for rel, digest in scored.items() if isinstance(scored, dict) else ():
        if file_sha256(results / str(rel)) != digest:
            return "damaged", f"the classifier it scored ({rel}) has changed since (trained again, or damaged)"
    return "done", None
