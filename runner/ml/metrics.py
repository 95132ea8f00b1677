"""Test-split metrics from predicted probabilities: accuracy, cross-entropy, AUROC and AUPRC (one-vs-rest
for more than two classes), balanced accuracy, sensitivity and specificity of the positive class, the
Brier score and the expected calibration error, and the confusion matrix (rows: true class, columns:
predicted). The same definitions as the report's (`runner.scoring`), which recomputes them from the
stored probabilities."""

from __future__ import annotations

import numpy as np

# numpy only (no sklearn.metrics): importing it cost every worker process 0.8 s at start-up


def confusion_matrix(labels: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """(k, k) counts, rows the true class, columns the predicted one."""
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (labels, pred), 1)
    return cm


def balanced_accuracy(cm: np.ndarray) -> float:
    """Mean recall over the classes present in the true labels."""
    support = cm.sum(axis=1)
    present = support > 0
    return float((np.diag(cm)[present] / support[present]).mean())


def auroc(scores: np.ndarray, is_pos: np.ndarray) -> float:
    """Area under the ROC curve, ties counting half (the Mann-Whitney U over n_pos * n_neg)."""
    from runner.scoring import auroc_weighted

    return float(auroc_weighted(np.asarray(scores, dtype=np.float64), np.asarray(is_pos, dtype=bool),
                                np.ones((1, len(scores))))[0])


def cross_entropy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean -log p(true class) of predicted probabilities (clipped at 1e-12): the one cross-entropy of
    probabilities that training, selection, the probe and the metrics all use."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)).mean())


def classification_metrics(probs: np.ndarray, labels: np.ndarray, positive: int | None = None) -> dict:
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    n, k = probs.shape
    pred = probs.argmax(axis=1)
    out: dict = {"n": int(n), "accuracy": float((pred == labels).mean()), "loss": cross_entropy(probs, labels)}
    cm = confusion_matrix(labels, pred, k)
    out["balanced_accuracy"] = balanced_accuracy(cm)
    out["confusion_matrix"] = cm.tolist()
    present = np.unique(labels)
    if len(present) < 2:
        out["auroc"] = None  # undefined with one class in the split
    elif k == 2:
        pos = 1 if positive is None else positive
        out["auroc"] = auroc(probs[:, pos], labels == pos)
    else:  # one-vs-rest, the macro mean over the classes present
        out["auroc"] = float(np.mean([auroc(probs[:, c], labels == c) for c in present]))
    from runner.scoring import seed_metrics

    extra = seed_metrics(probs, labels, np.ones((1, n)), positive)
    for m in ("auprc", "brier", "ece"):
        out[m] = float(extra[m][0]) if len(present) >= 2 or m != "auprc" else None
    if k == 2:
        pos = 1 if positive is None else positive
        tp = int(((pred == pos) & (labels == pos)).sum())
        fn = int(((pred != pos) & (labels == pos)).sum())
        tn = int(((pred != pos) & (labels != pos)).sum())
        fp = int(((pred == pos) & (labels != pos)).sum())
        out["sensitivity"] = tp / (tp + fn) if tp + fn else None
        out["specificity"] = tn / (tn + fp) if tn + fp else None
    return out


def prior_loss(train_labels: np.ndarray, test_labels: np.ndarray, num_classes: int) -> float:
    """Cross-entropy on test of always predicting the train class frequencies: the loss a model that
    learned nothing would get, the bar a diverging fine-tune must not cross."""
    prior = np.bincount(train_labels, minlength=num_classes) / len(train_labels)
    return cross_entropy(np.tile(prior, (len(test_labels), 1)), test_labels)


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T that minimizes the validation cross-entropy of softmax(log p / T).

    Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017): one
    scalar, fitted on validation, that undoes a model's over-confidence without changing a single
    prediction (argmax is unchanged). A golden-section search over log T in [1/20, 20]."""
    logp = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0))
    labels = np.asarray(labels)

    def nll(log_t: float) -> float:
        z = logp / np.exp(log_t)
        z -= z.max(axis=1, keepdims=True)
        lse = np.log(np.exp(z).sum(axis=1))
        return float((lse - z[np.arange(len(labels)), labels]).mean())

    lo, hi = -np.log(20.0), np.log(20.0)
    ratio = (np.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(b)
    return float(np.exp((lo + hi) / 2))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    z = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def stored_probs(probs: np.ndarray) -> list:
    """Test probabilities for metrics.json at 6 significant digits. Rounding to 6 decimals turned a
    confident miss's 1e-9 into 0, and the report's loss, recomputed from these, clipped it to
    -log(1e-12) = 27.6 (the CPU study's extended table showed melanoma 1% losses above the worker's)."""
    return [[float(f"{v:.6g}") for v in row] for row in np.asarray(probs, dtype=np.float64)]
