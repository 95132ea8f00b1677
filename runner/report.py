"""Results tables from what is on disk: the tasks of a run (runner.db) and their metrics.json.

The README table: one row per dataset and label budget, Model 1 (BYOL + ResNet) and Model 2
(supervised ResNet) test accuracy and loss, mean ± std over seeds. A cell with fewer seeds than
planned says how many it has; one with none is "—". A flagged cell carries its symbol and a grouped
footnote: ‡ untrained (step 0 kept, constant predictions, AUROC not above chance: no verdict on any
metric), † miscalibrated (log-loss no better than the class prior: no verdict on loss-type metrics).
Beside it: every arm with 95% intervals over seeds and test units, and Model 1 − Model 2 with a
verdict on the primary metric (`runner.verdicts`, `runner.stats`). Written as
results/<run>/results.md, .csv and .json; `byol-runner report` rebuilds them at any time, also while
a run is going on.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np

from runner import arms as A
from runner import stats
from runner.store import TaskRow, open_latest_run
from runner.tables import PRIMARY
from runner.verdicts import MISCALIBRATED, SHARED_MARK, SYMBOLS, UNTRAINED, add_uncertainty, budget_order

PRIOR_MARGIN = 0.01  # a test loss within 1% of the class prior's is no better than it
MODEL1 = A.role_candidates("model1")  # the first present is Model 1
MODEL2 = A.role_candidates("model2")


def _load_json(path: Path) -> dict | None:
    """None for a file that is missing, unreadable, not a regular file or not JSON."""
    from runner.atomic import read_json

    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def load_metrics(results: Path, tid: str) -> dict | None:
    """A task's metrics.json, if it is there and is this task's (it names its task: one copied or
    swapped from another folder is never read as this task's result)."""
    m = _load_json(results / "tasks" / tid / "metrics.json")
    return m if isinstance(m, dict) and m.get("task") == tid else None


def foreign_metrics(results: Path, tasks: list[TaskRow]) -> list[str]:
    """The tasks recorded done whose metrics.json is unreadable or names another task: left out of
    every table, and said so."""
    out = []
    for t in tasks:
        if t.status == "done" and t.kind != "noop" and load_metrics(results, t.id) is None:
            out.append(t.id)
    return out


def _stat(values: list[float], planned: int) -> dict:
    values = [v for v in values if v is not None and math.isfinite(v)]
    out = {"n": len(values), "planned": planned, "mean": None, "std": None}
    if values:
        out["mean"] = statistics.fmean(values)
        out["std"] = statistics.stdev(values) if len(values) > 1 else None
    return out


FIXES = {
    "step0": "train longer, lower the learning rate or give more labels",
    "constant": "the model learned nothing it could rank by: check the learning rate and the labels",
    "chance": "train longer or give more labels",
    "prior": "its probabilities are no better than always predicting the class frequencies (a temperature needs enough "
             "validation labels); AUROC measures ranking only and stands",
}


def flag_reasons(m: dict) -> list[tuple[str, str, str]]:
    """Why a finished classifier is no result (untrained: a verdict on any metric is blocked) or its
    probabilities are no better than a constant guess's (miscalibrated: loss-type verdicts blocked):
    (flag, reason key, the reason in words, the same for every seed so that footnotes can group them)."""
    out = []
    test = m.get("test", {})
    if (m.get("selection") or {}).get("selected_step") == 0:
        kind = m.get("classifier_kind", m.get("kind"))  # an evaluate task's: the classifier's it scores
        start = "the pretrained encoder with an untrained head" if kind == "finetune" else "the untrained model"
        out.append((UNTRAINED, "step0", f"selected step 0: validation loss never went below that of {start}, which was kept"))
    probs = (m.get("predictions") or {}).get("test_probs")
    if probs and float(np.ptp(np.asarray(probs, dtype=np.float64), axis=0).max()) < 1e-6:
        out.append((UNTRAINED, "constant", "constant test predictions: every image gets the same probabilities"))
    elif test.get("auroc") is not None and test["auroc"] <= 0.5:
        out.append((UNTRAINED, "chance", "test AUROC at or below 0.5: it ranks no better than chance"))
    loss, prior = test.get("loss"), m.get("prior_loss")
    if loss is not None and prior is not None and loss >= (1 - PRIOR_MARGIN) * prior:
        guess = "its training labels' class frequencies" if m.get("prior") == "training labels" else "the test split's class frequencies"
        out.append((MISCALIBRATED, "prior", f"test log-loss at least {1 - PRIOR_MARGIN:g} × that of always predicting {guess}"))
    return out


def degenerate_reasons(m: dict) -> list[str]:
    """The flags of one classifier in words, each with its symbol (what `status` shows)."""
    return [f"{SYMBOLS[flag]} {flag}: {text}" for flag, _, text in flag_reasons(m)]


def externals(results: Path, tasks: list[TaskRow], data: dict | None = None) -> dict[str, str]:
    """External test set -> the name the tables give it: `melanoma → derm7pt (external)`, so that it
    sorts right after the rows of the data set it tests; marked § when it shares images with that
    one (its `Data:` line says how many). From its evaluate tasks' task.json and the run's data.json."""
    out: dict[str, str] = {}
    for t in tasks:
        if t.kind == A.EVALUATE and t.dataset not in out:
            spec = _load_json(results / "tasks" / t.id / "task.json") or {}
            of = str((spec.get("data") or {}).get("external_test_of") or "?")
            shared = bool(((data or {}).get(t.dataset) or {}).get("shared"))
            out[t.dataset] = f"{of} → {t.dataset} (external)" + (SHARED_MARK if shared else "")
    return out


def shown(name: str, external: dict[str, str]) -> str:
    """A data set as the tables name it (`externals`)."""
    return external.get(name, name)


def _threshold(results: Path, m: dict, target_sensitivity: float | None) -> float | None:
    """The operating threshold of a two-class classifier, chosen on its budget's validation labels (the
    calibrated validation probabilities its metrics.json keeps; an external set's evaluate task takes
    its classifier's); None where there were none to choose on."""
    from runner.scoring import operating_threshold

    if m.get("kind") == A.EVALUATE:
        m = load_metrics(results, str(m.get("classifier"))) or {} if m.get("classifier") else {}
    pred = m.get("predictions") or {}
    if not pred.get("val_probs") or len(m.get("class_names") or []) != 2:
        return None
    positive = 1 if m.get("positive") is None else m["positive"]
    return operating_threshold(np.asarray(pred["val_probs"]), np.asarray(pred["val_labels"]), positive, target_sensitivity)


def collect(results: Path, tasks: list[TaskRow], external: dict[str, str] | None = None,
            target_sensitivity: float | None = None) -> dict:
    """Per (dataset, budget, method): the test metrics of each seed's task, its predictions and operating
    threshold, and the flags of each seed's classifier (`flag_reasons`). An external test set's rows
    are its evaluate tasks', under its `shown` name."""
    external = externals(results, tasks) if external is None else external
    cells: dict = defaultdict(lambda: defaultdict(list))
    planned: dict = defaultdict(int)
    preds: dict = defaultdict(list)
    flags: dict = defaultdict(lambda: defaultdict(list))  # (flag, key, text) -> cell -> seeds
    validation: set[str] = set()
    fixed: dict = defaultdict(list)
    for t in tasks:
        if t.kind in ("pretrain", "noop") or t.budget is None:
            continue
        t = dataclasses.replace(t, dataset=shown(t.dataset, external)) if t.dataset in external else t
        planned[(t.dataset, t.budget, t.method)] += 1
        m = load_metrics(results, t.id)
        if m and "test" in m:
            if "predictions" in m:
                preds[(t.dataset, t.budget, t.method)].append(
                    {"seed": t.seed, "task": t.id, "probs": m["predictions"]["test_probs"], "labels": m["predictions"]["test_labels"],
                     "positive": m.get("positive"), "class_names": m.get("class_names"),
                     "groups": m["predictions"].get("test_groups"), "confusion": m["test"]["confusion_matrix"],
                     "threshold": _threshold(results, m, target_sensitivity)})
            validation.add(m.get("validation", "full"))  # runs before budgeted validation chose on the whole split
            if (m.get("selection") or {}).get("mode") == "fixed schedule":
                fixed[(t.dataset, t.budget, t.method)].append(t.seed)
            for reason in flag_reasons(m):
                flags[reason][(t.dataset, t.budget, t.method)].append(t.seed)
            cells[(t.dataset, t.budget, t.method)]["accuracy"].append(m["test"]["accuracy"])
            cells[(t.dataset, t.budget, t.method)]["loss"].append(m["test"]["loss"])
            cells[(t.dataset, t.budget, t.method)]["auroc"].append(m["test"].get("auroc"))
            cells[(t.dataset, t.budget, t.method)]["balanced_accuracy"].append(m["test"].get("balanced_accuracy"))
    return {"cells": cells, "planned": planned, "preds": preds, "flags": flags, "validation": sorted(validation),
            "fixed": [{"dataset": d, "labels": b, "method": m, "seeds": sorted(seeds)}
                      for (d, b, m), seeds in sorted(fixed.items(), key=lambda kv: (kv[0][0], budget_order(kv[0][1]), kv[0][2]))]}


def build(results: Path, run_name: str, tasks: list[TaskRow], arch: str = "ResNet50", bootstrap: int = 1000,
          primary: str = PRIMARY, compare: tuple[str | None, str | None] = (None, None), margin: float | None = None,
          target_sensitivity: float | None = None) -> dict:
    """The report of a run's tasks: the README table, every arm with 95% intervals, the paired
    Model 1 − Model 2 differences with their verdicts (`margin`: the equivalence margin on the primary
    metric), the flags, and each cell's confusion matrix (all seeds summed). Its figures and pages are
    `runner.pages`'s (`publish`)."""
    accounts = _load_json(results / run_name / "data.json") or {}
    external = externals(results, tasks, accounts)
    data = collect(results, tasks, external, target_sensitivity)
    cells, planned = data["cells"], data["planned"]
    methods = {m for (_, _, m) in planned}
    m1 = compare[0] if compare[0] in methods else next((m for m in MODEL1 if m in methods and m != compare[1]), None)
    m2 = compare[1] if compare[1] in methods else next((m for m in MODEL2 if m in methods and m != m1), None)
    rows, arms = [], []
    for ds, budget in sorted({(d, b) for (d, b, _) in planned}, key=lambda k: (k[0], budget_order(k[1]))):
        row = {"dataset": ds, "labels": budget}
        for tag, method in (("model1", m1), ("model2", m2)):
            for metric in ("accuracy", "loss"):
                row[f"{tag}_{metric}"] = _stat(cells[(ds, budget, method)][metric], planned[(ds, budget, method)]) if method else None
        rows.append(row)
        for method in sorted(m for (d, b, m) in planned if d == ds and b == budget):
            arms.append({"dataset": ds, "labels": budget, "method": method,
                         **{k: _stat(cells[(ds, budget, method)][k], planned[(ds, budget, method)])
                            for k in ("accuracy", "loss", "auroc", "balanced_accuracy")}})
    report = {"run": run_name, "legend": {"model1": A.label(m1, arch) if m1 else None, "model2": A.label(m2, arch) if m2 else None},
              "rows": rows, "arms": arms, "tasks_done": sum(1 for t in tasks if t.status == "done"), "tasks": len(tasks),
              "model1_method": m1, "model2_method": m2, "primary": primary, "margin": margin,
              "target_sensitivity": target_sensitivity, "flags": _grouped_flags(data["flags"]), "data": accounts,
              "pretrain_steps": _pretrain_steps(results, tasks), "monitor": monitor_summary(results, tasks), "loss_not_falling": loss_not_falling(results, tasks), "not_own": foreign_metrics(results, tasks), "validation": data["validation"], "fixed_schedule": data["fixed"],
              "external": external}
    flag_cells: dict = defaultdict(set)
    for (flag, _, _), by_cell in data["flags"].items():
        for cell in by_cell:
            flag_cells[cell].add(flag)
    add_uncertainty(report, data["preds"], m1, m2, bootstrap, margin, flag_cells)
    report["confusion"] = [{"dataset": d, "labels": b_, "method": m, "class_names": entries[0]["class_names"],
                            "matrix": np.sum([np.asarray(e["confusion"]) for e in entries], axis=0).tolist()}
                           for (d, b_, m), entries in sorted(data["preds"].items())]
    report["figures"] = []  # drawn by runner.pages
    return report


def _grouped_flags(flags: dict) -> list[dict]:
    """One entry per flag and reason: the cells it holds for, each with its seeds (the footnotes' lines)."""
    out = []
    for (flag, key, text), by_cell in sorted(flags.items(), key=lambda kv: (kv[0][0] != UNTRAINED, kv[0][1])):
        cells = [{"dataset": d, "labels": b, "method": m, "seeds": sorted(seeds)}
                 for (d, b, m), seeds in sorted(by_cell.items(), key=lambda kv: (kv[0][0], budget_order(kv[0][1]), kv[0][2]))]
        out.append({"flag": flag, "key": key, "reason": text, "fix": FIXES[key], "cells": cells})
    return out


def _pretrain_steps(results: Path, tasks: list[TaskRow]) -> dict[str, int]:
    out = {}
    for t in tasks:
        steps = ((load_metrics(results, t.id) or {}).get("pretrain") or {}).get("steps") if t.kind == "pretrain" else None
        if steps:
            out[f"{t.dataset}/{t.method.removesuffix('-pretrain')}"] = steps
    return out


def monitor_summary(results: Path, tasks: list[TaskRow]) -> list[dict]:
    """Per data set and pretraining: the monitor's last kNN AUROC of each seed beside the untrained
    network's, and how many labelled query images it scored (the monitor is a diagnostic: no test label,
    no choice)."""
    from runner.contracts import read_events

    groups: dict = defaultdict(lambda: {"seeds": [], "queries": None, "query_classes": None})
    for t in tasks:
        if t.kind != "pretrain":
            continue
        mon = ((load_metrics(results, t.id) or {}).get("pretrain") or {}).get("monitor")
        points = [e for e in read_events(results / "tasks" / t.id / "events.jsonl")[0]
                  if e.get("kind") == "metric" and e.get("knn_auroc") is not None]
        if not points:
            continue
        g = groups[(t.dataset, t.method.removesuffix("-pretrain"))]
        last = max(points, key=lambda e: e.get("step") or 0)
        g["seeds"].append({"seed": t.seed, "step": last.get("step"), "auroc": last["knn_auroc"],
                           "untrained": last.get("knn_base_auroc")})
        labels = (mon or {}).get("labels") or {}
        g["queries"] = labels.get("queries", last.get("knn_queries"))
        g["query_classes"] = labels.get("query_classes", g["query_classes"])
    return [{"dataset": d, "method": m, **g, "seeds": sorted(g["seeds"], key=lambda s: s["seed"])}
            for (d, m), g in sorted(groups.items())]


def loss_not_falling(results: Path, tasks: list[TaskRow]) -> list[dict]:
    """Finished pretrainings whose last epoch's mean loss is not below their first's (a learning rate or
    weight decay far too high ends 'done' with its loss rising): their encoder learned nothing usable."""
    from runner.contracts import read_events

    out = []
    for t in tasks:
        if t.kind != "pretrain" or t.status != "done":
            continue
        losses = [e["loss"] for e in read_events(results / "tasks" / t.id / "events.jsonl")[0]
                  if e.get("kind") == "metric" and e.get("loss") is not None and e.get("knn_auroc") is None]
        if len(losses) >= 2 and losses[-1] >= losses[0]:
            out.append({"dataset": t.dataset, "method": t.method.removesuffix("-pretrain"), "seed": t.seed,
                        "first": losses[0], "last": losses[-1]})
    return out


def report_for(results: Path, run_name: str | None = None, bootstrap: int = 1000) -> tuple[dict, list[TaskRow]]:
    """The report of the latest run (of that name), read from runner.db and the task folders, and the
    run's tasks (what its figures are drawn from)."""
    with open_latest_run(results, run_name) as (store, run):
        tasks = store.run_tasks(run["id"])
        span = store.attempt_span([t.id for t in tasks])
    rep = build(results, run["name"], tasks, arch_of(run["manifest"]), bootstrap=bootstrap, **judging_of(run["manifest"]))
    rep["meta"] = provenance(results, run, tasks, bootstrap, span)
    return rep, tasks


def provenance(results: Path, run, tasks: list[TaskRow], bootstrap: int,  # noqa: ANN001 - a runs row
               span: tuple[float | None, float | None] = (None, None)) -> dict:
    """Where the numbers come from, for a methods section: the run, when its tasks trained (`span`,
    Store.attempt_span: a run that found every task done trained nothing itself), its manifest, the
    engine, and the devices and library versions its tasks recorded."""
    from runner.contracts import ENGINE_VERSION

    envs = [((load_metrics(results, t.id) or {}).get("environment") or {}) for t in tasks if t.status == "done"]
    return {"run_started": run["started"], "run_ended": run["ended"], "run_status": run["status"],
            "trained_from": span[0], "trained_to": span[1],
            "manifest_path": run["manifest_path"], "manifest": run["manifest"], "executor": run["executor"],
            "engine_version": ENGINE_VERSION, "bootstrap": bootstrap,
            **{f"{k}s": sorted({e[k] for e in envs if e.get(k)}) for k in ("device", "torch", "python", "host", "precision")},
            "cpu_threads": sorted({int(e["threads"]) for e in envs if e.get("threads") and str(e.get("device", "")).startswith("CPU")})}


def judging_of(manifest_yaml: str) -> dict:
    """How a run's manifest asks its results to be judged: build's primary, compare, margin and
    target_sensitivity (the defaults where it says nothing or cannot be read)."""
    import yaml

    try:
        raw = yaml.safe_load(manifest_yaml) or {}
        compare, report = raw.get("compare") or {}, raw.get("report") or {}
        margin, target = compare.get("margin"), report.get("target_sensitivity")
    except (yaml.YAMLError, AttributeError):
        margin = target = None
    number = lambda v: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else None  # noqa: E731
    return {"primary": primary_of(manifest_yaml), "compare": compare_of(manifest_yaml), "margin": number(margin),
            "target_sensitivity": number(target)}


@functools.lru_cache(maxsize=16)
def compare_of(manifest_yaml: str) -> tuple[str | None, str | None]:
    """The manifest's `compare` arms (None where it names none or cannot be read)."""
    import yaml

    try:
        spec = (yaml.safe_load(manifest_yaml) or {}).get("compare") or {}
        return spec.get("model1"), spec.get("model2")
    except (yaml.YAMLError, AttributeError):
        return None, None


@functools.lru_cache(maxsize=16)
def primary_of(manifest_yaml: str) -> str:
    """The manifest's `report.primary` (AUROC when it names none or cannot be read)."""
    import yaml

    try:
        primary = ((yaml.safe_load(manifest_yaml) or {}).get("report") or {}).get("primary", PRIMARY)
    except (yaml.YAMLError, AttributeError):
        primary = PRIMARY
    return primary if primary in stats.METRICS else PRIMARY


@functools.lru_cache(maxsize=16)  # the TUI asks on every refresh
def _setting(manifest_yaml: str, section: str, key: str, default: str) -> str:
    """One setting of a run's stored manifest (`default` when the text or the section is unreadable)."""
    import yaml

    try:
        value = ((yaml.safe_load(manifest_yaml) or {}).get(section) or {}).get(key, default)
    except (yaml.YAMLError, AttributeError):
        return default
    return value if isinstance(value, str) else default


def weights_of(manifest_yaml: str) -> str:
    """run.weights of a run's manifest: the precision its networks are kept in ("fp32" when unreadable)."""
    keep = _setting(manifest_yaml, "run", "weights", "fp32")
    return keep if keep in ("fp32", "bf16") else "fp32"


def arch_of(manifest_yaml: str) -> str:
    arch = _setting(manifest_yaml, "model", "arch", "resnet50")
    return {"resnet18": "ResNet18", "resnet34": "ResNet34", "resnet50": "ResNet50", "resnet101": "ResNet101"}.get(arch, arch)
