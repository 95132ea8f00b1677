"""The report's figures, drawn with matplotlib's headless backend into results/<run>/figures/.

- confusion_<dataset>_<labels>.png: one panel per method, counts summed over seeds;
- pretrain_loss_<dataset>.png: each pretraining's loss by optimizer step, one panel per pretraining, one line per
  seed, and below it the pretraining monitor's kNN AUROC against the untrained network's level;
- finetune_loss_<dataset>_<labels>.png: train and validation loss of fine-tuning and supervised
  training per step, one line per seed;
- label_efficiency_<dataset>.png: accuracy and AUROC against the label budget, every method, with
  the bootstrap 95% intervals.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
# Figures, not pyplot: pyplot keeps every figure in a global registry until it is closed, so one a stop
# interrupts (Ctrl-C while the report is drawn, in a process that goes on: the TUI) would stay there.
from matplotlib.figure import Figure  # noqa: E402
import numpy as np  # noqa: E402

from runner.arms import ARMS  # noqa: E402

COLOURS = {name: arm.colour for name, arm in ARMS.items()}


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text.replace("%", "pct").replace("/", "per")).strip("-")


def _save(fig, path: Path, rect: tuple = (0, 0, 1, 1)) -> Path:  # noqa: ANN001 - rect: the panels' share of the figure
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=rect)
    from runner.atomic import temp_path

    tmp = temp_path(path)
    try:  # written aside and renamed: a stop mid-write leaves no half figure, and a FIFO there is replaced, not waited on
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def confusion(out: Path, dataset: str, budget: str, mats: dict[str, np.ndarray], class_names: list[str]) -> Path:
    fig = Figure(figsize=(3.2 * len(mats), 3.2))
    axes = fig.subplots(1, len(mats), squeeze=False)
    for ax, (method, m) in zip(axes[0], mats.items()):
        ax.imshow(m, cmap="Blues", vmin=0, vmax=max(m.max(), 1))
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, str(int(v)), ha="center", va="center", color="white" if v > m.max() / 2 else "black")
        ax.set_xticks(range(len(class_names)), class_names, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(class_names)), class_names, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(method, fontsize=9)
    fig.suptitle(f"{dataset}, {budget} labels: test confusion (all seeds)", fontsize=10)
    return _save(fig, out / f"confusion_{slug(dataset)}_{slug(budget)}.png")


def pretrain_loss(out: Path, dataset: str, curves: dict[tuple[str, int], list[tuple[int, float]]],
                  monitor: dict[tuple[str, int], list[tuple[int, float, float | None]]] | None = None) -> Path:
    """curves[(pretraining, seed)]: (step, loss) points. BYOL's loss is 2 − 2 cos summed over both
    directions (0 best), SimSiam's −cos averaged (−1 best): each pretraining its own panel. With the
    pretraining monitor's points, monitor[(pretraining, seed)]: (step, kNN AUROC, the untrained
    network's), a second row: the kNN AUROC by step against the untrained network's level (dashed)."""
    names = sorted({name for name, _ in curves})
    rows = 2 if monitor and any(monitor.values()) else 1
    cols = max(len(names), 1)
    fig = Figure(figsize=(5.5 * cols, 3.5 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, name in zip(axes[0], names):
        for (n, seed), pts in sorted(curves.items()):
            if n == name and pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"seed {seed}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("SimSiam loss (−cos)" if name.startswith("simsiam") else "BYOL loss (2 − 2 cos, both directions)")
        ax.set_title(f"{dataset}: {name} pretraining")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if rows == 2:
        for ax, name in zip(axes[1], names):
            for i, ((n, seed), pts) in enumerate(sorted(monitor.items())):
                if n == name and pts:
                    line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=f"seed {seed}")
                    base = next((p[2] for p in pts if p[2] is not None), None)
                    if base is not None:
                        ax.axhline(base, ls="--", lw=1, color=line.get_color(), alpha=0.7)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("kNN AUROC (run.monitor_labels)")
            ax.set_title(f"{name}: pretraining monitor (dashed: the untrained network)", fontsize=9)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    return _save(fig, out / f"pretrain_loss_{slug(dataset)}.png")


def finetune_loss(out: Path, dataset: str, budget: str, curves: dict[str, dict[int, list[tuple]]]) -> Path:
    fig = Figure(figsize=(10, 3.5))
    axes = fig.subplots(1, 2, sharey=False)
    for method, by_seed in curves.items():
        for seed, pts in sorted(by_seed.items()):
            train = [(s, v) for s, v, _ in pts if v is not None]
            val = [(s, v) for s, _, v in pts if v is not None]
            label = f"{method} (seed {seed})"
            if train:
                axes[0].plot(*zip(*train), color=COLOURS.get(method), alpha=0.8, label=label)
            if val:
                axes[1].plot(*zip(*val), color=COLOURS.get(method), alpha=0.8, label=label)
    for ax, what in zip(axes, ("train loss", "validation loss")):
        ax.set_xlabel("step")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:  # a fixed schedule reads no validation label
            ax.text(0.5, 0.5, "no validation labels under this budget:\nfixed schedule", ha="center", va="center",
                    transform=ax.transAxes, fontsize=9, color="0.4")
    fig.suptitle(f"{dataset}, {budget} labels: fine-tuning (Model 1) and supervised training (Model 2)", fontsize=10)
    return _save(fig, out / f"finetune_loss_{slug(dataset)}_{slug(budget)}.png")


def label_efficiency(out: Path, dataset: str, budgets: list[str], series: dict[str, dict[str, dict]]) -> Path:
    """series[method][budget] = the bootstrap result of that arm (metric -> value, ci)."""
    fig = Figure(figsize=(12, 3.8))
    axes = fig.subplots(1, 2)
    x = np.arange(len(budgets))
    for k, (method, by_budget) in enumerate(series.items()):
        for ax, metric in zip(axes, ("accuracy", "auroc")):
            xs, ys, lo, hi = [], [], [], []
            for i, b in enumerate(budgets):
                r = by_budget.get(b, {}).get(metric)
                if r and r["value"] is not None and np.isfinite(r["value"]):
                    xs.append(x[i] + (k - len(series) / 2) * 0.04)
                    ys.append(r["value"])
                    ci = r["ci"] or (r["value"], r["value"])
                    lo.append(r["value"] - ci[0])
                    hi.append(ci[1] - r["value"])
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, color=COLOURS.get(method), label=method,
                            linestyle="-" if method in ARMS and ARMS[method].solid else "--")
    for ax, metric in zip(axes, ("test accuracy", "test AUROC")):
        ax.set_xticks(x, budgets)
        ax.set_xlabel("labels")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:  # beside the panels, never over a point
        fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(0.82, 0.5), frameon=False)
    fig.suptitle(f"{dataset}: label efficiency (95% bootstrap intervals over seeds and test groups)", fontsize=10)
    return _save(fig, out / f"label_efficiency_{slug(dataset)}.png", rect=(0, 0, 0.82, 1))
