"""Test metrics across seeds with 95% intervals, the paired Model 1 − Model 2 difference, its power,
and the run's verdicts adjusted for the number of comparisons.

Every seed of an arm scores the same test images (the split seed is fixed; the seeds vary the
labeled subset and the training). So a result varies along two crossed axes: the seed (which labels
were drawn, how training went) and the test sample (which patients happened to be in test). The
point estimate of a metric is the mean over seeds of that seed's metric: rank metrics (AUROC) are
computed per seed and never over pooled seeds, whose scores need not share a scale.

The standard error adds two independent parts: the seeds' (the sample variance of the per-seed
values over S, with S − 1 degrees of freedom: seed effects and each seed's own test-sample noise) and
the test-sample error all seeds share (from a cluster bootstrap of the test units, seeds held fixed:
patients where the data set names them, images otherwise; Field & Welsh 2007, "Bootstrapping
clustered data", JRSS B 69:369-390; `combine` says how the shared part is separated, and its G − 1
degrees of freedom for G units). The interval is mean ± t × SE with Welch–Satterthwaite degrees of
freedom (Satterthwaite 1946,
"An approximate distribution of estimates of variance components", Biometrics Bulletin 2:110-114):
with few seeds whose disagreement dominates, that is Student's t with S − 1 degrees of freedom,
which keeps its coverage at 3 seeds where a bootstrap over seeds does not (its variance shrinks by
(S − 1)/S and 3 seeds allow 10 distinct draws); where the test sample dominates it tends to the
normal interval of the cluster bootstrap. `bench/coverage.py` shows the coverage by simulation
through this module. A proportion whose estimate is exactly 0 or 1 gets the exact (Clopper–Pearson)
interval of its units instead of a zero-width one.

The paired difference uses the same bootstrap draws for both models and pairs seeds by seed (the
same label draw), so what the two share cancels. Its p-value comes from the same t statistic (no
bootstrap floor: a family of any size can decide). Verdicts (`decide`): the two-sided test that the
difference is 0, Holm-adjusted over the run's comparisons (Holm 1979, "A simple sequentially
rejective multiple test procedure", Scand. J. Statist. 6:65-70); with an equivalence margin m, two
one-sided tests that it lies within ±m (TOST, Schuirmann 1987, J. Pharmacokinet. Biopharm.
15:657-680) and the one-sided test that Model 1 is not worse than −m, each Holm-adjusted over the
same family. Each comparison states the smallest difference it could detect (80% power, at the
family's strictest Holm level α/m, exact under the noncentral t).
"""

from __future__ import annotations

import math

import numpy as np

from runner.scoring import seed_metrics

METRICS = ("accuracy", "loss", "auroc", "auprc", "balanced_accuracy", "sensitivity", "specificity", "sensitivity_op",
           "specificity_op", "brier", "ece")
LOWER_IS_BETTER = {"loss", "brier", "ece"}
LOSS_TYPE = {"loss", "brier", "ece"}  # what calibration changes: a miscalibrated cell blocks verdicts on these only
PROPORTIONS = {"accuracy": None, "sensitivity": "pos", "specificity": "neg", "sensitivity_op": "pos", "specificity_op": "neg"}
ALPHA = 0.05
POWER = 0.8


def stack(per_seed: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(S, N, K) probabilities and the (N,) labels shared by every seed's test predictions."""
    labels = np.asarray(per_seed[0][1])
    for _, y in per_seed[1:]:
        if len(y) != len(labels) or not np.array_equal(np.asarray(y), labels):
            raise ValueError("the seeds' test splits differ: they cannot be paired image by image")
    return np.stack([np.asarray(p, dtype=np.float64) for p, _ in per_seed]), labels


def group_index(groups: list | np.ndarray | None, n: int) -> np.ndarray:
    """Each image's group number 0..G-1; every image its own group when there are none."""
    if groups is None:
        return np.arange(n)
    if len(groups) != n:
        raise ValueError(f"{len(groups)} group ids for {n} test images")
    return np.unique(np.asarray(groups, dtype=str), return_inverse=True)[1]


def image_weights(groups: np.ndarray, b: int, seed: int) -> np.ndarray:
    """(B + 1, N): row 0 all ones (the test split as it is), then B cluster-bootstrap draws of the
    test units (each unit's count given to all its images)."""
    rng = np.random.default_rng(seed)
    g = int(groups.max()) + 1 if len(groups) else 0
    counts = rng.multinomial(g, np.full(g, 1.0 / g), size=b).astype(np.float64) if b and g else np.zeros((0, g))
    return np.vstack([np.ones((1, len(groups))), counts[:, groups]])


def per_seed_values(probs: np.ndarray, labels: np.ndarray, w: np.ndarray, positive: int | None,
                    thresholds: list[float | None] | None = None) -> dict[str, np.ndarray]:
    """{metric: (S, B+1)}: each seed's metric under each weighting of the images; a metric some seed
    lacks (an operating point without a threshold) is left out."""
    thresholds = thresholds or [None] * len(probs)
    per = [seed_metrics(p, labels, w, positive, t) for p, t in zip(probs, thresholds)]
    return {m: np.stack([d[m] for d in per]) for m in per[0] if all(m in d for d in per)}


# ---- the t distribution (scipy.special: scipy.stats would cost every report 1-2 s to import) ------


def t_cdf(x: float, df: float) -> float:
    from scipy.special import ndtr, stdtr

    return float(ndtr(x) if math.isinf(df) else stdtr(df, x))


def t_quantile(p: float, df: float) -> float:
    from scipy.special import ndtri, stdtrit

    return float(ndtri(p) if math.isinf(df) else stdtrit(df, p))


def _power(nc: float, df: float, crit: float, nodes: int = 4000) -> float:
    """P(|T| > crit) for T noncentral t (df, nc): the normal CDF averaged over the chi-square's quantiles
    (scipy.special.nctdtr returns NaN for nc ≥ 7 at small df)."""
    from scipy.special import chdtri, ndtr

    if math.isinf(df):
        return float(1 - ndtr(crit - nc) + ndtr(-crit - nc))
    scale = crit * np.sqrt(chdtri(df, (np.arange(nodes) + 0.5) / nodes) / df)
    return float(np.mean(ndtr(nc - scale) + ndtr(-nc - scale)))


def detectable(se: float | None, df: float, alpha: float = ALPHA, power: float = POWER) -> float | None:
    """The smallest |difference| a two-sided t test at level `alpha` detects with probability `power`
    (the noncentral t; Cohen 1988, "Statistical Power Analysis", ch. 2)."""
    if se is None or not math.isfinite(se):
        return None
    if se == 0:
        return 0.0
    crit = t_quantile(1 - alpha / 2, df)
    lo, hi = 0.0, crit + 10.0
    while _power(hi, df, crit) < power:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _power(mid, df, crit) < power else (lo, mid)
    return float(hi * se)


# ---- estimates -------------------------------------------------------------------------------------


def combine(values: np.ndarray, units: int | None = None) -> dict:
    """An estimate from (S, B+1) per-seed values (column 0: the test split as it is; the rest:
    cluster-bootstrap replicates, seeds fixed): the mean over seeds, its SE and t interval.

    Each seed's value is δ + u_s + c + d_s: its seed effect u_s, a test-sample error c that every seed
    shares (the same images are hard for all of them) and one d_s that is its own. The per-seed sample
    variance s² estimates Var(u + d) with S − 1 degrees of freedom; the bootstrap gives C, the variance
    of the seed mean, and D, a single seed's (their mean), whence the shared part Var(c) = (S·C − D) /
    (S − 1). Var(mean) = s²/S + Var(c), the two parts independent, so Welch–Satterthwaite's degrees of
    freedom apply to it: S − 1 for the first, G − 1 for the second when the bootstrap resampled G
    units (`units`; its variance is scaled by G / (G − 1), the bootstrap's bias for a mean). (Adding C
    whole would count the seeds' own test noise twice and give the degrees of freedom of a variance
    that is not there.)"""
    per_seed = values[:, 0]
    out = {"value": None, "ci": None, "se": None, "df": None, "se_seeds": None, "se_test": None,
           "per_seed": [_num(v) for v in per_seed]}
    if not np.isfinite(per_seed).all():
        return out
    s = len(per_seed)
    out["value"] = float(per_seed.mean())
    reps = values[:, 1:]
    reps = reps[:, np.isfinite(reps).all(0)]
    c = float(reps.mean(0).var(ddof=1)) if reps.shape[1] >= 10 else None
    d = float(reps.var(axis=1, ddof=1).mean()) if reps.shape[1] >= 10 else None
    v_seed = float(per_seed.var(ddof=1)) / s if s >= 2 else None
    if v_seed is None and c is None:
        return out
    shared = None if c is None else (c if s < 2 else max(0.0, (s * c - d) / (s - 1)))
    if shared is not None and units and units > 1:
        shared *= units / (units - 1)
    var = (v_seed or 0.0) + (shared or 0.0)
    parts = (v_seed ** 2 / (s - 1) if v_seed else 0.0) + (shared ** 2 / (units - 1) if shared and units and units > 1 else 0.0)
    df = var ** 2 / parts if parts > 0 else math.inf
    se = math.sqrt(var)
    half = t_quantile(1 - ALPHA / 2, df) * se
    out.update(ci=(out["value"] - half, out["value"] + half), se=se, df=df,
               se_seeds=None if v_seed is None else math.sqrt(v_seed), se_test=None if shared is None else math.sqrt(shared))
    return out


def clopper_pearson(x: int, n: int, alpha: float = ALPHA) -> tuple[float, float]:
    """The exact binomial interval of x successes in n (Clopper & Pearson 1934, Biometrika 26:404-413)."""
    from scipy.special import betaincinv

    lo = 0.0 if x == 0 else float(betaincinv(x, n - x + 1, alpha / 2))
    hi = 1.0 if x == n else float(betaincinv(x + 1, n - x, 1 - alpha / 2))
    return lo, hi


def _units_of(metric: str, labels: np.ndarray, groups: np.ndarray, positive: int | None) -> int:
    """How many test units a proportion counts: all of them, or those of the positive or negative class."""
    side = PROPORTIONS[metric]
    pos = 1 if positive is None else positive
    keep = np.ones(len(labels), bool) if side is None else (labels == pos) if side == "pos" else (labels != pos)
    return len(np.unique(groups[keep]))


def bootstrap_metrics(per_seed: list[tuple[np.ndarray, np.ndarray]], positive: int | None, b: int = 1000, seed: int = 0,
                      groups: list | np.ndarray | None = None, thresholds: list[float | None] | None = None) -> dict:
    """{metric: {"value": mean over seeds of the seed's metric, "ci": (lo, hi) or None, "se", "df",
    "per_seed"}} with the seeds' and the test units' variation (see the module's doc)."""
    probs, labels = stack(per_seed)
    gi = group_index(groups, len(labels))
    values = per_seed_values(probs, labels, image_weights(gi, b, seed), positive, thresholds)
    out = {}
    for m, v in values.items():
        est = combine(v, int(gi.max()) + 1)
        if m in PROPORTIONS and est["value"] is not None and est["value"] in (0.0, 1.0):
            n = _units_of(m, labels, gi, positive)
            est["ci"] = clopper_pearson(int(round(est["value"] * n)), n) if n else None
            est["exact"] = True
        elif est["ci"] is not None and (m in PROPORTIONS or m in ("auroc", "auprc", "balanced_accuracy", "brier", "ece")):
            est["ci"] = (max(0.0, est["ci"][0]), min(1.0, est["ci"][1]))
        out[m] = est
    return out


def paired_difference(model1: list[tuple[np.ndarray, np.ndarray]], model2: list[tuple[np.ndarray, np.ndarray]],
                      positive: int | None, b: int = 1000, seed: int = 0, groups: list | np.ndarray | None = None,
                      groups2: list | np.ndarray | None = None, thresholds1: list | None = None,
                      thresholds2: list | None = None) -> dict:
    """{metric: Model 1 − Model 2 as `combine` gives it, plus "p" (two-sided, that it is 0)}; the i-th
    seed of one model is paired with the i-th of the other, and both use the same bootstrap draws."""
    p1, y1 = stack(model1)
    p2, y2 = stack(model2)
    if not np.array_equal(y1, y2) or len(p1) != len(p2):
        raise ValueError("the two models were not scored on the same seeds and test images")
    if groups2 is not None and (groups is None or not np.array_equal(np.asarray(groups, dtype=str), np.asarray(groups2, dtype=str))):
        raise ValueError("the two models' test groups differ: they cannot be paired")
    gi = group_index(groups, len(y1))
    w = image_weights(gi, b, seed)
    a, c = per_seed_values(p1, y1, w, positive, thresholds1), per_seed_values(p2, y2, w, positive, thresholds2)
    out = {}
    for m in a:
        if m in c:
            est = combine(a[m] - c[m], int(gi.max()) + 1)
            est["p"] = p_zero(est)
            out[m] = est
    return out


def p_zero(est: dict) -> float | None:
    """Two-sided p that the difference is 0; None without an interval or with one seed (a single seed
    never yields a difference: training and label-draw variation are not in its SE)."""
    if est.get("se") is None or est.get("value") is None or len([v for v in est["per_seed"] if v is not None]) < 2:
        return None
    if est["se"] == 0:
        return 0.0 if abs(est["value"]) > 1e-12 else 1.0
    return float(min(1.0, 2 * (1 - t_cdf(abs(est["value"]) / est["se"], est["df"]))))


def one_sided_p(est: dict, bound: float, above: bool) -> float | None:
    """p of H0: difference ≤ bound (above=True) or ≥ bound (above=False), by the same t statistic."""
    if p_zero(est) is None:
        return None
    if est["se"] == 0:
        return 0.0 if (est["value"] > bound if above else est["value"] < bound) else 1.0
    t = (est["value"] - bound) / est["se"]
    return float(1 - t_cdf(t, est["df"])) if above else float(t_cdf(t, est["df"]))


def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (None stays None and does not count as a comparison)."""
    idx = [i for i, p in enumerate(p_values) if p is not None]
    m = len(idx)
    out: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        out[i] = running
    return out


def _oriented(est: dict, metric: str) -> dict:
    """The estimate with its sign turned so that positive means Model 1 is better."""
    if metric not in LOWER_IS_BETTER or est.get("value") is None:
        return est
    return {**est, "value": -est["value"], "per_seed": [None if v is None else -v for v in est["per_seed"]]}


def decide(estimates: list[dict], metric: str, margin: float | None = None, blocked: list[str | None] | None = None) -> list[dict]:
    """The verdict of each comparison of a family, on `metric`: "model1" or "model2" (better), and
    with a margin m, "equivalent" (within ±m, TOST) or "not_worse" (Model 1 not worse than −m);
    else "inconclusive"; "not_decided" where `blocked` gives a reason or the estimate cannot be
    tested. Every test is Holm-adjusted over the family's comparisons that have an estimate, the
    blocked ones included (as never rejected); each comparison gets the smallest difference detectable
    at the strictest Holm level (α / k, k comparisons) with 80% power."""
    blocked = blocked or [None] * len(estimates)
    oriented = [_oriented(e, metric) for e in estimates]
    testable = [b is None and p_zero(e) is not None for e, b in zip(oriented, blocked)]
    # a comparison blocked by a flag still counts in the family (as p = 1, never rejected): the flags
    # read test results (an untrained cell's test AUROC), and a family sized after them would not hold
    # its error rate; one without an estimate (one seed) is not a test at all
    counted = [p_zero(e) is not None for e in oriented]
    pick = lambda ps: [a if t else None for a, t in zip(  # noqa: E731
        holm([(p if t else 1.0) if c else None for p, t, c in zip(ps, testable, counted)]), testable)]
    p_diff = pick([p_zero(e) for e in oriented])
    p_eq = p_ni = [None] * len(oriented)
    if margin:
        p_eq = pick([None if p_zero(e) is None else max(one_sided_p(e, -margin, True), one_sided_p(e, margin, False))
                     for e in oriented])
        p_ni = pick([one_sided_p(e, -margin, True) for e in oriented])
    family = sum(counted)
    out = []
    for i, e in enumerate(oriented):
        d = {"p_adjusted": p_diff[i], "p_equivalence": p_eq[i], "p_not_worse": p_ni[i], "comparisons": family, "margin": margin,
             "detectable": detectable(e.get("se"), e.get("df") or math.inf, ALPHA / max(family, 1)) if testable[i] else None}
        if not testable[i]:
            d["decision"], d["reason"] = "not_decided", blocked[i] or "one seed (training and label-draw variation not covered)"
        elif p_diff[i] < ALPHA:
            d["decision"] = "model1" if e["value"] > 0 else "model2"
        elif margin and p_eq[i] < ALPHA:
            d["decision"] = "equivalent"
        elif margin and p_ni[i] < ALPHA:
            d["decision"] = "not_worse"
        else:
            d["decision"] = "inconclusive"
        out.append(d)
    return out


def seeds_needed(margin: float, seed_sd: float, test_se: float = 0.0, comparisons: int = 1, most: int = 50) -> int | None:
    """The fewest seeds with which a difference of `margin` is detectable (80% power, level α / comparisons),
    given the per-seed difference's SD and the test sample's SE of it; None when no number of seeds up to
    `most` reaches it (the test split's own variation is too large: a larger test split would)."""
    for s in range(2, most + 1):
        v_seed = seed_sd ** 2 / s
        var = v_seed + test_se ** 2
        df = math.inf if v_seed == 0 else var ** 2 / (v_seed ** 2 / (s - 1))
        mdd = detectable(math.sqrt(var), df, ALPHA / max(comparisons, 1))
        if mdd is not None and mdd <= margin:
            return s
    return None


def _num(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None
