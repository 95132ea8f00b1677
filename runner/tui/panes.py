"""What the Curves and Results tabs draw, from a snapshot: plotext calls and the report's markdown."""

from __future__ import annotations

from pathlib import Path

from runner.tui.state import Snapshot


def draw_curves(plt, series: dict, overlay: dict, names: dict[str, str], selected: str | None,  # noqa: ANN001 - plotext
                overlay_on: bool) -> None:
    """The selected task's loss (and validation loss), the overlaid tasks' losses, and BYOL's collapse
    monitor alone on the right axis; the x axis is the optimizer step."""
    plt.clear_data()
    plt.clear_figure()
    if not series:
        plt.title("select a task in the queue (enter) to see its curves" if selected is None else
                  f"no curve for {names.get(selected, selected)}: not started yet, or a linear probe (one logistic regression, "
                  "no steps); its numbers are in Results (3) and Detail (4)")
        return
    for name in ("loss", "val_loss"):
        if name in series:
            xs, ys = zip(*series[name])
            plt.plot(list(xs), list(ys), label=f"{name} ({names.get(selected, selected)})")
    for tid, other in overlay.items():
        if "loss" in other:
            xs, ys = zip(*other["loss"])
            plt.plot(list(xs), list(ys), label=f"loss ({names.get(tid, tid)})")
    extra = ""
    if "knn_auroc" in series:  # the pretraining monitor on the right axis, against the untrained network's level
        xs, ys = zip(*series["knn_auroc"])
        plt.plot(list(xs), list(ys), label="kNN AUROC, right axis (pretraining monitor)", yside="right")
        if "knn_base_auroc" in series:
            plt.plot(list(xs), [series["knn_base_auroc"][-1][1]] * len(xs), label="kNN AUROC of the untrained network",
                     yside="right")
        extra = f" · proj std {series['proj_std'][-1][1]:.3f}" if "proj_std" in series else ""
    elif "proj_std" in series:  # alone on the right axis: its own scale, so a fall towards 0 (collapse) shows
        xs, ys = zip(*series["proj_std"])
        plt.plot(list(xs), list(ys), label="proj std, right axis (collapse monitor: near 0 = collapsed)", yside="right")
    # τ follows a fixed schedule from tau_base to 1: its current value, not a flat line on a shared axis
    tau = f" · τ {series['tau'][-1][1]:.4f}" if "tau" in series else ""
    tau += extra
    plt.xlabel("step")
    plt.title("loss by optimizer step (x axis)" + tau + (" · overlay: same kind and dataset" if overlay_on else ""))


def results_markdown(results: Path, snap: Snapshot, extended: bool) -> str:
    """The README table of what has finished (no bootstrap: it is redrawn as tasks end); with
    `extended`, every arm's accuracy, AUROC and balanced accuracy."""
    from runner import report as R
    from runner.tables import to_markdown

    rep = R.build(results, snap.run["name"], snap.tasks, snap.run.get("arch", "ResNet50"), bootstrap=0,
                  compare=snap.run.get("compare", (None, None)))
    text = to_markdown(rep)
    if extended:
        lines = ["| Dataset | Labels | Method | Seeds | Accuracy | AUROC | Balanced accuracy |", "|---|---|---|---|---|---|---|"]
        for a in rep["arms"]:
            f = lambda s: "—" if s["mean"] is None else f"{s['mean']:.3f}"  # noqa: E731
            lines.append(f"| {a['dataset']} | {a['labels']} | {a['method']} | {a['accuracy']['n']} | {f(a['accuracy'])} | "
                         f"{f(a['auroc'])} | {f(a['balanced_accuracy'])} |")
        text += "\n" + "\n".join(lines) + "\n"
    return text
