"""Uncertainty and verdicts of a report: every arm's metrics with 95% intervals, Model 1 − Model 2 per
data set and budget with its verdict, and "did pretraining learn?" (each pretraining's linear probe
against its control), from the test predictions `report.collect` gathered. The statistics are
`runner.stats`'s; this module decides what is compared with what, which unit is resampled, and what
blocks a verdict (one seed, an untrained cell, a miscalibrated cell on a loss-type metric).
"""

from __future__ import annotations

import math

import numpy as np

from runner import arms as A
from runner import stats

UNTRAINED, MISCALIBRATED = "untrained", "miscalibrated"
SYMBOLS = {UNTRAINED: "‡", MISCALIBRATED: "†"}  # one symbol per meaning
SHARED_MARK = "§"  # an external test set that shares images with the data set it tests
UNCALIBRATED_MARK = "°"  # a loss without a temperature (fixed schedule: too few validation labels to fit one)
# bench/coverage.py's clustered setting analysed by image (bench/results/coverage-cpu-2core-2026-12-04.json.txt)
IMAGES_FOR_PATIENTS = ("the 95% interval of Δ AUROC held the truth in 59–60% of simulated studies, and 37–42% of studies "
                       "with no difference were called one")


def budget_order(name: str) -> tuple:
    if name.endswith("/class"):
        return (0, int(name.split("/")[0]))
    return (1, float(name.rstrip("%")))


def _cell_order(kv: tuple) -> tuple:
    (ds, budget, method), _ = kv
    return ds, budget_order(budget), method


def pairs_of(entries: list[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np.asarray(e["probs"]), np.asarray(e["labels"])) for e in sorted(entries, key=lambda e: e["seed"])]


def thresholds_of(entries: list[dict]) -> list[float | None]:
    return [e.get("threshold") for e in sorted(entries, key=lambda e: e["seed"])]


def units_of(entries: list[dict]) -> dict:
    """The test split's resampling units: its groups (patients) when the worker recorded them, else
    images, with what standing in for patients does to the interval."""
    groups = entries[0].get("groups")
    n = len(entries[0]["labels"])
    if groups is not None and len(set(groups)) < len(groups):
        return {"groups": groups, "unit": "groups", "count": len(set(groups)), "text": f"{len(set(groups))} groups"}
    return {"groups": None, "unit": "images", "count": n, "text": f"{n} images"}


def add_uncertainty(report: dict, preds: dict, m1: str | None, m2: str | None, b: int, margin: float | None = None,
                    flags: dict | None = None) -> None:
    """report["extended"] (every arm with intervals), report["differences"] (Model 1 − Model 2, two
    families each Holm-adjusted on its own: the internal test splits and the external test sets, so
    that declaring one later leaves the internal verdicts as they were) and report["pretraining_learned"]
    (every pretraining's linear probe against its control, one family, internal test splits only)."""
    report["extended"] = []
    for (ds, budget, method), entries in sorted(preds.items(), key=_cell_order):
        units = units_of(entries)
        res = stats.bootstrap_metrics(pairs_of(entries), entries[0]["positive"], b=b, groups=units["groups"],
                                      thresholds=thresholds_of(entries))
        report["extended"].append({"dataset": ds, "labels": budget, "method": method, "seeds": len(entries),
                                   "units": units["text"], "unit": units["unit"], **res})
    outside = set(report.get("external", {}).values())
    internal = {k: v for k, v in preds.items() if k[0] not in outside}
    external = {k: v for k, v in preds.items() if k[0] in outside}
    flags = flags or {}
    report["differences"] = (compare(report, internal, [(m1, m2)], b, margin=margin, flags=flags)
                             + compare(report, external, [(m1, m2)], b, family="external", margin=margin, flags=flags)
                             ) if m1 and m2 else []
    # an untrained network for a pretraining from random init, the ImageNet features for one that
    # starts from them (beating an untrained network would say nothing about what the in-domain
    # pretraining added); on an external set the question would be transfer, not whether it learned
    pairs = [(m, A.CONTROLS[p.init]) for m, p in A.linear_arms([m for m in A.ARMS if any(k[2] == m for k in preds)])]
    report["pretraining_learned"] = compare(report, internal, pairs, b, family="learned", flags=flags)
    report["units"] = units_summary(report, preds)


def units_summary(report: dict, preds: dict) -> dict[str, dict]:
    """Per data set: what its intervals resample, and a warning where images stand in for patients."""
    out: dict[str, dict] = {}
    for (ds, _, _), entries in sorted(preds.items(), key=_cell_order):
        if ds in out:
            continue
        u = units_of(entries)
        out[ds] = {"unit": u["unit"], "count": u["count"],
                   "warning": None if u["unit"] == "groups" else (
                       "no patient ids: each test image is resampled as its own unit; where a patient (or a lesion) has "
                       "several images, their errors go together and the intervals are too narrow, the verdicts too bold "
                       f"(bench/coverage.py, 6 images a patient resampled as images: {IMAGES_FOR_PATIENTS})")}
    return out


def blocked_reason(flags: dict, dataset: str, budget: str, method: str, against: str, metric: str, seeds: int,
                   family: str) -> str | None:
    """Why this comparison gets no verdict: one seed; an untrained cell (on any metric); a miscalibrated
    cell (on loss, Brier, ECE). In "did pretraining learn?" the control's own flags block nothing: a
    control that learned nothing is what a control should look like."""
    if seeds < 2:
        return "one seed (training and label-draw variation not covered)"
    sides = [(method, "Model 1" if family != "learned" else method)]
    if family != "learned":
        sides.append((against, "Model 2"))
    for mark, what in ((UNTRAINED, "untrained ‡"), (MISCALIBRATED, "miscalibrated †")):
        if mark == MISCALIBRATED and metric not in stats.LOSS_TYPE:
            continue
        who = [name if name == arm else f"{name} ({arm})" for arm, name in sides if mark in flags.get((dataset, budget, arm), set())]
        if who:  # every side it holds for, named
            text = f"{' and '.join(who)} {'are' if len(who) > 1 else 'is'} {what}"
            return text + (f", and {metric} is a calibration metric" if mark == MISCALIBRATED else "")
    return None


def compare(report: dict, preds: dict, pairs: list[tuple[str, str]], b: int, family: str = "internal",
            margin: float | None = None, flags: dict | None = None) -> list[dict]:
    """`a` − `b` for each pair of arms, per dataset and budget, on the seeds both have, paired by seed,
    with a verdict on the primary metric decided over this family of comparisons (`stats.decide`)."""
    out = []
    for a_method, b_method in pairs:
        for ds, budget in sorted({(d, b_) for (d, b_, _) in preds}, key=lambda k: (k[0], budget_order(k[1]))):
            a, c = preds.get((ds, budget, a_method), []), preds.get((ds, budget, b_method), [])
            seeds = sorted({e["seed"] for e in a} & {e["seed"] for e in c})
            if not seeds:
                continue
            a = [e for e in a if e["seed"] in seeds]
            c = [e for e in c if e["seed"] in seeds]
            units = units_of(a)
            diff = stats.paired_difference(pairs_of(a), pairs_of(c), a[0]["positive"], b=b, groups=units["groups"],
                                           groups2=units_of(c)["groups"], thresholds1=thresholds_of(a), thresholds2=thresholds_of(c))
            out.append({"dataset": ds, "labels": budget, "method": a_method, "against": b_method, "seeds": len(seeds),
                        "units": units["text"], "family": family, **diff})
    primary = report["primary"]
    blocked = [blocked_reason(flags or {}, d["dataset"], d["labels"], d["method"], d["against"], primary, d["seeds"], family)
               for d in out]
    for d, decision in zip(out, stats.decide([d.get(primary) or {} for d in out], primary,
                                             margin if family != "learned" else None, blocked)):
        d.update(primary=primary, **decision)
        d["verdict"] = verdict_text(d, flags or {})
    return out


CONTROL_WORDS = {"random-linear": "the random-init control", "imagenet-linear": "the ImageNet features it started from"}


def verdict_text(d: dict, flags: dict) -> str:
    """A comparison's decision in words. Model 1 − Model 2: "Model 1 better", "Model 2 better",
    "equivalent within ±m", "Model 1 not worse than −m", "inconclusive (...)". Did pretraining learn:
    the pretraining's probe against its control, the control named (and its flag marked)."""
    decision, det = d["decision"], d.get("detectable")
    if decision == "not_decided":
        return f"not decided: {d['reason']}"
    if d["family"] == "learned":
        p = A.pretraining_of(d["method"])
        name = p.label if p else d["method"]
        control = CONTROL_WORDS.get(d["against"], d["against"])
        marks = "".join(SYMBOLS[f] for f in (UNTRAINED, MISCALIBRATED) if f in flags.get((d["dataset"], d["labels"], d["against"]), ()))
        control += f" {marks} (flagged: see the notes)" if marks else ""
        return {"model1": f"{name} better than {control}",
                "model2": f"{control} better than {name}"}.get(decision, f"inconclusive: {name} was not shown to beat {control}"
                                                                   + (f" (detectable |Δ| ≥ {det:.3f})" if det is not None else ""))
    m = d.get("margin")
    if decision in ("model1", "model2"):
        return "Model 1 better" if decision == "model1" else "Model 2 better"
    if decision == "equivalent":
        return f"equivalent within ±{m:g}"
    if decision == "not_worse":
        return f"Model 1 not worse by more than {m:g}"
    if not (m and det is not None and det > m):
        return "inconclusive"
    est = d.get(d.get("primary") or "auroc") or {}
    per_seed_sd = (est.get("se_seeds") or 0.0) * math.sqrt(max(d.get("seeds") or 1, 1))
    need = stats.seeds_needed(m, per_seed_sd, est.get("se_test") or 0.0, d.get("comparisons") or 1)
    if need:
        return f"inconclusive (this run could not resolve the margin ±{m:g}; about {need} seeds would)"
    return f"inconclusive (the margin ±{m:g} is beyond this run and any number of seeds: the test split is too small)"
