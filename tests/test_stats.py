"""Honest uncertainty on hand-made cases with known answers: per-seed rank metrics, intervals that
resample patients and seeds, verdicts adjusted for the number of comparisons, degenerate cells
flagged. The report is built from metrics.json files written here, as workers write them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from runner import report as R
from runner import tables
from runner import stats
from runner.stats import bootstrap_metrics, decide, holm, paired_difference
from runner.store import TaskRow


def two_class(p_pos: np.ndarray) -> np.ndarray:
    return np.stack([1 - p_pos, p_pos], 1)


def test_perfect_rankers_with_shifted_scores_have_auroc_one():
    """Three seeds each rank every positive above every negative, on different score scales: pooled
    over seeds their AUROC would be about 0.67; per seed it is 1."""
    labels = np.r_[np.zeros(20, int), np.ones(20, int)]
    base = np.r_[np.linspace(0.0, 0.1, 20), np.linspace(0.15, 0.25, 20)]
    seeds = [(two_class(base + 0.3 * s), labels) for s in range(3)]
    r = bootstrap_metrics(seeds, positive=1, b=200)
    assert r["auroc"]["value"] == pytest.approx(1.0)
    assert r["auroc"]["per_seed"] == [pytest.approx(1.0)] * 3
    assert r["auroc"]["ci"] == (pytest.approx(1.0), pytest.approx(1.0))


def _patient_bootstrap_accuracy_width(correct: np.ndarray, patients: np.ndarray, b: int, seed: int) -> float:
    """The textbook cluster bootstrap, written out: draw patients with replacement, pool their images."""
    rng = np.random.default_rng(seed)
    ids = np.unique(patients)
    by_patient = [correct[patients == p] for p in ids]
    reps = []
    for _ in range(b):
        drawn = rng.integers(0, len(ids), len(ids))
        reps.append(np.concatenate([by_patient[i] for i in drawn]).mean())
    lo, hi = np.percentile(reps, [2.5, 97.5])
    return hi - lo


def test_intervals_resample_patients_when_the_data_set_has_them():
    """80 test patients of 5 images each, a patient's images mostly right or mostly wrong together."""
    rng = np.random.default_rng(0)
    patients = np.repeat([f"p{i:02d}" for i in range(80)], 5)
    labels = np.repeat(rng.integers(0, 2, 80), 5)
    patient_ok = np.repeat(rng.random(80) < 0.7, 5)
    right = np.where(rng.random(400) < 0.95, patient_ok, ~patient_ok)
    p_true = np.where(right, 0.8, 0.2)
    p_pos = np.where(labels == 1, p_true, 1 - p_true)
    per_seed = [(two_class(p_pos), labels)]
    grouped = bootstrap_metrics(per_seed, positive=1, b=2000, groups=patients)
    images = bootstrap_metrics(per_seed, positive=1, b=2000)
    width = grouped["accuracy"]["ci"][1] - grouped["accuracy"]["ci"][0]
    reference = _patient_bootstrap_accuracy_width(right.astype(float), patients, b=2000, seed=1)
    assert width == pytest.approx(reference, rel=0.10)
    image_width = images["accuracy"]["ci"][1] - images["accuracy"]["ci"][0]
    assert image_width < 0.7 * width  # resampling images would claim far more certainty


def test_seed_to_seed_variation_widens_the_interval():
    """Two seeds, one at 60% and one at 90% accuracy on 1,000 images: the test sample alone would
    give an interval of about ±0.02 around 0.75; the seeds' disagreement must show in it."""
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 1000)

    def seed_with(acc: float) -> tuple[np.ndarray, np.ndarray]:
        right = rng.random(1000) < acc
        p_pos = np.where(right == (labels == 1), 0.7, 0.3)
        return two_class(p_pos), labels

    r = bootstrap_metrics([seed_with(0.6), seed_with(0.9)], positive=1, b=1000)
    lo, hi = r["accuracy"]["ci"]
    assert lo < 0.65 and hi > 0.85
    one = bootstrap_metrics([seed_with(0.75)], positive=1, b=1000)
    assert one["accuracy"]["ci"][1] - one["accuracy"]["ci"][0] < 0.1


def test_with_seeds_only_the_p_is_students_one_sample_t_test():
    """Per-seed differences and no test-sample replicates: the p-value is scipy's one-sample t-test
    (written on scipy.special's Student t CDF, no scipy.stats import)."""
    from scipy import stats as sps

    rng = np.random.default_rng(4)
    for n in (2, 3, 5, 10):
        for shift in (0.0, 0.02, 0.3):
            d = rng.normal(shift, 0.05, n)
            est = stats.combine(d[:, None])
            assert stats.p_zero(est) == pytest.approx(sps.ttest_1samp(d, 0.0).pvalue, rel=1e-9, abs=1e-15)
            lo, hi = sps.t.interval(0.95, n - 1, loc=d.mean(), scale=sps.sem(d))
            assert est["ci"] == (pytest.approx(lo), pytest.approx(hi)) and est["df"] == pytest.approx(n - 1)
    assert stats.p_zero(stats.combine(np.array([[0.1]]))) is None  # one seed: no test
    assert stats.p_zero(stats.combine(np.array([[0.2], [0.2], [0.2]]))) == 0.0  # no spread, a difference
    assert stats.p_zero(stats.combine(np.array([[0.0], [0.0]]))) == 1.0


def test_the_test_sample_and_the_seeds_add_up_with_satterthwaite_degrees_of_freedom():
    """SE² = s²/S + the test-sample variance the seeds share; df = SE⁴ / ((s²/S)² / (S − 1)) (no unit
    count given: the bootstrap's part has infinite degrees of freedom). Test noise a seed has on its
    own is in s² already and is not counted twice."""
    rng = np.random.default_rng(8)
    per_seed = np.array([0.10, 0.14, 0.12])
    reps = per_seed[:, None] + rng.normal(0, 0.02, (1, 500))  # the test-sample draws shift every seed alike
    est = stats.combine(np.hstack([per_seed[:, None], reps]))
    v_seed, v_test = per_seed.var(ddof=1) / 3, reps.mean(0).var(ddof=1)
    assert est["se"] == pytest.approx(np.sqrt(v_seed + v_test))
    assert est["df"] == pytest.approx((v_seed + v_test) ** 2 / (v_seed ** 2 / 2))
    half = stats.t_quantile(0.975, est["df"]) * est["se"]
    assert est["ci"] == (pytest.approx(0.12 - half), pytest.approx(0.12 + half))
    own = per_seed[:, None] + rng.normal(0, 0.02, (3, 20_000))  # each seed's test noise its own: nothing shared
    alone = stats.combine(np.hstack([per_seed[:, None], own]))
    assert alone["se"] == pytest.approx(np.sqrt(v_seed), rel=0.02) and alone["df"] == pytest.approx(2, rel=0.05)
    with_units = stats.combine(np.hstack([per_seed[:, None], reps]), units=41)  # 41 resampled units: 40 more df, var × 41/40
    assert with_units["se"] == pytest.approx(np.sqrt(v_seed + v_test * 41 / 40))
    assert with_units["df"] == pytest.approx((v_seed + v_test * 41 / 40) ** 2 / (v_seed ** 2 / 2 + (v_test * 41 / 40) ** 2 / 40))


def test_detectable_difference_has_80_percent_power():
    """The detectable Δ, simulated: a true difference of that size is found by the t test 80% of the time."""
    rng = np.random.default_rng(1)
    se, df, alpha = 0.01, 4, 0.05 / 9
    mdd = stats.detectable(se, df, alpha)
    crit = stats.t_quantile(1 - alpha / 2, df)
    # the t statistic under that difference: (mdd + se·Z) / (se·sqrt(χ²_df/df))
    t = (mdd / se + rng.normal(size=200_000)) / np.sqrt(rng.chisquare(df, 200_000) / df)
    assert np.mean(np.abs(t) > crit) == pytest.approx(0.8, abs=0.005)
    assert stats.detectable(se, np.inf, 0.05) == pytest.approx(se * (1.959964 + 0.841621), rel=1e-3)


def test_holm_adjusts_step_down():
    assert holm([0.01, 0.04, 0.03, 0.005]) == [pytest.approx(0.03), pytest.approx(0.06), pytest.approx(0.06), pytest.approx(0.02)]
    assert holm([0.5, None, 0.01]) == [pytest.approx(0.5), None, pytest.approx(0.02)]


def test_a_lucky_single_seed_is_never_called_a_difference():
    labels = np.r_[np.zeros(200, int), np.ones(200, int)]
    good, bad = two_class(np.where(labels == 1, 0.9, 0.1)), two_class(0.5 + np.random.default_rng(0).uniform(-0.01, 0.01, 400))
    d = paired_difference([(good, labels)], [(bad, labels)], positive=1, b=500)
    assert d["auroc"]["value"] > 0.4 and d["auroc"]["ci"][0] > 0.3  # on the test sample alone it looks decisive
    assert d["auroc"]["p"] is None  # no seed-level test on one seed
    (one,) = decide([d["auroc"]], "auroc")
    assert one["decision"] == "not_decided" and one["reason"].startswith("one seed")
    three = paired_difference([(good, labels)] * 3, [(bad, labels)] * 3, positive=1, b=500)
    assert decide([three["auroc"]], "auroc")[0]["decision"] == "model1"
    assert decide([three["loss"]], "loss")[0]["decision"] == "model1"  # lower loss is better: Model 1's
    # an untrained cell decides nothing, on either side
    (blocked,) = decide([three["auroc"]], "auroc", blocked=["Model 2 (supervised) is untrained ‡"])
    assert blocked["decision"] == "not_decided" and "untrained" in blocked["reason"] and blocked["p_adjusted"] is None


def test_consistent_test_sample_but_disagreeing_seeds_decide_nothing():
    """Two seeds, Δ AUROC +0.01 and +0.03 on 2,000 images: the test sample alone would call it; the
    per-seed differences (one degree of freedom) do not."""
    rng = np.random.default_rng(9)
    labels = rng.integers(0, 2, 2000)
    base = np.clip(0.5 + 0.25 * (labels - 0.5) + rng.normal(0, 0.15, 2000), 0.01, 0.99)
    m2 = [(two_class(base), labels)] * 2
    m1 = [(two_class(np.clip(base + (labels - 0.5) * shift, 0.01, 0.99)), labels) for shift in (0.012, 0.04)]
    d = paired_difference(m1, m2, positive=1, b=1000)["auroc"]
    assert all(x > 0 for x in d["per_seed"]) and d["se_test"] < d["value"] / 3
    assert d["p"] > 0.05 and decide([d], "auroc")[0]["decision"] == "inconclusive"


def test_a_margin_decides_equivalence_and_not_worse_with_tost():
    """Δ near 0 measured tightly: equivalent within ±0.05 (both one-sided tests reject), not within
    ±0.005; Δ = +0.03 ± 0.02: not worse than −0.05, but perhaps more than +0.05 better, so not
    equivalent. Each test is Holm-adjusted over the family."""
    def est(value: float, se: float, s: int = 5) -> dict:
        d = np.full(s, value) + np.linspace(-1, 1, s) * se * np.sqrt(s) / np.linspace(-1, 1, s).std(ddof=1)
        return stats.combine(d[:, None])

    close, unsure = est(0.001, 0.004), est(0.03, 0.02)  # the second: surely above −0.05, perhaps above +0.05
    out = decide([close, unsure], "auroc", margin=0.05)
    assert [d["decision"] for d in out] == ["equivalent", "not_worse"]
    assert out[0]["p_equivalence"] < 0.05 and out[0]["comparisons"] == 2
    assert decide([close], "auroc", margin=0.005)[0]["decision"] == "inconclusive"
    assert decide([close], "auroc")[0]["decision"] == "inconclusive"  # no margin: never "equivalent"
    # for a lower-is-better metric the margin guards Model 1 being higher
    assert decide([est(0.01, 0.004)], "loss", margin=0.05)[0]["decision"] in ("not_worse", "equivalent")
    assert decide([est(0.08, 0.004)], "loss", margin=0.05)[0]["decision"] == "model2"


def test_a_large_family_decides_an_overwhelming_difference():
    """27 comparisons (three pretrainings × three data sets × three budgets), one overwhelming: the
    p-value has no floor, so Holm over 27 still decides it (a bootstrap of 1,000 replicates could not
    go below 0.002, and 27 × 0.002 > 0.05)."""
    rng = np.random.default_rng(2)
    labels = np.r_[np.zeros(100, int), np.ones(100, int)]
    noise = lambda: rng.normal(0, 0.1, 200)  # noqa: E731
    weak = lambda: two_class(np.clip(0.5 + 0.02 * (labels - 0.5) + noise(), 0.01, 0.99))  # noqa: E731
    strong = [two_class(np.clip(0.5 + 0.9 * (labels - 0.5) + noise(), 0.01, 0.99)) for _ in range(3)]
    family = [paired_difference([(strong[s], labels) for s in range(3)], [(weak(), labels) for _ in range(3)], 1, b=1000)["auroc"]]
    for _ in range(26):
        family.append(paired_difference([(weak(), labels) for _ in range(3)], [(weak(), labels) for _ in range(3)], 1, b=200)["auroc"])
    out = decide(family, "auroc")
    assert family[0]["value"] > 0.4 and out[0]["comparisons"] == 27 and out[0]["decision"] == "model1", out[0]
    assert out[0]["p_adjusted"] < 0.05 and all(d["decision"] in ("inconclusive", "model1", "model2") for d in out)


# ---- the report of a run, from metrics.json files ---------------------------------------------------


def _task(results: Path, tid: str, method: str, kind: str, seed: int, probs: np.ndarray, labels: np.ndarray,
          selected_step: int = 12, prior_loss: float = 0.69, groups: list[str] | None = None) -> TaskRow:
    from runner.ml.metrics import classification_metrics

    d = results / "tasks" / tid
    d.mkdir(parents=True)
    selection = {"C": 1.0} if kind in ("linear", "random-linear") else {"selected_step": selected_step, "steps": 40}
    preds = {"test_probs": probs.tolist(), "test_labels": labels.tolist()}
    if groups is not None:
        preds["test_groups"] = groups
    (d / "metrics.json").write_text(json.dumps({
        "task": tid, "kind": kind, "dataset": "ds", "seed": seed, "test": classification_metrics(probs, labels, 1),
        "selection": selection, "prior_loss": prior_loss, "n_labeled": 10, "class_names": ["neg", "pos"], "positive": 1,
        "predictions": preds}))
    return TaskRow(tid, kind, "ds", method, seed, "10%", [], "done", None, None, None, None, None)


def _run(results: Path, model2_probs, seeds=(0, 1, 2), **model2) -> dict:
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(30, int), np.ones(30, int)]
    tasks = []
    for s in seeds:
        p1 = np.clip(np.where(labels == 1, 0.75, 0.25) + rng.normal(0, 0.15, 60), 0.01, 0.99)
        tasks.append(_task(results, f"ft{s}", "byol-finetune", "finetune", s, two_class(p1), labels))
        tasks.append(_task(results, f"su{s}", "supervised", "supervised", s, model2_probs(labels), labels, **model2))
    return R.build(results, "t", tasks, "ResNet18", bootstrap=300)


def test_a_constant_prediction_cell_is_flagged_untrained_and_decides_nothing(tmp_path):
    prior = np.mean([0, 1])
    rep = _run(tmp_path, lambda labels: two_class(np.full(len(labels), prior)), selected_step=0, prior_loss=0.6931)
    by_key = {f["key"]: f for f in rep["flags"]}
    assert by_key["step0"]["flag"] == by_key["constant"]["flag"] == "untrained" and by_key["prior"]["flag"] == "miscalibrated"
    assert all(f["cells"] == [{"dataset": "ds", "labels": "10%", "method": "supervised", "seeds": [0, 1, 2]}] for f in rep["flags"])
    diff = rep["differences"][0]
    assert diff["decision"] == "not_decided" and "Model 2 (supervised) is untrained" in diff["verdict"]
    assert diff["p_adjusted"] is None and diff["comparisons"] == 1  # it counts in the family: its flag read test results
    md = tables.to_markdown(rep) + tables.extended_markdown(rep)
    row = next(line for line in md.splitlines() if line.startswith("| ds (10% labels)"))
    assert row.endswith("| 0.500 ± 0.000‡ | 0.693 ± 0.000‡† |")  # accuracy untrained; loss untrained and miscalibrated
    notes = [line for line in md.splitlines() if line.startswith("- ‡") or line.startswith("- †")]
    assert len(notes) == 3 and all("ds 10% supervised (seeds 0, 1, 2)" in n for n in notes)  # one line per reason, seeds listed once
    saved = json.loads(json.dumps(rep))
    assert saved["flags"][0]["cells"][0]["method"] == "supervised"


def test_a_miscalibrated_cell_can_still_win_on_auroc_but_not_on_loss(tmp_path):
    """AUROC 0.93 with a log-loss worse than the prior's (over-confident and shifted): † blocks a loss
    verdict, not an AUROC one, which calibration cannot change."""
    rng = np.random.default_rng(12)
    labels = np.r_[np.zeros(60, int), np.ones(60, int)]
    tasks = []
    for s in (0, 1, 2, 3, 4):
        score = labels * 2.2 + rng.normal(0, 0.8, 120)
        bad = two_class(np.clip(1 / (1 + np.exp(-(6 * score - 14))), 1e-6, 1 - 1e-6))  # ranks well, calls nearly all negative
        weak = two_class(np.clip(0.5 + 0.08 * (labels - 0.5) + rng.normal(0, 0.1, 120), 0.01, 0.99))
        tasks.append(_task(tmp_path, f"ft{s}", "byol-finetune", "finetune", s, bad, labels, prior_loss=0.6931))
        tasks.append(_task(tmp_path, f"su{s}", "supervised", "supervised", s, weak, labels, prior_loss=0.6931))
    rep = R.build(tmp_path, "t", tasks, "ResNet18", bootstrap=300)
    assert [f["key"] for f in rep["flags"]] == ["prior"]
    ft = next(e for e in rep["extended"] if e["method"] == "byol-finetune")
    assert ft["auroc"]["value"] > 0.9
    assert rep["differences"][0]["decision"] == "model1"
    on_loss = R.build(tmp_path, "t", tasks, "ResNet18", bootstrap=300, primary="loss")["differences"][0]
    assert on_loss["decision"] == "not_decided" and "miscalibrated" in on_loss["reason"]


def test_a_selected_step_0_cell_cannot_win_on_anything(tmp_path):
    labels = np.r_[np.zeros(30, int), np.ones(30, int)]
    rng = np.random.default_rng(3)
    tasks = []
    for s in (0, 1, 2):
        good = two_class(np.clip(np.where(labels == 1, 0.9, 0.1) + rng.normal(0, 0.05, 60), 0.01, 0.99))
        weak = two_class(np.clip(0.5 + 0.05 * (labels - 0.5) + rng.normal(0, 0.1, 60), 0.01, 0.99))
        tasks.append(_task(tmp_path, f"ft{s}", "byol-finetune", "finetune", s, good, labels, selected_step=0 if s == 1 else 12))
        tasks.append(_task(tmp_path, f"su{s}", "supervised", "supervised", s, weak, labels))
    for primary in ("auroc", "accuracy", "loss", "balanced_accuracy"):
        d = R.build(tmp_path, "t", tasks, "ResNet18", bootstrap=100, primary=primary)["differences"][0]
        assert d["decision"] == "not_decided" and "Model 1 (byol-finetune) is untrained" in d["reason"], primary


def test_the_report_decides_on_the_primary_metric_with_holm_and_names_it(tmp_path):
    rep = _run(tmp_path, lambda labels: two_class(np.full(len(labels), 0.5) + np.linspace(-0.2, 0.2, len(labels))))
    diff = rep["differences"][0]
    assert diff["primary"] == "auroc" and diff["comparisons"] == 1
    assert diff["p_adjusted"] == pytest.approx(diff["auroc"]["p"])
    assert diff["decision"] in ("model1", "model2", "inconclusive") and diff["detectable"] > 0
    md = tables.extended_markdown(rep)
    assert "Holm" in md and "| Verdict" in md and diff["verdict"] in md and "Detectable Δ AUROC" in md
    assert "the seeds' variation" in md and "bootstrap of the test units" in md


def test_one_seed_reports_say_what_the_interval_leaves_out(tmp_path):
    rep = _run(tmp_path, lambda labels: two_class(np.where(labels == 1, 0.65, 0.35)), seeds=(0,))
    assert rep["differences"][0]["verdict"].startswith("not decided: one seed")
    md = tables.extended_markdown(rep)
    assert "one seed" in md and "not covered" in md


def test_groups_in_the_predictions_are_the_resampled_units(tmp_path):
    groups = [f"patient{i // 6}" for i in range(60)]
    rng = np.random.default_rng(3)
    labels = np.r_[np.zeros(30, int), np.ones(30, int)]
    tasks = [_task(tmp_path, f"su{s}", "supervised", "supervised", s,
                   two_class(np.clip(np.where(labels == 1, 0.7, 0.3) + rng.normal(0, 0.2, 60), 0.01, 0.99)), labels,
                   groups=groups) for s in (0, 1)]
    rep = R.build(tmp_path, "t", tasks, "ResNet18", bootstrap=100)
    assert rep["extended"][0]["units"] == "10 groups"
    assert "10 groups" in tables.extended_markdown(rep)


def test_the_worker_records_test_groups_only_when_the_data_set_has_them():
    from types import SimpleNamespace

    from runner.worker.kinds import test_groups as _test_groups

    keys = ["a/1.png", "a/2.png", "b/1.png", "c/1.png"]
    grouped = SimpleNamespace(keys=keys, groups=["a", "a", "b", "c"])
    assert _test_groups(grouped, np.array([1, 2, 3])) == {"test_groups": ["a", "b", "c"]}
    ungrouped = SimpleNamespace(keys=keys, groups=list(keys))  # every image its own group
    assert _test_groups(ungrouped, np.array([0, 3])) == {}


def test_intervals_are_95_percent_intervals():
    """Accuracy 0.9 on 400 independent images: the binomial standard error is 0.015, so a 95% interval
    is about 0.059 wide (a 90% one would be about 0.049)."""
    labels = np.r_[np.zeros(200, int), np.ones(200, int)]
    right = np.r_[np.ones(180, bool), np.zeros(20, bool), np.ones(180, bool), np.zeros(20, bool)]
    p_pos = np.where(right == (labels == 1), 0.8, 0.2)
    r = bootstrap_metrics([(two_class(p_pos), labels)], positive=1, b=4000)
    lo, hi = r["accuracy"]["ci"]
    assert 0.054 < hi - lo < 0.064


def test_the_difference_uses_the_same_draws_for_both_models():
    """Two models that disagree on 6 of 400 images: paired on the same draws the difference is known
    to within about ±0.01; drawn apart, each model's own ±0.03 would swamp it."""
    labels = np.r_[np.zeros(200, int), np.ones(200, int)]
    rng = np.random.default_rng(5)
    right = rng.random(400) < 0.8
    other = right.copy()
    other[:6] = ~other[:6]
    to_probs = lambda r: two_class(np.where(r == (labels == 1), 0.8, 0.2))  # noqa: E731
    d = paired_difference([(to_probs(right), labels)], [(to_probs(other), labels)], positive=1, b=2000)
    lo, hi = d["accuracy"]["ci"]
    assert hi - lo < 0.03


def test_the_tuis_results_screen_marks_a_degenerate_cell(tmp_path):
    import asyncio

    from textual.geometry import Region

    from runner.plan import PlannedTask
    from runner.store import Store
    from runner.tui.app import RunnerApp

    results = tmp_path / "results"
    labels = np.r_[np.zeros(30, int), np.ones(30, int)]
    _task(results, "fin0000000000001", "byol-finetune", "finetune", 0, two_class(np.where(labels == 1, 0.8, 0.2)), labels)
    _task(results, "sup0000000000001", "supervised", "supervised", 0, two_class(np.full(60, 0.5)), labels, selected_step=0)
    store = Store(results / "runner.db")
    run = store.begin_run("t", "name: t\nmodel: {arch: resnet18}\n", "/nonexistent/t.yaml", 0, "local")
    store.add_tasks(run, [PlannedTask("fin0000000000001", "finetune", "ds", "byol-finetune", 0, "10%", [], {}),
                          PlannedTask("sup0000000000001", "supervised", "ds", "supervised", 0, "10%", [], {})], set())
    for tid in ("fin0000000000001", "sup0000000000001"):
        store.set_status(tid, "done", None)
    store.commit()
    store.end_run(run, "done", 0)
    store.close()
    app = RunnerApp(results, poll_s=3600)

    async def results_screen() -> tuple[str, str]:
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("3")
            await pilot.pause(0.5)
            table = app.query_one("#table")
            screen = "\n".join(line.text for line in table.render_lines(Region(0, 0, table.size.width, table.size.height)))
            return app.results_markdown, screen

    text, screen = asyncio.run(results_screen())
    assert "ds (10% labels)" in screen and "‡" in screen  # drawn, not only computed
    row = next(line for line in text.splitlines() if line.startswith("| ds (10% labels)"))
    assert row.endswith("| 0.500‡ | 0.693‡† |")  # Model 2's accuracy and loss untrained; its loss no better than the prior's
    assert "‡ untrained (no verdict on any metric): selected step 0" in text and "ds 10% supervised (seed 0)" in text
    assert "constant test predictions" in text


def test_the_manifest_names_the_primary_metric(tmp_path):
    from runner.manifest import parse_manifest

    m = parse_manifest("name: x\ndatasets:\n  d: {source: synthetic}\nreport: {primary: loss}\n")
    assert m.report.primary == "loss" and R.primary_of("name: x\nreport: {primary: loss}\n") == "loss"
    assert R.primary_of("name: x\n") == "auroc"
    labels = np.r_[np.zeros(30, int), np.ones(30, int)]
    tasks = [_task(tmp_path, f"{m_}{s}", m_, k, s, two_class(np.where(labels == 1, p, 1 - p)), labels)
             for s in (0, 1) for m_, k, p in (("byol-finetune", "finetune", 0.8), ("supervised", "supervised", 0.6))]
    rep = R.build(tmp_path, "t", tasks, "ResNet18", bootstrap=200, primary="loss")
    d = rep["differences"][0]
    assert d["primary"] == "loss" and d["p_adjusted"] == d["loss"]["p"]
    assert "Verdict on loss" in tables.extended_markdown(rep)


def test_perfect_rankers_read_auroc_one_in_every_output(tmp_path):
    labels = np.r_[np.zeros(20, int), np.ones(20, int)]
    base = np.r_[np.linspace(0.0, 0.1, 20), np.linspace(0.15, 0.25, 20)]
    tasks = [_task(tmp_path, f"su{s}", "supervised", "supervised", s, two_class(base + 0.3 * s), labels, prior_loss=5.0)
             for s in range(3)]
    rep = R.build(tmp_path, "t", tasks, "ResNet18", bootstrap=100)
    assert rep["arms"][0]["auroc"]["mean"] == pytest.approx(1.0)
    assert rep["extended"][0]["auroc"]["value"] == pytest.approx(1.0)
    csv_row = tables.to_csv(rep).splitlines()[1].split(",")
    assert float(csv_row[8]) == pytest.approx(1.0)  # auroc_mean
    assert "| 1.000 [1.000, 1.000] |" in tables.extended_markdown(rep)


def test_did_pretraining_learn_is_answered_each_way(tmp_path):
    labels = np.r_[np.zeros(40, int), np.ones(40, int)]
    rng = np.random.default_rng(4)

    def probe(strength: float) -> np.ndarray:
        return two_class(np.clip(0.5 + strength * (labels - 0.5) + rng.normal(0, 0.1, 80), 0.01, 0.99))

    def run(folder: Path, byol: float, control: float) -> dict:
        tasks = []
        for s in (0, 1, 2):
            tasks.append(_task(folder, f"lin{s}", "byol-linear", "linear", s, probe(byol), labels, prior_loss=5.0))
            tasks.append(_task(folder, f"ctl{s}", "random-linear", "random-linear", s, probe(control), labels, prior_loss=5.0))
        pre = folder / "tasks" / "pre"
        pre.mkdir()
        (pre / "metrics.json").write_text(json.dumps({"task": "pre", "pretrain": {"steps": 120}}))
        tasks.append(TaskRow("pre", "pretrain", "ds", "byol-pretrain", 0, None, [], "done", None, None, None, None, None))
        return R.build(folder, "t", tasks, "ResNet18", bootstrap=400)

    learned = run(tmp_path / "a", byol=0.6, control=0.05)
    assert learned["pretraining_learned"][0]["decision"] == "model1"
    assert "Did pretraining learn? ds 10%: BYOL better than the random-init control" in tables.to_markdown(learned)
    not_learned = run(tmp_path / "b", byol=0.3, control=0.3)
    line = next(x for x in tables.to_markdown(not_learned).splitlines() if "Did pretraining learn?" in x)
    assert "inconclusive: BYOL was not shown to beat the random-init control" in line and "detectable |Δ| ≥" in line
    assert "120 optimizer steps" in line and "pretrain.epochs" in line
    lost = run(tmp_path / "c", byol=0.05, control=0.6)
    assert "the random-init control better than BYOL" in lost["pretraining_learned"][0]["verdict"]  # never "Model 2 better"


def test_every_pretraining_is_held_against_its_own_control_in_one_family(tmp_path):
    """BYOL and SimSiam probes against the random-init control, BYOL continued from ImageNet weights
    against the ImageNet features it started from (an untrained network would say nothing of it):
    one line each, named, Holm-adjusted together."""
    labels = np.r_[np.zeros(40, int), np.ones(40, int)]
    rng = np.random.default_rng(5)

    def probe(strength: float) -> np.ndarray:
        return two_class(np.clip(0.5 + strength * (labels - 0.5) + rng.normal(0, 0.1, 80), 0.01, 0.99))

    tasks = []
    kinds = {"byol-linear": "linear", "simsiam-linear": "linear", "byol-imagenet-linear": "linear",
             "random-linear": "random-linear", "imagenet-linear": "imagenet-linear"}
    for s in (0, 1, 2):
        for tid, method, strength in (("b", "byol-linear", 0.6), ("s", "simsiam-linear", 0.6), ("i", "byol-imagenet-linear", 0.6),
                                      ("c", "random-linear", 0.05), ("n", "imagenet-linear", 0.6)):
            tasks.append(_task(tmp_path, f"{tid}{s}", method, kinds[method], s, probe(strength), labels, prior_loss=5.0))
    rep = R.build(tmp_path, "t", tasks, "ResNet18", bootstrap=200)
    learned = rep["pretraining_learned"]
    assert [(d["method"], d["against"]) for d in learned] == [
        ("byol-linear", "random-linear"), ("byol-imagenet-linear", "imagenet-linear"), ("simsiam-linear", "random-linear")]
    assert all(d["comparisons"] == 3 for d in learned)
    lines = [x for x in tables.to_markdown(rep).splitlines() if "Did pretraining learn?" in x]
    assert len(lines) == 3 and ("random-init control" in lines[0] or "untrained network" in lines[0])
    assert "BYOL from ImageNet weights" in lines[1] and "the ImageNet features it started from" in lines[1]
    assert "SimSiam" in lines[2] and "ImageNet" not in lines[2]


def test_the_report_says_what_chose_and_where_nothing_could(tmp_path):
    labels = np.r_[np.zeros(30, int), np.ones(30, int)]
    t = _task(tmp_path, "su0", "supervised", "supervised", 0, two_class(np.where(labels == 1, 0.7, 0.3)), labels)
    m = json.loads((tmp_path / "tasks" / "su0" / "metrics.json").read_text())
    m |= {"validation": "budget", "selection": {"mode": "fixed schedule", "selected_step": 40, "steps": 40}}
    (tmp_path / "tasks" / "su0" / "metrics.json").write_text(json.dumps(m))
    md = tables.to_markdown(R.build(tmp_path, "t", [t], "ResNet18", bootstrap=0))
    assert "drawn at each budget's rate" in md and "Fixed schedule" in md and "ds 10% supervised" in md
    m["validation"] = "full"
    (tmp_path / "tasks" / "su0" / "metrics.json").write_text(json.dumps(m))
    md = tables.to_markdown(R.build(tmp_path, "t", [t], "ResNet18", bootstrap=0))
    assert "optimistic" in md and "labels.validation: full" in md


def test_the_manifest_chooses_model_1_and_model_2(tmp_path):
    import pytest as _pytest

    from runner.errors import ManifestError
    from runner.manifest import parse_manifest

    base = "name: x\ndatasets:\n  d: {source: synthetic}\nmethods: [byol-finetune, supervised, supervised-imagenet]\n"
    m = parse_manifest(base + "compare: {model2: supervised-imagenet}\n")
    assert (m.compare.model1, m.compare.model2) == (None, "supervised-imagenet")
    with _pytest.raises(ManifestError, match="compare.model1: 'byol-linear' is not one of the methods run"):
        parse_manifest(base + "compare: {model1: byol-linear}\n")
    with _pytest.raises(ManifestError, match="the same arm"):
        parse_manifest(base + "compare: {model1: supervised, model2: supervised}\n")
    labels = np.r_[np.zeros(30, int), np.ones(30, int)]
    tasks = [_task(tmp_path, f"{m_}{s}", m_, k, s, two_class(np.where(labels == 1, p, 1 - p)), labels)
             for s in (0, 1) for m_, k, p in (("byol-finetune", "finetune", 0.8), ("supervised", "supervised", 0.6),
                                              ("supervised-imagenet", "supervised-imagenet", 0.7))]
    rep = R.build(tmp_path, "t", tasks, "ResNet18", bootstrap=50, compare=(None, "supervised-imagenet"))
    assert (rep["model1_method"], rep["model2_method"]) == ("byol-finetune", "supervised-imagenet")
    assert rep["legend"]["model2"] == "supervised ResNet18 from ImageNet weights"
    assert rep["rows"][0]["model2_accuracy"]["mean"] == pytest.approx(rep["arms"][2]["accuracy"]["mean"])
    assert R.compare_of("compare: {model1: supervised}\n") == ("supervised", None)
    default = R.build(tmp_path, "t", tasks, "ResNet18", bootstrap=0)
    assert (default["model1_method"], default["model2_method"]) == ("byol-finetune", "supervised")


def test_stored_test_probabilities_keep_a_confident_miss_and_its_loss():
    """metrics.json's test probabilities feed the extended table's loss: a confident miss (1e-9 on the
    true class) must survive storage, not become 0 and cost -log(1e-12) = 27.6."""
    from runner.ml.metrics import stored_probs

    probs = np.array([[1 - 1e-9, 1e-9], [0.3, 0.7], [0.999999, 1e-6]])
    labels = np.array([1, 1, 0])
    kept = np.asarray(stored_probs(probs))
    assert kept[0, 1] > 0 and json.loads(json.dumps(stored_probs(probs))) == stored_probs(probs)
    true = -np.log(probs[np.arange(3), labels]).mean()
    assert abs(-np.log(kept[np.arange(3), labels]).mean() - true) < 1e-5


def test_the_report_pairs_each_seed_of_model_2_with_the_same_seed_of_model_1(tmp_path):
    """Seeds that differ a lot (a good and a bad label draw) but shift both models alike: paired by seed
    the difference is tight; paired any other way it would not be. The report's Δ is the seed-paired one."""
    rng = np.random.default_rng(6)
    labels = np.r_[np.zeros(40, int), np.ones(40, int)]
    noise = rng.normal(0, 0.1, 80)
    tasks, m1, m2 = [], [], []
    for s, strength in zip((0, 1, 2, 3), (0.1, 0.5, 0.2, 0.4)):  # the seed's label draw
        p1 = two_class(np.clip(0.5 + (strength + 0.05) * (labels - 0.5) + noise, 0.01, 0.99))
        p2 = two_class(np.clip(0.5 + strength * (labels - 0.5) + noise, 0.01, 0.99))
        tasks += [_task(tmp_path, f"ft{s}", "byol-finetune", "finetune", s, p1, labels),
                  _task(tmp_path, f"su{s}", "supervised", "supervised", s, p2, labels)]
        m1.append((p1, labels))
        m2.append((p2, labels))
    tasks.reverse()  # the order the store lists tasks in must not matter
    d = R.build(tmp_path, "t", tasks, "ResNet18", bootstrap=200)["differences"][0]["auroc"]
    paired = paired_difference(m1, m2, positive=1, b=200)["auroc"]
    crossed = paired_difference(m1, m2[::-1], positive=1, b=200)["auroc"]
    assert d["per_seed"] == pytest.approx(paired["per_seed"]) and d["se"] == pytest.approx(paired["se"])
    assert crossed["se"] > 3 * paired["se"]  # what a wrong pairing would have shown


def test_the_readme_table_takes_each_column_from_its_own_arm(tmp_path):
    """Model 1 and Model 2 at clearly different accuracies and losses: each README cell is its arm's mean."""
    labels = np.r_[np.zeros(30, int), np.ones(30, int)]
    tasks = [_task(tmp_path, f"{m}{s}", m, k, s, two_class(np.where(labels == 1, p, 1 - p)), labels, prior_loss=5.0)
             for s in (0, 1) for m, k, p in (("byol-finetune", "finetune", 0.9), ("supervised", "supervised", 0.6))]
    rep = R.build(tmp_path, "t", tasks, "ResNet18", bootstrap=0)
    arms = {a["method"]: a for a in rep["arms"]}
    row = next(line for line in tables.to_markdown(rep).splitlines() if line.startswith("| ds (10% labels)"))
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    want = [arms["byol-finetune"]["accuracy"], arms["byol-finetune"]["loss"], arms["supervised"]["accuracy"], arms["supervised"]["loss"]]
    assert [float(c.split()[0]) for c in cells] == [pytest.approx(w["mean"], abs=5e-4) for w in want]
    assert want[1]["mean"] < want[3]["mean"] - 0.2  # Model 1's loss (p = 0.9) is far below Model 2's (p = 0.6)


def test_the_run_prints_an_equivalence_verdict_and_what_it_could_detect(tmp_path):
    """Two seeds of two arms that rank the test images alike: with compare.margin 0.05 the printed
    line says "equivalent within ±0.05" and the smallest difference the run could have detected."""
    rng = np.random.default_rng(7)
    labels = np.r_[np.zeros(60, int), np.ones(60, int)]
    tasks = []
    for s in (0, 1):
        p = np.clip(0.5 + 0.6 * (labels - 0.5) + rng.normal(0, 0.15, 120), 0.01, 0.99)
        tasks += [_task(tmp_path, f"ft{s}", "byol-finetune", "finetune", s, two_class(p), labels, prior_loss=5.0),
                  _task(tmp_path, f"su{s}", "supervised", "supervised", s, two_class(np.clip(p + 0.001, 0.01, 0.99)), labels,
                        prior_loss=5.0)]
    rep = R.build(tmp_path, "t", tasks, "ResNet18", bootstrap=300, margin=0.05)
    (line,) = tables.verdict_lines(rep)
    assert line.startswith("ds 10%: equivalent within ±0.05 (Δ AUROC 0.000") and "2 seeds" in line and "detectable |Δ| ≥ 0.0" in line
    wide = R.build(tmp_path, "t", tasks, "ResNet18", bootstrap=300)  # no margin: never "equivalent"
    assert wide["differences"][0]["verdict"] == "inconclusive" and "no margin was set" in tables.extended_markdown(wide)


def test_an_inconclusive_verdict_says_whether_seeds_or_only_a_larger_test_split_would_resolve_the_margin():
    """'more seeds' is advice only when seeds can reach the margin: where the test sample's own error
    (which every seed shares) is too large, the verdict says no number of seeds would."""
    from runner.verdicts import verdict_text

    base = {"decision": "inconclusive", "margin": 0.03, "primary": "auroc", "seeds": 5, "comparisons": 7, "family": "internal"}
    seeds_short = dict(base, detectable=0.05, auroc={"value": 0.0, "se_seeds": 0.015, "se_test": 0.002})
    test_short = dict(base, detectable=0.12, auroc={"value": 0.0, "se_seeds": 0.015, "se_test": 0.029})
    text = verdict_text(seeds_short, {})
    n = int(text.split("about ")[1].split(" seeds")[0])
    assert text.startswith("inconclusive (this run could not resolve the margin ±0.03; about ") and 5 < n <= 50
    assert verdict_text(test_short, {}) == ("inconclusive (the margin ±0.03 is beyond this run and any number of seeds: "
                                             "the test split is too small)")
    assert verdict_text(dict(base, detectable=0.02, auroc={}), {}) == "inconclusive"  # it could have: no advice
