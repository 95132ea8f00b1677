"""The report's words: the README table, the extended tables with intervals, the Δ table, their notes,
and the CSV, rendered from the dict `runner.report.build` makes. Nothing here reads disk.

One symbol per meaning: ‡ untrained (no verdict on any metric), † miscalibrated (no verdict on a
loss-type metric), ° a loss without a temperature (a fixed schedule: too few validation labels to fit
one), § an external test set that shares images with the data set it tests. Notes are grouped: one
line per reason, naming its cells and their seeds.
"""

from __future__ import annotations

import csv
import io
import re

from runner import arms as A
from runner import stats
from runner.verdicts import MISCALIBRATED, SYMBOLS, UNCALIBRATED_MARK, UNTRAINED

# a cell that reads as a number (or a count of units, or "—"): right-aligned in the HTML page and the terminal
NUMBER = re.compile(r"^[−\-–]?[0-9.]+|^—$|^[0-9]+ (images|groups)$")

PRIMARY = "auroc"  # the metric a verdict is decided on
NAMES = {"accuracy": "accuracy", "loss": "loss", "auroc": "AUROC", "auprc": "AUPRC", "balanced_accuracy": "balanced accuracy",
         "sensitivity": "sensitivity", "specificity": "specificity", "brier": "Brier", "ece": "ECE"}


def _fmt(s: dict) -> str:
    if not s["n"]:
        return "—"
    text = f"{s['mean']:.3f}" + (f" ± {s['std']:.3f}" if s["std"] is not None else "")
    return text + (f" ({s['n']}/{s['planned']} seeds)" if s["n"] < s["planned"] else "")


def cell_flags(report: dict) -> dict[tuple[str, str, str], set[str]]:
    """(dataset, budget, method) -> its flags (untrained, miscalibrated)."""
    out: dict[tuple[str, str, str], set[str]] = {}
    for f in report.get("flags", []):
        for c in f["cells"]:
            out.setdefault((c["dataset"], c["labels"], c["method"]), set()).add(f["flag"])
    return out


def _uncalibrated(report: dict) -> set[tuple[str, str, str]]:
    return {(f["dataset"], f["labels"], f["method"]) for f in report.get("fixed_schedule", [])}


def marks(report: dict, cell: tuple[str, str, str], metric: str) -> str:
    """The symbols a value of `metric` in `cell` carries: ‡ on every metric of an untrained cell, † on
    its loss-type ones when miscalibrated, ° on a loss some seed of which had no temperature."""
    flags = cell_flags(report).get(cell, set())
    out = SYMBOLS[UNTRAINED] if UNTRAINED in flags else ""
    if MISCALIBRATED in flags and metric in stats.LOSS_TYPE:
        out += SYMBOLS[MISCALIBRATED]
    if metric == "loss" and cell in _uncalibrated(report):
        out += UNCALIBRATED_MARK
    return out


def to_markdown(report: dict) -> str:
    lines = [
        "| Dataset | Model 1 accuracy | Model 1 loss | Model 2 accuracy | Model 2 loss |",
        "|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        cells = []
        for k in ("model1_accuracy", "model1_loss", "model2_accuracy", "model2_loss"):
            method = report[f"{k.split('_')[0]}_method"]
            cells.append((_fmt(r[k]) if r[k] else "—") + marks(report, (r["dataset"], r["labels"], method), k.split("_")[1]))
        lines.append(f"| {r['dataset']} ({r['labels']} labels) | " + " | ".join(cells) + " |")
    lg = report["legend"]
    lines += [
        "",
        f"Model 1 = {lg['model1'] or 'not in this run'}; Model 2 = {lg['model2'] or 'not in this run'}. "
        f"Test split; {_over_seeds(report)}; loss = cross-entropy, after a temperature fitted on the budget's "
        "validation labels" + (f" ({UNCALIBRATED_MARK}: some or all seeds had too few to fit one, their loss is uncalibrated)."
                               if report.get("fixed_schedule") else "."),
    ]
    if report["tasks_done"] < report["tasks"]:
        lines.append(f"Partial: {report['tasks_done']} of {report['tasks']} tasks done; '—' marks what is missing.")
    notes = [f"Data: {accounting_line(name, acc)}." for name, acc in report.get("data", {}).items()]
    if report.get("not_own"):
        ids = ", ".join(tid[:8] for tid in report["not_own"])
        notes.append(f"Left out: {len(report['not_own'])} task(s) recorded done whose metrics.json is missing, unreadable or "
                     f"another task's ({ids}); `byol-runner run` with the same manifest computes them again.")
    notes += unit_lines(report) + validation_lines(report) + learned_lines(report) + monitor_lines(report) + rising_lines(report)
    notes += flag_notes(report)
    if notes:  # one list item each, so a renderer keeps them apart
        lines += ["", *(f"- {n}" for n in notes)]
    return "\n".join(lines) + "\n"


def _over_seeds(report: dict) -> str:
    most = max((r[k]["n"] for r in report["rows"] for k in ("model1_accuracy", "model2_accuracy") if r.get(k)), default=0)
    return "mean ± std over seeds" if most > 1 else "one seed, so no ± std (the extended table's intervals cover the test sample only)"


def verdict_lines(report: dict) -> list[str]:
    """Model 1 vs Model 2 per dataset and budget, in words (what `run` prints under the table)."""
    out = []
    for d in report.get("differences", []):
        if "verdict" not in d:
            continue
        det = f"; detectable |Δ| ≥ {d['detectable']:.3f}" if d.get("detectable") is not None else ""
        out.append(f"{d['dataset']} {d['labels']}: {d['verdict']} (Δ {NAMES.get(d['primary'], d['primary'])} "
                   f"{_ci(d.get(d['primary']))}, {d['seeds']} seed{'s' if d['seeds'] != 1 else ''}, "
                   f"p (Holm) {_p(d.get('p_adjusted'))}{det})")
    return out


def accounting_line(name: str, acc: dict) -> str:
    """One line for a person: `syn: 240 of 240 images used` and what happened to the rest."""
    text = f"{name}: {acc['used']} of {acc['found']} images used"
    if acc["not_used"]:
        text += "; not used: " + ", ".join(f"{n} {r}" for r, n in acc["not_used"].items())
    files = acc.get("not_used_files") or []
    if files:
        listed = "results.json and the HTML report list " + ("them" if len(files) == acc["not_used_files_total"] else f"the first {len(files)}")
        named = ", ".join(f"{f['file']} ({f['reason']})" for f in files[:3])
        text += f" (e.g. {named}; {listed})"
    if acc["test_kept"]:
        text += "; kept in the published test split: " + ", ".join(f"{n} {r}" for r, n in acc["test_kept"].items())
    if acc.get("kept_by_setting"):
        text += "; kept by the manifest's settings: " + ", ".join(f"{n} {r}" for r, n in acc["kept_by_setting"].items())
    if acc.get("external_test_of"):
        text += f"; all of them an external test set of {acc['external_test_of']}"
        text += "".join(f"; § {w}" for w in acc.get("shared", []))
    return text


def unit_lines(report: dict) -> list[str]:
    """What each data set's intervals resample, and the warning where images stand in for patients."""
    out = []
    for ds, u in report.get("units", {}).items():
        unit = "patient groups" if u["unit"] == "groups" else "images"
        out.append(f"Units: {ds}: the intervals resample {u['count']} test {unit}" + (f"; {u['warning']}" if u.get("warning") else "")
                   + ".")
    return out


def _cells_text(cells: list[dict]) -> str:
    def seeds(c: dict) -> str:
        return f"seed{'s' if len(c['seeds']) > 1 else ''} {', '.join(map(str, c['seeds']))}"

    return "; ".join(f"{c['dataset']} {c['labels']} {c['method']} ({seeds(c)})" for c in cells)


def flag_notes(report: dict) -> list[str]:
    """One note per flag and reason, naming the cells and seeds it holds for, and what it blocks."""
    out = []
    for f in report.get("flags", []):
        blocks = ("no verdict on any metric" if f["flag"] == UNTRAINED else
                  "no verdict on loss, Brier or ECE; AUROC and accuracy stand")
        out.append(f"{SYMBOLS[f['flag']]} {f['flag']} ({blocks}): {f['reason']}: {_cells_text(f['cells'])}. {f['fix'][0].upper()}"
                   f"{f['fix'][1:]}.")
    return out


def validation_lines(report: dict) -> list[str]:
    """What chose the selection steps, probe strengths, temperatures and thresholds, in one or two lines."""
    out = []
    if "full" in report.get("validation", []):
        out.append("Validation: the whole validation split chose steps, probe strengths, temperatures and thresholds at every "
                   "budget (labels.validation: full): its labels are not in the budget, so low-budget results are optimistic.")
    elif report.get("validation"):
        out.append("Validation: the labels used for any choice (selection step, probe strength, temperature, operating "
                   "threshold) were drawn at each budget's rate and are counted in it.")
    cells = report.get("fixed_schedule", [])
    if cells:
        out.append(f"{UNCALIBRATED_MARK} Fixed schedule (too few validation labels under the budget to choose anything: last "
                   "step, the probe's fixed_c, no temperature, no operating threshold): " + _cells_text(cells) + ".")
    return out


def learned_lines(report: dict) -> list[str]:
    """"Did pretraining learn?" per dataset and budget, with a pointer at the schedule when it did not."""
    out = []
    for d in report.get("pretraining_learned", []):
        p = A.pretraining_of(d.get("method", "byol-linear"))
        name = p.label if p else "BYOL"
        text = d["verdict"]
        if d.get("decision") in ("inconclusive", "model2"):
            steps = report.get("pretrain_steps", {}).get(f"{d['dataset']}/{p.name if p else 'byol'}")
            ran = f"pretraining ran {steps} optimizer steps; " if steps else ""
            text += f" ({ran}{name} is usually trained for far longer: raise pretrain.epochs or pretrain.min_steps)"
        out.append(f"Did pretraining learn? {d['dataset']} {d['labels']}: {text} "
                   f"(linear probes, Δ {NAMES.get(d['primary'], d['primary'])} {_ci(d.get(d['primary']))}, p (Holm) "
                   f"{_p(d.get('p_adjusted'))}).")
    return out


def rising_lines(report: dict) -> list[str]:
    """The pretrainings whose loss ended no lower than it began: what their arms stand on learned nothing."""
    rising = report.get("loss_not_falling", [])
    if not rising:
        return []
    which = "; ".join(f"{r['dataset']} {r['method']} seed {r['seed']} ({r['first']:.3f} → {r['last']:.3f})" for r in rising)
    return [f"Pretraining loss did not fall (last epoch's mean at or above the first's): {which}. Its encoder learned nothing "
            "usable and every arm built on it shows that, not BYOL: check pretrain.base_lr and pretrain.weight_decay."]


def monitor_gain(g: dict) -> tuple[float, int, int] | None:
    """The monitor's mean gain over the untrained network at its last step, the seeds it was higher in,
    and the seeds scored; None when no seed has both scores."""
    pairs = [(s["auroc"], s["untrained"]) for s in g["seeds"] if s.get("untrained") is not None]
    if not pairs:
        return None
    return sum(a - b for a, b in pairs) / len(pairs), sum(a > b for a, b in pairs), len(pairs)


def monitor_lines(report: dict) -> list[str]:
    """The pretraining monitor per data set: where its kNN AUROC ended against the untrained network's,
    or that it scored too few labelled images to tell."""
    from runner.scoring import too_few

    out = []
    for g in report.get("monitor", []):
        p = A.PRETRAININGS.get(g["method"])
        name = p.label if p else g["method"]
        n, per_class = g.get("queries") or 0, g.get("query_classes")
        scored = f"{n} labelled validation images" + (f", {min(per_class)} in the rarer class" if per_class else "")
        gain = monitor_gain(g)
        head = f"Pretraining monitor, {g['dataset']} {name} (kNN AUROC of the frozen features on {scored}; no test label): "
        if too_few(n, per_class):
            out.append(head + "too few images to tell whether the features improved (run.monitor_labels: largest gives it the "
                              "most labels).")
        elif gain is not None:
            mean, higher, seeds = gain
            step = max(s["step"] or 0 for s in g["seeds"])
            out.append(head + f"at step {step}, {mean:+.3f} against the untrained network on average, higher in {higher} of "
                              f"{seeds} seeds.")
    return out


def _p(p: float | None) -> str:
    """An adjusted p-value as printed: none where nothing was tested (one seed, a blocked cell)."""
    if p is None:
        return "—"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _ci(r: dict | None, digits: int = 3) -> str:
    if not r or r.get("value") is None:
        return "—"
    text = f"{r['value']:.{digits}f}"
    return text + (f" [{r['ci'][0]:.{digits}f}, {r['ci'][1]:.{digits}f}]" if r.get("ci") else "")


DISCRIMINATION = ("accuracy", "auroc", "auprc", "balanced_accuracy", "sensitivity", "specificity")
CALIBRATION = ("loss", "brier", "ece", "sensitivity_op", "specificity_op")


def _arm_table(report: dict, metrics: tuple[str, ...], heads: list[str]) -> list[str]:
    lines = ["| Dataset | Labels | Method | Seeds | Units | " + " | ".join(heads) + " |",
             "|---|---|---|---|---|" + "---|" * len(heads)]
    for e in report["extended"]:
        cell = (e["dataset"], e["labels"], e["method"])
        lines.append(f"| {e['dataset']} | {e['labels']} | {e['method']} | {e['seeds']} | {e.get('units', '')} | " + " | ".join(
            _ci(e.get(m)) + marks(report, cell, m) for m in metrics) + " |")
    return lines


def extended_markdown(report: dict) -> str:
    if not report.get("extended"):
        return ""
    lines = _arm_table(report, DISCRIMINATION, ["Accuracy", "AUROC", "AUPRC", "Balanced accuracy", "Sensitivity", "Specificity"])
    lines += [""] + _arm_table(report, CALIBRATION, ["Loss", "Brier", "ECE", "Sensitivity at threshold", "Specificity at threshold"])
    target = report.get("target_sensitivity")
    rule = f"the highest with validation sensitivity ≥ {target:g}" if target else "the largest Youden's J"
    text = "\n".join(lines) + (
        "\n\nMean over seeds of each seed's metric (AUROC per seed, never over pooled seeds) [95% interval: mean ± t × SE, "
        "the SE adding the seeds' variation (S − 1 degrees of freedom) and the test sample's (a bootstrap of the test units, "
        "patients where the data set names them), Welch–Satterthwaite degrees of freedom; a proportion at 0 or 1: the exact "
        "Clopper–Pearson interval of its units]. Sensitivity and specificity at the argmax (0.5); 'at threshold': at the "
        f"operating threshold chosen on each seed's budgeted validation labels ({rule}).\n")
    if any(e["seeds"] < 2 for e in report["extended"]):
        text += ("Rows with one seed: their interval covers the test sample only; training and label-draw variation "
                 "are not covered, and no difference is decided on one seed.\n")
    if report.get("differences"):
        text += "\n" + delta_markdown(report)
    return text


def delta_markdown(report: dict) -> str:
    primary = report.get("primary", PRIMARY)
    lines = [f"| Dataset | Labels | Seeds | Δ accuracy | Δ AUROC | Δ AUPRC | Δ loss | p (Holm) | Detectable Δ {NAMES.get(primary, primary)} "
             "| Verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
    for d in report["differences"]:
        det = "—" if d.get("detectable") is None else f"{d['detectable']:.3f}"
        lines.append(f"| {d['dataset']} | {d['labels']} | {d['seeds']} | " + " | ".join(
            _ci(d.get(m)) for m in ("accuracy", "auroc", "auprc", "loss")) + f" | {_p(d.get('p_adjusted'))} | {det} | {d.get('verdict', '')} |")
    fam = {f: next((d.get("comparisons", 0) for d in report["differences"] if d.get("family", "internal") == f), None)
           for f in ("internal", "external")}
    n, n_ext = fam["internal"] or 0, fam["external"]
    margin = report.get("margin")
    if not n and not n_ext:
        return "\n".join(lines) + (
            f"\n\nΔ = Model 1 ({report['model1_method']}) − Model 2 ({report['model2_method']}), seeds paired by seed, the same "
            "bootstrap draws of test units for both. Nothing was tested: a verdict needs at least two seeds and a cell "
            "that learned; the intervals cover the test sample only.\n")
    return "\n".join(lines) + (
        f"\n\nΔ = Model 1 ({report['model1_method']}) − Model 2 ({report['model2_method']}), seeds paired by seed, the same "
        f"bootstrap draws of test units for both. Verdict on {NAMES.get(primary, primary)}: the t test that Δ = 0 (the SE of both "
        f"axes, as above), Holm-adjusted over this run's {n} comparison{'s' if n != 1 else ''} (one a flag blocks counts, as never "
        f"rejected: flags read test results), below {stats.ALPHA}"
        + (f"; else, with the margin ±{margin:g}, equivalence by two one-sided tests (TOST) and 'not worse by more than "
           f"{margin:g}' by one, each Holm-adjusted over the same comparisons" if margin else
           "; no margin was set (compare.margin), so no comparison can conclude equivalence")
        + f". Detectable Δ: the smallest |Δ| this run finds with 80% probability at the strictest Holm level ({stats.ALPHA}/{max(n, 1)})."
        + (f" The external test sets' rows are a family of their own ({n_ext} comparison{'s' if n_ext != 1 else ''} tested): "
           "adding one leaves the internal verdicts as they were." if n_ext is not None else "")
        + " One seed, and an untrained cell, never decide. The other metrics' intervals are not adjusted for multiplicity.\n")


def to_csv(report: dict) -> str:
    """Every arm: seeds, units, each metric's value and 95% interval, its flags."""
    buf = io.StringIO()
    w = csv.writer(buf)
    metrics = DISCRIMINATION + CALIBRATION
    w.writerow(["dataset", "labels", "method", "n_seeds", "units"] + [f"{m}{s}" for m in metrics for s in ("", "_lo", "_hi")]
               + ["accuracy_std", "loss_std", "flags", "uncalibrated_loss"])
    arms = {(a["dataset"], a["labels"], a["method"]): a for a in report["arms"]}
    flags = cell_flags(report)
    for e in report.get("extended", []):
        cell = (e["dataset"], e["labels"], e["method"])
        vals = []
        for m in metrics:
            r = e.get(m) or {}
            vals += [r.get("value"), *(r.get("ci") or (None, None))]
        arm = arms.get(cell, {})
        w.writerow([*cell, e["seeds"], e.get("units", ""), *vals, (arm.get("accuracy") or {}).get("std"),
                    (arm.get("loss") or {}).get("std"), " ".join(sorted(flags.get(cell, ()))), int(cell in _uncalibrated(report))])
    return buf.getvalue()
