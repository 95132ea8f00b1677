"""Studies with a known truth, for checking what runner.stats promises: two models' test predictions
over S seeds, drawn from a model whose true AUROC difference is known in closed form.

For model M, seed s and test image i of patient g with label y (one label per patient):

    score = y·(μ_M + b_Ms) + c_Mg + d_Mi + ε_Msi

b_Ms ~ N(0, σ_seed²): the seed's training and label draw; c_Mg ~ N(0, σ_group²): how hard patient g
is for model M, the same at every seed (clustered errors); d_Mi ~ N(0, σ_image²): the same for an
image; ε ~ N(0, σ_noise²): what changes from seed to seed. A positive and a negative image come from
different patients, so with τ² = σ_group² + σ_image² + σ_noise², seed s's population AUROC is
Φ((μ_M + b_Ms) / (τ√2)), and its mean over seeds Φ(μ_M / √(2τ² + σ_seed²)) (the normal-normal
convolution). The true Δ AUROC is the difference of the two.

Used by tests/test_coverage.py (few replicates, fast) and bench/coverage.py (the coverage table).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy.special import ndtr

from runner import stats


@dataclass(frozen=True)
class Setting:
    name: str
    patients: int
    images_per_patient: int = 1
    mu1: float = 1.2
    mu2: float = 1.0
    sd_seed: float = 0.0
    sd_group: float = 0.0
    sd_image: float = 0.0
    sd_noise: float = 0.3
    prevalence: float = 0.4
    groups_known: bool = True  # the report resamples patients (ids given) or images

    def true_auroc(self, mu: float) -> float:
        tau2 = self.sd_group ** 2 + self.sd_image ** 2 + self.sd_noise ** 2
        return float(ndtr(mu / math.sqrt(2 * tau2 + self.sd_seed ** 2)))

    @property
    def true_delta(self) -> float:
        return self.true_auroc(self.mu1) - self.true_auroc(self.mu2)


SETTINGS = {
    # the seeds disagree far more than a 400-image test split varies
    "seed-dominated": Setting("seed-dominated", patients=400, sd_seed=0.35, sd_image=0.5, sd_noise=0.5),
    # a small test split whose hard images are hard at every seed; the seeds agree
    "unit-dominated": Setting("unit-dominated", patients=120, sd_seed=0.02, sd_image=0.8, sd_noise=0.1),
    # 40 patients of 6 images each, a patient's images hard or easy together, the patient ids known
    "clustered": Setting("clustered", patients=40, images_per_patient=6, sd_seed=0.05, sd_group=0.8, sd_image=0.2, sd_noise=0.2),
}


def draw(setting: Setting, seeds: int, rng: np.random.Generator) -> tuple[list, list, np.ndarray, np.ndarray]:
    """One study: (Model 1's per-seed (probs, labels), Model 2's, labels, patient of each image)."""
    g, m = setting.patients, setting.images_per_patient
    y_patient = (rng.random(g) < setting.prevalence).astype(np.int64)
    if y_patient.min() == y_patient.max():
        y_patient[0] = 1 - y_patient[0]
    labels, patient = np.repeat(y_patient, m), np.repeat(np.arange(g), m)
    n = g * m
    out = []
    for mu in (setting.mu1, setting.mu2):
        c, d = rng.normal(0, setting.sd_group, g)[patient], rng.normal(0, setting.sd_image, n)
        per_seed = []
        for _ in range(seeds):
            score = labels * (mu + rng.normal(0, setting.sd_seed)) + c + d + rng.normal(0, setting.sd_noise, n)
            p = 1 / (1 + np.exp(-(score - mu / 2)))
            per_seed.append((np.stack([1 - p, p], 1), labels))
        out.append(per_seed)
    return out[0], out[1], labels, patient.astype(str)


def coverage(setting: Setting, seeds: int, reps: int, b: int = 200, seed: int = 0, method=None) -> dict:  # noqa: ANN001
    """How often the 95% interval of Δ AUROC holds the true Δ, its mean width, and how often the test
    rejects Δ = 0 when it is 0 (the same setting with μ2 = μ1). `method(m1, m2, groups, b, seed) ->
    (ci, p)`: runner.stats by default."""
    method = method or product_method
    rng = np.random.default_rng(seed)
    null = replace(setting, mu2=setting.mu1)
    hits, widths, rejections = 0, [], 0
    for r in range(reps):
        m1, m2, _, patient = draw(setting, seeds, rng)
        ci, _ = method(m1, m2, patient if setting.groups_known else None, b, r)
        hits += ci is not None and ci[0] <= setting.true_delta <= ci[1]
        widths.append(ci[1] - ci[0] if ci else float("nan"))
        m1, m2, _, patient = draw(null, seeds, rng)
        _, p = method(m1, m2, patient if setting.groups_known else None, b, r)
        rejections += p is not None and p < stats.ALPHA
    return {"coverage": hits / reps, "width": float(np.nanmean(widths)), "false_positive": rejections / reps, "reps": reps,
            "true_delta": round(setting.true_delta, 4)}


def product_method(m1: list, m2: list, groups, b: int, seed: int) -> tuple:  # noqa: ANN001
    d = stats.paired_difference(m1, m2, positive=1, b=b, seed=seed, groups=groups)["auroc"]
    return d["ci"], d["p"]


def pigeonhole_method(m1: list, m2: list, groups, b: int, seed: int) -> tuple:  # noqa: ANN001
    """The construction before this one (engine 4): a bootstrap drawing seeds and test units at once
    (Owen's pigeonhole), the percentile interval, and p the larger of the bootstrap's and the seed
    t-test's. Kept here to show what it covered."""
    p1, labels = stats.stack(m1)
    p2, _ = stats.stack(m2)
    gi = stats.group_index(groups, len(labels))
    w = stats.image_weights(gi, b, seed)[1:]
    rng = np.random.default_rng(seed + 1)
    s = len(p1)
    seed_w = rng.multinomial(s, np.full(s, 1.0 / s), size=b).astype(np.float64)
    full = np.vstack([np.ones((1, len(labels))), w])
    a = stats.per_seed_values(p1, labels, full, 1)["auroc"]
    c = stats.per_seed_values(p2, labels, full, 1)["auroc"]
    diff = a - c
    reps = (seed_w * diff[:, 1:].T).sum(1) / seed_w.sum(1)
    lo, hi = np.percentile(reps, [2.5, 97.5])
    k = min(int((reps <= 0).sum()), int((reps >= 0).sum()))
    p_boot = min(1.0, 2 * (1 + k) / (len(reps) + 1))
    per_seed = diff[:, 0]
    t = per_seed.mean() / (per_seed.std(ddof=1) / math.sqrt(s)) if per_seed.std(ddof=1) > 0 else math.inf
    p_seed = 2 * (1 - stats.t_cdf(abs(t), s - 1))
    return (float(lo), float(hi)), max(p_boot, p_seed)
