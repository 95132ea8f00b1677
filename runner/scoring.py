"""The metrics of one seed's test predictions under B weightings of its test images at once.

A weighting is how often each image is drawn in one bootstrap replicate (all ones: the test split as
it is), so one call gives the point estimate and every replicate. Numpy only; the worker's
`ml.metrics.classification_metrics` computes the same values with all-ones weights.

- accuracy, loss (cross-entropy, p clipped at 1e-12), balanced accuracy (mean recall over classes);
- AUROC (Mann-Whitney, ties half; one-vs-rest macro mean for more than two classes) and AUPRC
  (average precision, the step-wise area under precision-recall: Σ (R_k − R_{k−1}) P_k over the
  distinct scores, as scikit-learn's `average_precision_score`), of the positive class;
- Brier score (mean squared error of the positive class's probability; for more than two classes the
  sum over classes, Brier 1950) and ECE (expected calibration error of the top-class confidence in
  15 equal-width bins, Guo et al. 2017, "On Calibration of Modern Neural Networks");
- sensitivity and specificity at the argmax (the 0.5 threshold for two classes) and, when a threshold
  is given, at that operating point (`sensitivity_op`, `specificity_op`: chosen on the budget's
  validation labels, see `operating_threshold`).
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 15


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


def auprc_weighted(scores: np.ndarray, is_pos: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Average precision under B weightings: thresholds at each distinct score, highest first."""
    order = np.argsort(-scores, kind="mergesort")
    s, pos, wt = scores[order], is_pos[order], w[:, order]
    starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]
    tp = np.cumsum(np.add.reduceat(wt * pos, starts, axis=1), axis=1)
    fp = np.cumsum(np.add.reduceat(wt * ~pos, starts, axis=1), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = tp / (tp + fp)
        recall = tp / tp[:, -1:]
    step = np.diff(np.concatenate([np.zeros((len(w), 1)), recall], axis=1), axis=1)
    return np.where(step > 0, step * precision, 0.0).sum(1) / np.where(tp[:, -1] > 0, 1.0, np.nan)


def _ece(probs: np.ndarray, correct: np.ndarray, w: np.ndarray, total: np.ndarray) -> np.ndarray:
    conf = probs.max(-1)
    bins = np.minimum((conf * ECE_BINS).astype(np.int64), ECE_BINS - 1)
    onehot = np.zeros((len(conf), ECE_BINS))
    onehot[np.arange(len(conf)), bins] = 1.0
    gap = w @ (onehot * (correct - conf)[:, None])  # per bin: Σ (correct − confidence), weighted
    return np.abs(gap).sum(1) / total


def seed_metrics(probs: np.ndarray, labels: np.ndarray, w: np.ndarray, positive: int | None,
                 threshold: float | None = None) -> dict[str, np.ndarray]:
    """Metrics of ONE seed's (N, K) predictions under B weightings of its images (w: (B, N) counts)."""
    n, k = probs.shape
    pred = probs.argmax(-1)
    correct = (pred == labels).astype(np.float64)
    p_true = np.clip(probs[np.arange(n), labels], 1e-12, 1)
    total = w.sum(1)
    onehot = np.eye(k)[labels]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {"accuracy": w @ correct / total, "loss": w @ -np.log(p_true) / total, "ece": _ece(probs, correct, w, total)}
        recalls = [w @ (correct * (labels == c)) / (w @ (labels == c).astype(np.float64)) for c in range(k)]
        out["balanced_accuracy"] = np.nanmean(np.stack(recalls), axis=0)
        if k == 2:
            pos = 1 if positive is None else positive
            is_pos = labels == pos
            out["auroc"] = auroc_weighted(probs[:, pos], is_pos, w)
            out["auprc"] = auprc_weighted(probs[:, pos], is_pos, w)
            out["brier"] = w @ (probs[:, pos] - is_pos) ** 2 / total
            out["sensitivity"], out["specificity"] = recalls[pos], recalls[1 - pos]
            if threshold is not None:
                called = probs[:, pos] >= threshold
                out["sensitivity_op"] = w @ (called & is_pos).astype(np.float64) / (w @ is_pos.astype(np.float64))
                out["specificity_op"] = w @ (~called & ~is_pos).astype(np.float64) / (w @ (~is_pos).astype(np.float64))
        else:  # one-vs-rest, macro average over the classes (as sklearn's multi_class="ovr")
            out["auroc"] = np.mean([auroc_weighted(probs[:, c], labels == c, w) for c in range(k)], axis=0)
            out["auprc"] = np.mean([auprc_weighted(probs[:, c], labels == c, w) for c in range(k)], axis=0)
            out["brier"] = w @ ((probs - onehot) ** 2).sum(1) / total
    return out


def operating_threshold(val_probs: np.ndarray, val_labels: np.ndarray, positive: int,
                        target_sensitivity: float | None = None) -> float | None:
    """The probability of the positive class above which an image is called positive, chosen on the
    budget's validation labels: the largest Youden's J = sensitivity + specificity − 1 (Youden 1950),
    or, with a target, the highest threshold whose validation sensitivity reaches it. None when
    validation holds one class only."""
    p = np.asarray(val_probs, dtype=np.float64)[:, positive]
    is_pos = np.asarray(val_labels) == positive
    if is_pos.all() or not is_pos.any():
        return None
    cuts = np.unique(p)[::-1]  # call positive at p >= cut, highest cut first
    sens = np.array([(p[is_pos] >= c).mean() for c in cuts])
    spec = np.array([(p[~is_pos] < c).mean() for c in cuts])
    if target_sensitivity is not None:
        reach = np.flatnonzero(sens >= target_sensitivity)
        return float(cuts[reach[0]]) if len(reach) else float(cuts[-1])
    return float(cuts[int(np.argmax(sens + spec - 1))])


MONITOR_MIN_QUERIES, MONITOR_MIN_PER_CLASS = 30, 10


def too_few(queries: int, per_class: list[int] | None) -> bool:
    """Whether the pretraining monitor scored too few query images for its kNN AUROC to tell an encoder
    that learned from one that did not: under 30 images, or under 10 of some class (one image then moves
    it by 0.1 or more)."""
    return queries < MONITOR_MIN_QUERIES or (per_class is not None and min(per_class) < MONITOR_MIN_PER_CLASS)
