"""Train/val/test splits and nested label subsets, stable on any machine.

Every random choice here is an order by `sha256(seed, purpose, key)`, not a random generator: the
same manifest gives the same splits whatever the numpy version, the platform or the process, and
adding one image to a data set moves only that image.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from runner.errors import DataError

SPLITS = ("train", "val", "test")


def rank(seed: int, purpose: str, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\0{purpose}\0{key}".encode()).digest()[:8], "big")


def grouped_stratified_split(
    keys: Sequence[str],
    labels: np.ndarray,
    groups: Sequence[str],
    fractions: dict[str, float],
    seed: int,
) -> dict[str, np.ndarray]:
    """Assign whole groups to splits so that each split gets its fraction of every class.

    Greedy: groups in order of size (largest first, ties in seeded-hash order) each go to the split
    whose per-class targets are least filled, weighted by the group's class counts. With one item
    per group this is a plain stratified split. No group spans two splits by construction.
    """
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    names = [s for s in fractions if fractions[s] > 0]
    totals = np.bincount(labels, minlength=n_classes).astype(float)
    target = np.array([[fractions[s] * t for t in totals] for s in names])
    filled = np.zeros_like(target)
    order = sorted(members, key=lambda g: (-len(members[g]), rank(seed, "split", g)))
    assignment: dict[str, list[int]] = {s: [] for s in fractions}
    for g in order:
        idx = members[g]
        counts = np.bincount(labels[idx], minlength=n_classes).astype(float)
        # a class absent from the data set has target 0 and count 0 everywhere: need 0
        need = np.divide(target - filled, target, out=np.zeros_like(target), where=target > 0)
        score = (need * counts).sum(axis=1)
        best = int(np.argmax(score))  # ties: the first split named (train before val before test)
        filled[best] += counts
        assignment[names[best]] += idx
    return {s: np.array(sorted(v), dtype=np.int64) for s, v in assignment.items()}


def group_leaks(groups: Sequence[str], split_of: dict[str, np.ndarray]) -> list[str]:
    """Groups (patients) found in more than one split."""
    where: dict[str, set[str]] = defaultdict(set)
    for s, idx in split_of.items():
        for i in idx:
            where[groups[i]].add(s)
    return sorted(g for g, ss in where.items() if len(ss) > 1)


@dataclass(frozen=True)
class LabelBudget:
    """How much of train is labeled: a fraction of each class, or a count per class."""

    fraction: float | None = None
    per_class: int | None = None

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.per_class is None):
            raise ValueError("a label budget is a fraction or a per-class count, not both")

    @property
    def name(self) -> str:
        if self.fraction is not None:
            return f"{self.fraction * 100:g}%"
        return f"{self.per_class}/class"

    def count(self, n_in_class: int) -> int:
        if self.fraction is not None:
            return math.floor(self.fraction * n_in_class + 0.5)
        assert self.per_class is not None
        return self.per_class


def labeled_subset(
    train: np.ndarray,
    keys: Sequence[str],
    labels: np.ndarray,
    class_names: Sequence[str],
    budget: LabelBudget,
    seed: int,
) -> np.ndarray:
    """The labeled indices of train for one seed and budget; nested across budgets of one seed.

    Each class's train items are put in one seeded order; a budget takes a prefix of it, so 1% is
    inside 10% is inside 100% for the same seed. Every class gets at least one example, or it is
    an error that says which class and by how much the budget falls short.
    """
    chosen: list[int] = []
    for c, name in enumerate(class_names):
        of_class = [int(i) for i in train if labels[i] == c]
        if not of_class:
            raise DataError(f"class {name!r} has no training images")
        k = budget.count(len(of_class))
        if k < 1:
            need = 0.5 / len(of_class)
            raise DataError(
                f"label fraction {budget.fraction:g} gives no labeled example of class {name!r} "
                f"({len(of_class)} in train); use a fraction of at least {need:.4g} or a per-class count"
            )
        if k > len(of_class):
            raise DataError(f"label budget {budget.name} asks {k} examples of class {name!r}, train has {len(of_class)}")
        of_class.sort(key=lambda i: rank(seed, "labels", keys[i]))
        chosen += of_class[:k]
    return np.array(sorted(chosen), dtype=np.int64)


def validation_subset(
    val: np.ndarray,
    keys: Sequence[str],
    labels: np.ndarray,
    class_names: Sequence[str],
    budget: LabelBudget,
    train_counts: Sequence[int],
    seed: int,
    floor: int = 1,
) -> np.ndarray:
    """The labeled validation items a task may use for its choices under a budget: each class's
    validation items at the budget's rate (a fraction: that fraction; k per class: k over the
    class's train count), at least `floor` of each class, in one seeded order per class, so the
    subsets of one seed are nested across budgets like the training subsets (Oliver et al. 2018,
    "Realistic Evaluation of Deep Semi-Supervised Learning Algorithms": a validation set larger than
    the labeled set flatters low-label methods)."""
    chosen: list[int] = []
    for c in range(len(class_names)):
        of_class = [int(i) for i in val if labels[i] == c]
        if not of_class:
            continue
        rate = budget.fraction if budget.fraction is not None else min(1.0, (budget.per_class or 0) / max(train_counts[c], 1))
        k = min(len(of_class), max(floor, math.floor(rate * len(of_class) + 0.5)))
        of_class.sort(key=lambda i: rank(seed, "validation labels", keys[i]))
        chosen += of_class[:k]
    return np.array(sorted(chosen), dtype=np.int64)
