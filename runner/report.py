"""Results tables from what is on disk: the tasks of a run (runner.db) and their metrics.json.

The README table: one row per dataset and label budget, Model 1 (BYOL + ResNet) and Model 2
(supervised ResNet) test accuracy and loss, mean ± std over seeds. A cell with fewer seeds than
planned says how many it has; one with none is "—". Written as results/<run>/results.md, .csv and
.json; `byol-runner report` rebuilds them at any time, also while a run is going on.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from runner.atomic import atomic_write_text
from runner.store import TaskRow, open_latest_run

MODEL1 = ("byol-finetune", "byol-linear")  # the first present is Model 1
MODEL2 = ("supervised", "supervised-imagenet")
ARM_NAMES = {
    "byol-finetune": "BYOL + {arch}, fine-tuned",
    "byol-linear": "BYOL + {arch}, linear probe",
    "supervised": "supervised {arch} from random init",
    "supervised-imagenet": "supervised {arch} from ImageNet weights",
    "random-linear": "linear probe on a random-init {arch} (control)",
}


def _load_metrics(results: Path, tid: str) -> dict | None:
    path = results / "tasks" / tid / "metrics.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _budget_order(name: str) -> tuple:
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


def _fmt(s: dict) -> str:
    if not s["n"]:
        return "—"
    text = f"{s['mean']:.3f}" + (f" ± {s['std']:.3f}" if s["std"] is not None else "")
    return text + (f" ({s['n']}/{s['planned']} seeds)" if s["n"] < s["planned"] else "")


def collect(results: Path, tasks: list[TaskRow]) -> dict:
    """Per (dataset, budget, method): the test metrics of each seed's task."""
    cells: dict = defaultdict(lambda: defaultdict(list))
    planned: dict = defaultdict(int)
    for t in tasks:
        if t.kind in ("pretrain", "noop") or t.budget is None:
            continue
        planned[(t.dataset, t.budget, t.method)] += 1
        m = _load_metrics(results, t.id)
        if m and "test" in m:
            cells[(t.dataset, t.budget, t.method)]["accuracy"].append(m["test"]["accuracy"])
            cells[(t.dataset, t.budget, t.method)]["loss"].append(m["test"]["loss"])
            cells[(t.dataset, t.budget, t.method)]["auroc"].append(m["test"].get("auroc"))
            cells[(t.dataset, t.budget, t.method)]["balanced_accuracy"].append(m["test"].get("balanced_accuracy"))
    return {"cells": cells, "planned": planned}


def build(results: Path, run_name: str, tasks: list[TaskRow], arch: str = "ResNet50") -> dict:
    data = collect(results, tasks)
    cells, planned = data["cells"], data["planned"]
    methods = {m for (_, _, m) in planned}
    m1 = next((m for m in MODEL1 if m in methods), None)
    m2 = next((m for m in MODEL2 if m in methods), None)
    rows, arms = [], []
    for ds, budget in sorted({(d, b) for (d, b, _) in planned}, key=lambda k: (k[0], _budget_order(k[1]))):
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
        "model1": ARM_NAMES[m1].format(arch=arch) if m1 else None,
        "model2": ARM_NAMES[m2].format(arch=arch) if m2 else None,
    }
    done = sum(1 for t in tasks if t.status == "done")
    return {"run": run_name, "legend": legend, "rows": rows, "arms": arms, "tasks_done": done, "tasks": len(tasks)}


def to_markdown(report: dict) -> str:
    lines = [
        "| Dataset | Model 1 accuracy | Model 1 loss | Model 2 accuracy | Model 2 loss |",
        "|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        cells = [_fmt(r[k]) if r[k] else "—" for k in ("model1_accuracy", "model1_loss", "model2_accuracy", "model2_loss")]
        lines.append(f"| {r['dataset']} ({r['labels']} labels) | " + " | ".join(cells) + " |")
    lg = report["legend"]
    lines += [
        "",
        f"Model 1 = {lg['model1'] or 'not in this run'}; Model 2 = {lg['model2'] or 'not in this run'}. "
        "Test split; mean ± std over seeds; loss = cross-entropy after a temperature fitted on validation.",
    ]
    if report["tasks_done"] < report["tasks"]:
        lines.append(f"Partial: {report['tasks_done']} of {report['tasks']} tasks done; '—' marks what is missing.")
    return "\n".join(lines) + "\n"


def to_csv(report: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["dataset", "labels", "method", "n_seeds", "accuracy_mean", "accuracy_std", "loss_mean", "loss_std",
                "auroc_mean", "balanced_accuracy_mean"])
    for a in report["arms"]:
        w.writerow([a["dataset"], a["labels"], a["method"], a["accuracy"]["n"], a["accuracy"]["mean"], a["accuracy"]["std"],
                    a["loss"]["mean"], a["loss"]["std"], a["auroc"]["mean"], a["balanced_accuracy"]["mean"]])
    return buf.getvalue()


def write(results: Path, report: dict) -> Path:
    out = results / report["run"]
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("results.md", to_markdown(report)), ("results.csv", to_csv(report)),
                       ("results.json", json.dumps(report, indent=1))):
        atomic_write_text(out / name, text)
    return out


def report_for(results: Path, run_name: str | None = None) -> dict:
    """The report of the latest run (of that name), read from runner.db and the task folders."""
    with open_latest_run(results, run_name) as (store, run):
        tasks = store.run_tasks(run["id"])
    return build(results, run["name"], tasks, _arch_of(run["manifest"]))


def _arch_of(manifest_yaml: str) -> str:
    import yaml

    try:
        arch = (yaml.safe_load(manifest_yaml) or {}).get("model", {}).get("arch", "resnet50")
    except (yaml.YAMLError, AttributeError):
        arch = "resnet50"
    return {"resnet18": "ResNet18", "resnet34": "ResNet34", "resnet50": "ResNet50", "resnet101": "ResNet101"}.get(arch, arch)
