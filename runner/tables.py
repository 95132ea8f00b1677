"""The report's words: the README table, the extended table with intervals, the Δ table, their
footnotes, and the CSV, rendered from the dict `runner.report.build` makes. Nothing here reads disk."""

from __future__ import annotations

import csv
import io
import re

from runner import arms as A
from runner import stats

# a cell that reads as a number (or a count of units, or "—"): right-aligned in the HTML page and the terminal
NUMBER = re.compile(r"^[−\-–]?[0-9.]+|^—$|^[0-9]+ (images|groups)$")

PRIMARY = "auroc"  # the metric a verdict is decided on
MARK = "†"  # a degenerate cell


def _fmt(s: dict) -> str:
    if not s["n"]:
        return "—"
    text = f"{s['mean']:.3f}" + (f" ± {s['std']:.3f}" if s["std"] is not None else "")
    return text + (f" ({s['n']}/{s['planned']} seeds)" if s["n"] < s["planned"] else "")


def _flagged(report: dict) -> set[tuple[str, str, str]]:
    return {(f["dataset"], f["labels"], f["method"]) for f in report.get("degenerate", [])}


def to_markdown(report: dict) -> str:
    lines = [
        "| Dataset | Model 1 accuracy | Model 1 loss | Model 2 accuracy | Model 2 loss |",
        "|---|---|---|---|---|",
    ]
    flagged = _flagged(report)
    for r in report["rows"]:
        cells = []
        for k in ("model1_accuracy", "model1_loss", "model2_accuracy", "model2_loss"):
            method = report[f"{k.split('_')[0]}_method"]
            mark = MARK if (r["dataset"], r["labels"], method) in flagged else ""
            cells.append((_fmt(r[k]) if r[k] else "—") + mark)
        lines.append(f"| {r['dataset']} ({r['labels']} labels) | " + " | ".join(cells) + " |")
    lg = report["legend"]
    lines += [
        "",
        f"Model 1 = {lg['model1'] or 'not in this run'}; Model 2 = {lg['model2'] or 'not in this run'}. "
        f"Test split; {_over_seeds(report)}; loss = cross-entropy, after a temperature fitted on the budget's "
        "validation labels where there were enough to choose one.",
    ]
    if report["tasks_done"] < report["tasks"]:
        lines.append(f"Partial: {report['tasks_done']} of {report['tasks']} tasks done; '—' marks what is missing.")
    notes = [f"Data: {accounting_line(name, acc)}." for name, acc in report.get("data", {}).items()]
    notes += validation_lines(report) + learned_lines(report) + degenerate_notes(report)
    if notes:  # one list item each, so a renderer keeps them apart
        lines += ["", *(f"- {n}" for n in notes)]
    return "\n".join(lines) + "\n"


def _over_seeds(report: dict) -> str:
    most = max((r[k]["n"] for r in report["rows"] for k in ("model1_accuracy", "model2_accuracy") if r.get(k)), default=0)
    return "mean ± std over seeds" if most > 1 else "one seed, so no ± std (the extended table's intervals cover the test sample only)"


def verdict_lines(report: dict) -> list[str]:
    """Model 1 vs Model 2 per dataset and budget, in words (what `run` prints under the table)."""
    return [f"{d['dataset']} {d['labels']}: {d['verdict']} (Δ {d['primary']} {_ci(d.get(d['primary']))}, "
            f"{d['seeds']} seed{'s' if d['seeds'] != 1 else ''}, p (Holm) {_p(d['p_adjusted'], d['seeds'])})"
            for d in report.get("differences", []) if "verdict" in d]


def accounting_line(name: str, acc: dict) -> str:
    """One line for a person: `syn: 240 of 240 images used` and what happened to the rest."""
    text = f"{name}: {acc['used']} of {acc['found']} images used"
    if acc["not_used"]:
        text += "; not used: " + ", ".join(f"{n} {r}" for r, n in acc["not_used"].items())
    if acc["test_kept"]:
        text += "; kept in the published test split: " + ", ".join(f"{n} {r}" for r, n in acc["test_kept"].items())
    if acc.get("external_test_of"):
        text += f"; all of them an external test set of {acc['external_test_of']}"
        text += "".join(f"; {MARK} {w}" for w in acc.get("shared", []))
    return text


def degenerate_notes(report: dict) -> list[str]:
    """One footnote line per degenerate cell: what happened, in which seeds, what to change."""
    out = []
    for f in report.get("degenerate", []):
        seeds = ", ".join(map(str, f["seeds"]))
        out.append(f"{MARK} {f['dataset']} {f['labels']} {f['method']} (seed {seeds}): " + "; ".join(f["reasons"]) + ".")
    return out


def to_csv(report: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["dataset", "labels", "method", "n_seeds", "accuracy_mean", "accuracy_std", "loss_mean", "loss_std",
                "auroc_mean", "balanced_accuracy_mean", "degenerate"])
    flagged = _flagged(report)
    for a in report["arms"]:
        w.writerow([a["dataset"], a["labels"], a["method"], a["accuracy"]["n"], a["accuracy"]["mean"], a["accuracy"]["std"],
                    a["loss"]["mean"], a["loss"]["std"], a["auroc"]["mean"], a["balanced_accuracy"]["mean"],
                    int((a["dataset"], a["labels"], a["method"]) in flagged)])
    return buf.getvalue()


LEARNED = {
    "Model 1 better": "yes: the linear probe on {name} beats {control}",
    "no difference detected": "no gain detected: the frozen features of {name} were not shown to beat {control_features}",
    "Model 2 better": "no: {control_features} beat those of {name}",
}
CONTROL_WORDS = {  # (as the control, as its features)
    "random-linear": ("the random-init control", "an untrained network's features"),
    "imagenet-linear": ("the ImageNet features it started from", "the ImageNet features it started from"),
}


def validation_lines(report: dict) -> list[str]:
    """What chose the selection steps, probe strengths and temperatures, in one or two lines."""
    out = []
    if "full" in report.get("validation", []):
        out.append("Validation: the whole validation split chose steps, probe strengths and temperatures at every budget "
                   "(labels.validation: full): its labels are not in the budget, so low-budget results are optimistic.")
    elif report.get("validation"):
        out.append("Validation: the labels used for any choice (selection step, probe strength, temperature) were drawn at "
                   "each budget's rate and are counted in it.")
    cells = [f"{f['dataset']} {f['labels']} {f['method']}" for f in report.get("fixed_schedule", [])]
    if cells:
        out.append("Fixed schedule (too few validation labels under the budget to choose anything: last step, the probe's "
                   "fixed_c, no temperature): " + ", ".join(cells) + ".")
    return out


def learned_lines(report: dict) -> list[str]:
    """"Did pretraining learn?" per dataset and budget, with a pointer at the schedule when it did not."""
    out = []
    for d in report.get("pretraining_learned", []):
        p = A.pretraining_of(d.get("method", "byol-linear"))
        name = p.label if p else "BYOL"
        control, control_features = CONTROL_WORDS.get(d.get("against", A.CONTROL), CONTROL_WORDS[A.CONTROL])
        text = LEARNED.get(d["verdict"], d["verdict"]).format(name=name, control=control, control_features=control_features)
        if d["verdict"] in ("no difference detected", "Model 2 better"):
            steps = report.get("pretrain_steps", {}).get(f"{d['dataset']}/{p.name if p else 'byol'}")
            ran = f"pretraining ran {steps} optimizer steps; " if steps else ""
            text += (f" ({ran}{name} is usually trained for far longer: raise pretrain.epochs or pretrain.min_steps "
                     f"before reading its fine-tuned arm as the effect of {name})")
        out.append(f"Did pretraining learn? {d['dataset']} {d['labels']}: {text} "
                   f"(Δ {d['primary']} {_ci(d.get(d['primary']))}, p (Holm) {_p(d['p_adjusted'], d['seeds'])}).")
    return out


def _p(p: float | None, seeds: int = 2) -> str:
    """An adjusted p-value as printed: none where one seed decides nothing (its p would read as a finding)."""
    return "—" if p is None or seeds < 2 else f"{p:.3f}"


def _ci(r: dict | None, digits: int = 3) -> str:
    if not r or r["value"] is None:
        return "—"
    text = f"{r['value']:.{digits}f}"
    return text + (f" [{r['ci'][0]:.{digits}f}, {r['ci'][1]:.{digits}f}]" if r["ci"] else "")


def extended_markdown(report: dict) -> str:
    if not report.get("extended"):
        return ""
    flagged = _flagged(report)
    lines = ["| Dataset | Labels | Method | Seeds | Units | Accuracy | AUROC | Balanced accuracy | Sensitivity | Specificity | Loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in report["extended"]:
        mark = MARK if (e["dataset"], e["labels"], e["method"]) in flagged else ""
        lines.append(f"| {e['dataset']} | {e['labels']} | {e['method']}{mark} | {e['seeds']} | {e.get('units', '')} | " + " | ".join(
            _ci(e.get(m)) for m in ("accuracy", "auroc", "balanced_accuracy", "sensitivity", "specificity", "loss")) + " |")
    text = "\n".join(lines) + (
        "\n\nMean over seeds of each seed's metric (AUROC per seed, never over pooled seeds); [95% bootstrap interval "
        "resampling seeds and test images at once: the test split's groups (patients) where the data set has them, "
        "Owen's pigeonhole bootstrap].\n")
    if any(e["seeds"] < 2 for e in report["extended"]):
        text += ("Rows with one seed: their interval covers the test sample only; training and label-draw variation "
                 "are not covered, and no difference is decided on one seed.\n")
    if report.get("differences"):
        d_lines = ["\n| Dataset | Labels | Seeds | Δ accuracy | Δ AUROC | Δ balanced accuracy | Δ loss | p (Holm) | Verdict |",
                   "|---|---|---|---|---|---|---|---|---|"]
        for d in report["differences"]:
            p = _p(d.get("p_adjusted"), d["seeds"])
            d_lines.append(f"| {d['dataset']} | {d['labels']} | {d['seeds']} | " + " | ".join(
                _ci(d.get(m)) for m in ("accuracy", "auroc", "balanced_accuracy", "loss")) + f" | {p} | {d.get('verdict', '')} |")
        fam = {f: next((d.get("comparisons", 0) for d in report["differences"] if d.get("family", "internal") == f), None)
               for f in ("internal", "external")}
        n, n_ext = fam["internal"] or 0, fam["external"]
        text += "\n".join(d_lines) + (
            f"\n\nΔ = Model 1 ({report['model1_method']}) − Model 2 ({report['model2_method']}), on the same draws of seeds "
            f"(paired by seed) and test images. Verdict on {report.get('primary', PRIMARY)}: a difference must stand out from "
            "the test sample's variation (two-sided bootstrap p) and from the seeds' (t-test on the per-seed differences); "
            + (f"the larger p, Holm-adjusted over this run's {n} Model 1 − Model 2 comparison{'s' if n != 1 else ''} on that "
               f"metric, below {stats.ALPHA}." if n else "with one seed no comparison is tested.")
            + (f" The external test sets' rows are a family of their own ({n_ext} comparison{'s' if n_ext != 1 else ''} "
               "tested): adding one leaves the internal verdicts as they were." if n_ext is not None else "")
            + " One seed never decides. The other metrics' intervals are not adjusted for multiplicity.\n")
    return text
