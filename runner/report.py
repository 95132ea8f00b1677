"""Results tables from what is on disk: the tasks of a run (runner.db) and their metrics.json.

The README table: one row per dataset and label budget, Model 1 (BYOL + ResNet) and Model 2
(supervised ResNet) test accuracy and loss, mean ± std over seeds. A cell with fewer seeds than
planned says how many it has; one with none is "—"; a degenerate one (an untrained model kept,
constant predictions, a loss no better than the class prior) carries † and a footnote. Beside it:
every arm with intervals over seeds and test groups, and Model 1 − Model 2 with a verdict on the
primary metric, Holm-adjusted over the run's comparisons (`runner.stats`). Written as
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
from runner.tables import MARK, PRIMARY, _flagged

PRIOR_MARGIN = 0.01  # a test loss within 1% of the class prior's is no better than it
MODEL1 = A.role_candidates("model1")  # the first present is Model 1
MODEL2 = A.role_candidates("model2")


def _load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _load_metrics(results: Path, tid: str) -> dict | None:
    return _load_json(results / "tasks" / tid / "metrics.json")


def budget_order(name: str) -> tuple:
    if name.endswith("/class"):
        return (0, int(name.split("/")[0]))
    return (1, float(name.rstrip("%")))


def _stat(values: list[float], planned: int) -> dict:
    values = [v for v in values if v is not None and math.isfinite(v)]
    out = {"n": len(values), "planned": planned, "mean": None, "std": None}
    if values:
        out["mean"] = statistics.fmean(values)
        out["std"] = statistics.stdev(values) if len(values) > 1 else None
    return out


def degenerate_reasons(m: dict) -> list[str]:
    """What makes a finished classifier no result at all, each with what to change."""
    reasons = []
    if (m.get("selection") or {}).get("selected_step") == 0:
        kind = m.get("classifier_kind", m.get("kind"))  # an evaluate task's: the classifier's it scores
        start = "the pretrained encoder with an untrained head" if kind == "finetune" else "the untrained model"
        reasons.append(f"selected step 0: validation loss never went below that of step 0 ({start}), which was kept; "
                       "train longer, lower the learning rate or give more labels")
    probs = (m.get("predictions") or {}).get("test_probs")
    if probs and float(np.ptp(np.asarray(probs, dtype=np.float64), axis=0).max()) < 1e-6:
        reasons.append("constant test predictions: every image gets the same probabilities, so AUROC is 0.5 by construction")
    loss, prior = m.get("test", {}).get("loss"), m.get("prior_loss")
    if loss is not None and prior is not None and loss >= (1 - PRIOR_MARGIN) * prior:
        auroc = m.get("test", {}).get("auroc")
        guess = "its training labels' class frequencies" if m.get("prior") == "training labels" else "the test split's class frequencies"
        reasons.append(f"test loss {loss:.3f} ≥ {1 - PRIOR_MARGIN:g} × {prior:.3f}, the loss of always predicting {guess}: "
                       "its log-loss is no better than a constant guess's"
                       + (f" (AUROC, which measures ranking only, is {auroc:.3f})" if auroc is not None else ""))
    return reasons


def externals(results: Path, tasks: list[TaskRow], data: dict | None = None) -> dict[str, str]:
    """External test set -> the name the tables give it: `melanoma → derm7pt (external)`, so that it
    sorts right after the rows of the data set it tests; marked † when it shares images with that
    one (its `Data:` line says how many). From its evaluate tasks' task.json and the run's data.json."""
    out: dict[str, str] = {}
    for t in tasks:
        if t.kind == A.EVALUATE and t.dataset not in out:
            spec = _load_json(results / "tasks" / t.id / "task.json") or {}
            of = str((spec.get("data") or {}).get("external_test_of") or "?")
            shared = bool(((data or {}).get(t.dataset) or {}).get("shared"))
            out[t.dataset] = f"{of} → {t.dataset} (external)" + (MARK if shared else "")
    return out


def shown(name: str, external: dict[str, str]) -> str:
    """A data set as the tables name it (`externals`)."""
    return external.get(name, name)


def collect(results: Path, tasks: list[TaskRow], external: dict[str, str] | None = None) -> dict:
    """Per (dataset, budget, method): the test metrics of each seed's task, its predictions, and the
    reasons a seed's classifier is degenerate. An external test set's rows are its evaluate tasks',
    under its `shown` name."""
    external = externals(results, tasks) if external is None else external
    cells: dict = defaultdict(lambda: defaultdict(list))
    planned: dict = defaultdict(int)
    preds: dict = defaultdict(list)
    flags: dict = defaultdict(dict)
    validation: set[str] = set()
    fixed: dict = defaultdict(list)
    for t in tasks:
        if t.kind in ("pretrain", "noop") or t.budget is None:
            continue
        t = dataclasses.replace(t, dataset=shown(t.dataset, external)) if t.dataset in external else t
        planned[(t.dataset, t.budget, t.method)] += 1
        m = _load_metrics(results, t.id)
        if m and "test" in m:
            if "predictions" in m:
                preds[(t.dataset, t.budget, t.method)].append(
                    {"seed": t.seed, "task": t.id, "probs": m["predictions"]["test_probs"], "labels": m["predictions"]["test_labels"],
                     "positive": m.get("positive"), "class_names": m.get("class_names"),
                     "groups": m["predictions"].get("test_groups"), "confusion": m["test"]["confusion_matrix"]})
            validation.add(m.get("validation", "full"))  # runs before budgeted validation chose on the whole split
            if (m.get("selection") or {}).get("mode") == "fixed schedule":
                fixed[(t.dataset, t.budget, t.method)].append(t.seed)
            reasons = degenerate_reasons(m)
            if reasons:
                flags[(t.dataset, t.budget, t.method)][t.seed] = reasons
            cells[(t.dataset, t.budget, t.method)]["accuracy"].append(m["test"]["accuracy"])
            cells[(t.dataset, t.budget, t.method)]["loss"].append(m["test"]["loss"])
            cells[(t.dataset, t.budget, t.method)]["auroc"].append(m["test"].get("auroc"))
            cells[(t.dataset, t.budget, t.method)]["balanced_accuracy"].append(m["test"].get("balanced_accuracy"))
    return {"cells": cells, "planned": planned, "preds": preds, "flags": flags, "validation": sorted(validation),
            "fixed": [{"dataset": d, "labels": b, "method": m, "seeds": sorted(seeds)}
                      for (d, b, m), seeds in sorted(fixed.items(), key=lambda kv: (kv[0][0], budget_order(kv[0][1]), kv[0][2]))]}


def build(results: Path, run_name: str, tasks: list[TaskRow], arch: str = "ResNet50", bootstrap: int = 1000,
          primary: str = PRIMARY, compare: tuple[str | None, str | None] = (None, None)) -> dict:
    """The report of a run's tasks: the README table, every arm with bootstrap intervals, the paired
    Model 1 − Model 2 differences, and each cell's confusion matrix (all seeds summed). Its figures and
    pages are `runner.pages`'s (`publish`)."""
    accounts = _load_json(results / run_name / "data.json") or {}
    external = externals(results, tasks, accounts)
    data = collect(results, tasks, external)
    cells, planned = data["cells"], data["planned"]
    pretrain_steps = {}
    for t in tasks:
        steps = ((_load_metrics(results, t.id) or {}).get("pretrain") or {}).get("steps") if t.kind == "pretrain" else None
        if steps:
            pretrain_steps[f"{t.dataset}/{t.method.removesuffix('-pretrain')}"] = steps
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
    legend = {
        "model1": A.label(m1, arch) if m1 else None,
        "model2": A.label(m2, arch) if m2 else None,
    }
    done = sum(1 for t in tasks if t.status == "done")
    degenerate = [{"dataset": d, "labels": b_, "method": m, "seeds": sorted(by_seed),
                   "reasons": list(dict.fromkeys(r for rs in by_seed.values() for r in rs))}
                  for (d, b_, m), by_seed in sorted(data["flags"].items(), key=lambda kv: (kv[0][0], budget_order(kv[0][1]), kv[0][2]))]
    report = {"run": run_name, "legend": legend, "rows": rows, "arms": arms, "tasks_done": done, "tasks": len(tasks),
              "model1_method": m1, "model2_method": m2, "primary": primary, "degenerate": degenerate,
              "data": accounts, "pretrain_steps": pretrain_steps,
              "validation": data["validation"], "fixed_schedule": data["fixed"], "external": external}
    add_uncertainty(report, data["preds"], m1, m2, bootstrap)
    report["confusion"] = [{"dataset": d, "labels": b_, "method": m, "class_names": entries[0]["class_names"],
                            "matrix": np.sum([np.asarray(e["confusion"]) for e in entries], axis=0).tolist()}
                           for (d, b_, m), entries in sorted(data["preds"].items())]
    report["figures"] = []  # drawn by runner.pages
    return report


def report_for(results: Path, run_name: str | None = None, bootstrap: int = 1000) -> tuple[dict, list[TaskRow]]:
    """The report of the latest run (of that name), read from runner.db and the task folders, and the
    run's tasks (what its figures are drawn from)."""
    with open_latest_run(results, run_name) as (store, run):
        tasks = store.run_tasks(run["id"])
        span = store.attempt_span([t.id for t in tasks])
    rep = build(results, run["name"], tasks, arch_of(run["manifest"]), bootstrap=bootstrap, primary=primary_of(run["manifest"]),
                compare=compare_of(run["manifest"]))
    rep["meta"] = provenance(results, run, tasks, bootstrap, span)
    return rep, tasks


def provenance(results: Path, run, tasks: list[TaskRow], bootstrap: int,  # noqa: ANN001 - a runs row
               span: tuple[float | None, float | None] = (None, None)) -> dict:
    """Where the numbers come from, for a methods section: the run, when its tasks trained (`span`,
    Store.attempt_span: a run that found every task done trained nothing itself), its manifest, the
    engine, and the devices and library versions its tasks recorded."""
    from runner.contracts import ENGINE_VERSION

    envs = [((_load_metrics(results, t.id) or {}).get("environment") or {}) for t in tasks if t.status == "done"]
    return {"run_started": run["started"], "run_ended": run["ended"], "run_status": run["status"],
            "trained_from": span[0], "trained_to": span[1],
            "manifest_path": run["manifest_path"], "manifest": run["manifest"], "executor": run["executor"],
            "engine_version": ENGINE_VERSION, "bootstrap": bootstrap,
            **{f"{k}s": sorted({e[k] for e in envs if e.get(k)}) for k in ("device", "torch", "python", "host")}}


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
def arch_of(manifest_yaml: str) -> str:
    import yaml

    try:
        arch = (yaml.safe_load(manifest_yaml) or {}).get("model", {}).get("arch", "resnet50")
    except (yaml.YAMLError, AttributeError):
        arch = "resnet50"
    return {"resnet18": "ResNet18", "resnet34": "ResNet34", "resnet50": "ResNet50", "resnet101": "ResNet101"}.get(arch, arch)


# ---- uncertainty ------------------------------------------------------------------------------


def _pairs(entries: list[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np.asarray(e["probs"]), np.asarray(e["labels"])) for e in sorted(entries, key=lambda e: e["seed"])]


def _units(entries: list[dict]) -> tuple[list | None, str]:
    """The test split's resampling units: its groups (patients) when the worker recorded them, else images."""
    groups = entries[0].get("groups")
    if groups is not None and len(set(groups)) < len(groups):
        return groups, f"{len(set(groups))} groups"
    return None, f"{len(entries[0]['labels'])} images"


def add_uncertainty(report: dict, preds: dict, m1: str | None, m2: str | None, b: int) -> None:
    """Every arm's metrics (mean over seeds of each seed's) with bootstrap 95% intervals over seeds and
    test groups; Model 1 − Model 2 on the same draws (seeds paired), with a verdict on the primary
    metric, Holm-adjusted over the run's comparisons; and, as a family of its own, whether each
    pretraining's linear probe (from random init) beats the random-init control ("did pretraining learn?")."""
    report["extended"] = []
    for (ds, budget, method), entries in sorted(preds.items(), key=lambda kv: (kv[0][0], budget_order(kv[0][1]), kv[0][2])):
        groups, units = _units(entries)
        res = stats.bootstrap_metrics(_pairs(entries), entries[0]["positive"], b=b, groups=groups)
        report["extended"].append({"dataset": ds, "labels": budget, "method": method, "seeds": len(entries), "units": units, **res})
    # two families of Model 1 − Model 2 comparisons, each Holm-adjusted on its own: the internal test
    # splits, and the external test sets (declaring one later leaves the internal verdicts as they were)
    outside = set(report.get("external", {}).values())
    internal = {k: v for k, v in preds.items() if k[0] not in outside}
    external = {k: v for k, v in preds.items() if k[0] in outside}
    report["differences"] = (compare(report, internal, [(m1, m2)], b)
                             + compare(report, external, [(m1, m2)], b, family="external")) if m1 and m2 else []
    # every pretraining's linear probe against its control, as one family: an untrained network for a
    # pretraining from random init, the ImageNet features for one that starts from them (beating an
    # untrained network would say nothing about what the in-domain pretraining added). On the internal
    # test splits only: on an external set the question would be transfer, not whether pretraining learned.
    pairs = [(m, A.CONTROLS[p.init]) for m, p in A.linear_arms([m for m in A.ARMS if any(k[2] == m for k in preds)])]
    report["pretraining_learned"] = compare(report, internal, pairs, b)


def compare(report: dict, preds: dict, pairs: list[tuple[str, str]], b: int, family: str = "internal") -> list[dict]:
    """`a` − `b` for each pair of arms, per dataset and budget, on the seeds both have, paired, with
    verdicts on the primary metric Holm-adjusted over this family of comparisons."""
    out = []
    for a_method, b_method in pairs:
        for ds, budget in sorted({(d, b_) for (d, b_, _) in preds}, key=lambda k: (k[0], budget_order(k[1]))):
            a, c = preds.get((ds, budget, a_method), []), preds.get((ds, budget, b_method), [])
            seeds = sorted({e["seed"] for e in a} & {e["seed"] for e in c})
            if not seeds:
                continue
            pick = lambda es: [e for e in es if e["seed"] in seeds]  # noqa: E731
            groups, units = _units(a)
            diff = stats.paired_difference(_pairs(pick(a)), _pairs(pick(c)), a[0]["positive"], b=b, groups=groups,
                                           groups2=_units(c)[0])
            out.append({"dataset": ds, "labels": budget, "method": a_method, "against": b_method, "seeds": len(seeds),
                        "units": units, "family": family, **diff})
    flagged = _flagged(report)
    primary = report["primary"]
    adjusted = stats.holm([d[primary]["p"] for d in out])
    comparisons = sum(p is not None for p in adjusted)
    for d, p in zip(out, adjusted):
        # a control no better than the prior is what a control should look like: only the arm's own flag counts
        bad = ((d["dataset"], d["labels"], d["method"]) in flagged,
               (d["dataset"], d["labels"], d["against"]) in flagged and d["against"] not in A.CONTROLS.values())
        d.update(primary=primary, p_adjusted=p, comparisons=comparisons,
                 verdict=stats.verdict(d[primary], p, d["seeds"], primary, bad))
    return out
