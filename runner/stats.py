"""Pooled test metrics with bootstrap 95% intervals, and the paired Model 1 − Model 2 difference.

Each seed scores the same test images (the split seed is fixed; the seeds vary the labeled subset
and the training), so the unit of resampling is a test image: a bootstrap replicate draws N images
with replacement and pools every seed's prediction for each drawn image (a cluster bootstrap;
Efron & Tibshirani 1993). The paired difference draws the same images for both models, so the
variation shared by the two (hard images) cancels out of the interval. Intervals are percentile
intervals of B replicates; a replicate where a metric is undefined (one class drawn, for AUROC)
is left out of that metric's interval.
"""

from __future__ import annotations

import numpy as np

METRICS = ("accuracy", "loss", "auroc", "balanced_accuracy", "sensitivity", "specificity")


def stack(per_seed: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(S, N, K) probabilities and the (N,) labels shared by every seed's test predictions."""
    labels = np.asarray(per_seed[0][1])
    for _, y in per_seed[1:]:
        if len(y) != len(labels) or not np.array_equal(np.asarray(y), labels):
            raise ValueError("the seeds' test splits differ: they cannot be pooled image by image")
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


def _weighted(probs: np.ndarray, labels: np.ndarray, w: np.ndarray, positive: int | None) -> dict[str, np.ndarray]:
    """Metrics of (S, N, K) predictions under B weightings of the images (w: (B, N) counts)."""
    s, n, k = probs.shape
    pred = probs.argmax(-1)  # (S, N)
    correct = (pred == labels[None]).sum(0).astype(np.float64)  # per image, summed over seeds
    p_true = np.clip(np.take_along_axis(probs, np.broadcast_to(labels[None, :, None], (s, n, 1)), -1)[..., 0], 1e-12, 1)
    total = w.sum(1) * s
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {"accuracy": w @ correct / total, "loss": w @ (-np.log(p_true)).sum(0) / total}
        recalls = [w @ (correct * (labels == c)) / (s * (w @ (labels == c).astype(np.float64))) for c in range(k)]
        out["balanced_accuracy"] = np.nanmean(np.stack(recalls), axis=0)
        ws = np.tile(w, (1, s))  # (B, S*N): pooled (seed, image) pairs share their image's weight
        ys = np.tile(labels, s)
        if k == 2:
            pos = 1 if positive is None else positive
            out["auroc"] = auroc_weighted(probs[..., pos].reshape(-1), ys == pos, ws)
            is_pos = (labels == pos).astype(np.float64)
            hit = ((pred == pos).sum(0) * is_pos, (pred != pos).sum(0) * (1 - is_pos))
            out["sensitivity"] = w @ hit[0] / (s * (w @ is_pos))
            out["specificity"] = w @ hit[1] / (s * (w @ (1 - is_pos)))
        else:  # one-vs-rest, macro average over the classes (as sklearn's multi_class="ovr")
            out["auroc"] = np.mean([auroc_weighted(probs[..., c].reshape(-1), ys == c, ws) for c in range(k)], axis=0)
    return out


def _draws(n: int, b: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=b).astype(np.float64)


def _interval(values: np.ndarray) -> tuple[float, float] | None:
    v = values[np.isfinite(values)]
    if len(v) < 10:
        return None
    lo, hi = np.percentile(v, [2.5, 97.5])
    return float(lo), float(hi)


def bootstrap_metrics(per_seed: list[tuple[np.ndarray, np.ndarray]], positive: int | None, b: int = 1000, seed: int = 0) -> dict:
    """{metric: {"value": pooled point estimate, "ci": (lo, hi) or None}}."""
    probs, labels = stack(per_seed)
    n = len(labels)
    point = _weighted(probs, labels, np.ones((1, n)), positive)
    reps = _weighted(probs, labels, _draws(n, b, seed), positive)
    return {m: {"value": _num(point[m][0]), "ci": _interval(reps[m])} for m in point}


def paired_difference(model1: list[tuple[np.ndarray, np.ndarray]], model2: list[tuple[np.ndarray, np.ndarray]],
                      positive: int | None, b: int = 1000, seed: int = 0) -> dict:
    """{metric: {"value": Model 1 − Model 2 pooled, "ci": interval of the difference on the same draws}}."""
    p1, y1 = stack(model1)
    p2, y2 = stack(model2)
    if not np.array_equal(y1, y2):
        raise ValueError("the two models were not scored on the same test images")
    n = len(y1)
    ones, draws = np.ones((1, n)), _draws(n, b, seed)
    a, c = _weighted(p1, y1, ones, positive), _weighted(p2, y2, ones, positive)
    r1, r2 = _weighted(p1, y1, draws, positive), _weighted(p2, y2, draws, positive)
    return {m: {"value": _num(a[m][0] - c[m][0]), "ci": _interval(r1[m] - r2[m])} for m in a}


def _num(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None
