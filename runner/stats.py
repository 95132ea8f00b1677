"""Test metrics across seeds with bootstrap 95% intervals, the paired Model 1 − Model 2 difference, and
the run's verdicts adjusted for the number of comparisons.

Every seed of an arm scores the same test images (the split seed is fixed; the seeds vary the
labeled subset and the training). So a result varies along two crossed axes: the seed (which labels
were drawn, how training went) and the test sample (which patients happened to be in test). The
point estimate of a metric is the mean over seeds of that seed's metric: rank metrics (AUROC) are
computed per seed and never over pooled seeds, whose scores need not share a scale.

The interval resamples both axes at once, the "pigeonhole" bootstrap of a crossed design (Owen 2007,
"The pigeonhole bootstrap", Ann. Appl. Stat. 1(2):386-411): a replicate draws S seeds with
replacement and, independently, the test split's G groups (patients where the data set names them,
images otherwise; a cluster bootstrap, Field & Welsh 2007) with replacement, and takes the mean over
the drawn seeds of each seed's metric on the drawn groups. With one seed only the test-sample axis
is resampled, and training and label-draw variation are in no interval: the report says so and
decides no difference on one seed.

The paired difference uses the same draws for both models (seeds paired by seed: the same label
draw), so what the two share cancels. Its two-sided bootstrap p-value, twice the smaller share of
replicates on either side of 0, is adjusted over the run's comparisons with Holm's step-down method
(Holm 1979, "A simple sequentially rejective multiple test procedure", Scand. J. Statist. 6:65-70).
Intervals are percentile intervals of B replicates; a replicate where a metric is undefined (one
class drawn, for AUROC) is left out of that metric's interval.
"""

from __future__ import annotations

import numpy as np

METRICS = ("accuracy", "loss", "auroc", "balanced_accuracy", "sensitivity", "specificity")
LOWER_IS_BETTER = {"loss"}
ALPHA = 0.05


def stack(per_seed: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(S, N, K) probabilities and the (N,) labels shared by every seed's test predictions."""
    labels = np.asarray(per_seed[0][1])
    for _, y in per_seed[1:]:
        if len(y) != len(labels) or not np.array_equal(np.asarray(y), labels):
            raise ValueError("the seeds' test splits differ: they cannot be paired image by image")
    return np.stack([np.asarray(p, dtype=np.float64) for p, _ in per_seed]), labels


def auroc_weighted(scores: np.ndarray, is_pos: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUROC (ties count half) of one set of scores under B weightings at once: w is (B, M).

    The Mann-Whitney form: for every positive, the weight of the negatives scored below it plus
    half of those tied with it, over the product of the total weights. Sorted once for all B."""
    order = np.argsort(scores, kind="mergesort")
    s, pos, wt = scores[order], is_pos[order], w[:, order]
    starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]  # groups of tied scores
    gp = np.add.reduceat(wt * pos, starts, axis=1)
    gn = np.add.reduceat(wt * ~pos, starts, axis=1)
    below = np.cumsum(gn, axis=1) - gn
    with np.errstate(invalid="ignore", divide="ignore"):
        return (gp * (below + 0.5 * gn)).sum(1) / (gp.sum(1) * gn.sum(1))


def seed_metrics(probs: np.ndarray, labels: np.ndarray, w: np.ndarray, positive: int | None) -> dict[str, np.ndarray]:
    """Metrics of ONE seed's (N, K) predictions under B weightings of its images (w: (B, N) counts)."""
    n, k = probs.shape
    pred = probs.argmax(-1)
    correct = (pred == labels).astype(np.float64)
    p_true = np.clip(probs[np.arange(n), labels], 1e-12, 1)
    total = w.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {"accuracy": w @ correct / total, "loss": w @ -np.log(p_true) / total}
        recalls = [w @ (correct * (labels == c)) / (w @ (labels == c).astype(np.float64)) for c in range(k)]
        out["balanced_accuracy"] = np.nanmean(np.stack(recalls), axis=0)
        if k == 2:
            pos = 1 if positive is None else positive
            out["auroc"] = auroc_weighted(probs[:, pos], labels == pos, w)
            out["sensitivity"], out["specificity"] = recalls[pos], recalls[1 - pos]
        else:  # one-vs-rest, macro average over the classes (as sklearn's multi_class="ovr")
            out["auroc"] = np.mean([auroc_weighted(probs[:, c], labels == c, w) for c in range(k)], axis=0)
    return out


def _group_index(groups: list | np.ndarray | None, n: int) -> np.ndarray:
    """Each image's group number 0..G-1; every image its own group when there are none."""
    if groups is None:
        return np.arange(n)
    if len(groups) != n:
        raise ValueError(f"{len(groups)} group ids for {n} test images")
    return np.unique(np.asarray(groups, dtype=str), return_inverse=True)[1]


class Draws:
    """B bootstrap replicates of a crossed design: seed counts (B, S) and image weights (B, N), the
    latter from group counts. Replicate 0 of `with_point()` is the point estimate (all ones)."""

    def __init__(self, n_seeds: int, groups: np.ndarray, b: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        g = int(groups.max()) + 1 if len(groups) else 0
        self.group_counts = rng.multinomial(g, np.full(g, 1.0 / g), size=b).astype(np.float64) if b else np.zeros((0, g))
        self.images = self.group_counts[:, groups]
        if n_seeds > 1 and b:
            self.seeds = rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=b).astype(np.float64)
        else:
            self.seeds = np.ones((b, n_seeds))

    def with_point(self) -> tuple[np.ndarray, np.ndarray]:
        """(seed weights, image weights) with the all-ones point estimate as row 0."""
        s, n = self.seeds.shape[1], self.images.shape[1]
        return np.vstack([np.ones((1, s)), self.seeds]), np.vstack([np.ones((1, n)), self.images])


def _per_seed(probs: np.ndarray, labels: np.ndarray, w: np.ndarray, positive: int | None) -> dict[str, np.ndarray]:
    """{metric: (S, B+1)}: each seed's metric under each weighting of the images."""
    per = [seed_metrics(p, labels, w, positive) for p in probs]
    return {m: np.stack([d[m] for d in per]) for m in per[0]}


def _over_seeds(values: np.ndarray, seed_w: np.ndarray) -> np.ndarray:
    """(B+1,) the seed-weighted mean of (S, B+1) per-seed values; NaN where a drawn seed has none."""
    drawn = seed_w.T > 0  # an undrawn seed's NaN must not spoil the mean
    with np.errstate(invalid="ignore"):
        return np.where(drawn, seed_w.T * values, 0.0).sum(0) / seed_w.sum(1)


def _interval(values: np.ndarray) -> tuple[float, float] | None:
    v = values[np.isfinite(values)]
    if len(v) < 10:
        return None
    lo, hi = np.percentile(v, [2.5, 97.5])
    return float(lo), float(hi)


def bootstrap_metrics(per_seed: list[tuple[np.ndarray, np.ndarray]], positive: int | None, b: int = 1000, seed: int = 0,
                      groups: list | np.ndarray | None = None) -> dict:
    """{metric: {"value": mean over seeds of the seed's metric, "ci": (lo, hi) or None,
    "per_seed": [each seed's value]}}, resampling seeds and test groups (see the module's doc)."""
    probs, labels = stack(per_seed)
    draws = Draws(len(probs), _group_index(groups, len(labels)), b, seed)
    seed_w, image_w = draws.with_point()
    per = _per_seed(probs, labels, image_w, positive)
    out = {}
    for m, values in per.items():
        est = _over_seeds(values, seed_w)
        out[m] = {"value": _num(est[0]), "ci": _interval(est[1:]), "per_seed": [_num(v) for v in values[:, 0]]}
    return out


def paired_difference(model1: list[tuple[np.ndarray, np.ndarray]], model2: list[tuple[np.ndarray, np.ndarray]],
                      positive: int | None, b: int = 1000, seed: int = 0, groups: list | np.ndarray | None = None,
                      groups2: list | np.ndarray | None = None) -> dict:
    """{metric: {"value": Model 1 − Model 2, "ci", "p": two-sided bootstrap p-value}}; the i-th seed of
    one model is paired with the i-th of the other, and both use the same draws of seeds and groups."""
    p1, y1 = stack(model1)
    p2, y2 = stack(model2)
    if not np.array_equal(y1, y2) or len(p1) != len(p2):
        raise ValueError("the two models were not scored on the same seeds and test images")
    if groups2 is not None and (groups is None or not np.array_equal(np.asarray(groups, dtype=str), np.asarray(groups2, dtype=str))):
        raise ValueError("the two models' test groups differ: they cannot be paired")
    draws = Draws(len(p1), _group_index(groups, len(y1)), b, seed)
    seed_w, image_w = draws.with_point()
    a, c = _per_seed(p1, y1, image_w, positive), _per_seed(p2, y2, image_w, positive)
    out = {}
    for m in a:
        d = _over_seeds(a[m] - c[m], seed_w)
        per_seed = [_num(x) for x in (a[m] - c[m])[:, 0]]
        p_boot, p_seeds = _p_value(d[1:]), seed_t_test(per_seed)
        # a difference must stand out from the test sample's variation (bootstrap) AND from the seeds'
        # (t-test on the per-seed differences): the larger p is an intersection-union test of both
        p = None if p_boot is None or p_seeds is None else max(p_boot, p_seeds)
        out[m] = {"value": _num(d[0]), "ci": _interval(d[1:]), "per_seed": per_seed, "p_bootstrap": p_boot,
                  "p_seeds": p_seeds, "p": p}
    return out


def _p_value(reps: np.ndarray) -> float | None:
    """Two-sided: twice the smaller share of replicates at or beyond 0 on either side, counted as
    (1 + k) / (B + 1) so that it is never 0 (Davison & Hinkley 1997, ch. 4); at most 1."""
    v = reps[np.isfinite(reps)]
    if len(v) < 10:
        return None
    k = min(int((v <= 0).sum()), int((v >= 0).sum()))
    return float(min(1.0, 2 * (1 + k) / (len(v) + 1)))


def seed_t_test(per_seed: list[float | None]) -> float | None:
    """Two-sided p of a one-sample t-test that the mean per-seed difference is 0: the seed-to-seed
    variation alone, which a bootstrap over 2-5 seeds underestimates (its variance shrinks by (S-1)/S
    and S seeds allow few distinct draws). None under two seeds."""
    from scipy.special import stdtr  # Student's t CDF; scipy.stats would cost every report 1-2 s to import

    d = np.asarray([x for x in per_seed if x is not None], dtype=np.float64)
    if len(d) < 2:
        return None
    if np.ptp(d) <= 1e-9 * max(1.0, float(np.abs(d).max())):  # no spread: the t statistic is undefined
        return 0.0 if abs(d[0]) > 1e-12 else 1.0
    t = d.mean() / (d.std(ddof=1) / np.sqrt(len(d)))
    return float(min(1.0, 2.0 * stdtr(len(d) - 1, -abs(t))))


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


def verdict(diff: dict | None, adjusted_p: float | None, seeds: int, metric: str, degenerate: tuple[bool, bool] = (False, False)) -> str:
    """One line a reader can act on, for Model 1 − Model 2 on the primary metric. `degenerate`: whether
    Model 1's and Model 2's cells are degenerate; a degenerate cell never wins, and a win over one is
    marked."""
    if diff is None or diff.get("value") is None:
        return "not decided: no paired result"
    if seeds < 2:
        return "not decided: one seed (training and label-draw variation not covered)"
    if adjusted_p is None:
        return "not decided: too few bootstrap replicates"
    if adjusted_p >= ALPHA:
        return "no difference detected" + (" († a degenerate cell)" if any(degenerate) else "")
    better = diff["value"] < 0 if metric in LOWER_IS_BETTER else diff["value"] > 0
    winner, loser = (0, 1) if better else (1, 0)
    if degenerate[winner]:
        return "not decided: the better-looking cell is degenerate (see its footnote)"
    return ("Model 1 better" if better else "Model 2 better") + (" (over a degenerate cell †)" if degenerate[loser] else "")


def _num(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None
