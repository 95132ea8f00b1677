"""Splits and label subsets: stratified, grouped, nested, and the same in every process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from runner.data.splits import LabelBudget, group_leaks, grouped_stratified_split, labeled_subset
from runner.errors import DataError
from tests.conftest import REPO, real_data


def _toy(n_per_class=(300, 100), group_size=3):
    labels = np.repeat(np.arange(len(n_per_class)), n_per_class)
    keys = [f"img{i:05d}" for i in range(len(labels))]
    groups = [f"{labels[i]}-{i // group_size}" for i in range(len(labels))]
    return keys, labels, groups


def test_stratified_split_keeps_class_shares_and_sizes():
    keys, labels, _ = _toy()
    sp = grouped_stratified_split(keys, labels, keys, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=0)
    assert sorted(np.concatenate(list(sp.values())).tolist()) == list(range(len(keys)))
    for s, frac in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        counts = np.bincount(labels[sp[s]], minlength=2)
        assert abs(counts[0] - 300 * frac) <= 1 and abs(counts[1] - 100 * frac) <= 1, (s, counts)


def test_grouped_split_never_splits_a_group_and_stays_near_the_fractions():
    keys, labels, groups = _toy(group_size=7)
    sp = grouped_stratified_split(keys, labels, groups, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=3)
    assert group_leaks(groups, sp) == []
    for s, frac in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
        assert abs(len(sp[s]) / len(keys) - frac) < 0.03


def test_split_depends_on_the_seed_and_only_on_it():
    keys, labels, groups = _toy()
    fr = {"train": 0.7, "val": 0.15, "test": 0.15}
    a = grouped_stratified_split(keys, labels, groups, fr, seed=0)
    b = grouped_stratified_split(keys, labels, groups, fr, seed=0)
    c = grouped_stratified_split(keys, labels, groups, fr, seed=1)
    assert all((a[s] == b[s]).all() for s in fr)
    assert not (set(a["test"].tolist()) == set(c["test"].tolist()))


def test_fraction_too_small_for_one_example_per_class_is_a_clear_error():
    keys, labels, _ = _toy(n_per_class=(300, 20))
    train = np.arange(len(keys))
    with pytest.raises(DataError, match=r"no labeled example of class 'b'.*at least 0\.025"):
        labeled_subset(train, keys, labels, ["a", "b"], LabelBudget(fraction=0.01), seed=0)
    with pytest.raises(DataError, match="asks 50 examples of class 'b', train has 20"):
        labeled_subset(train, keys, labels, ["a", "b"], LabelBudget(per_class=50), seed=0)


def test_fractions_nest_within_a_seed():
    keys, labels, _ = _toy()
    train = np.arange(len(keys))
    prev: set = set()
    for f in (0.01, 0.05, 0.1, 0.3, 1.0):
        cur = set(labeled_subset(train, keys, labels, ["a", "b"], LabelBudget(fraction=f), seed=7).tolist())
        assert prev <= cur and len(cur) > len(prev)
        prev = cur
    assert prev == set(train.tolist())


_CHILD = """
import json, sys
from runner.data.dataset import prepare
from runner.data.sources import CsvSource
from runner.data.splits import LabelBudget
spec = CsvSource(source="csv", root=sys.argv[1], image_column="id", label_column="hemorrhage",
                 image_pattern="{}.png", image_size=32, split={"group_pattern": "^(\\\\d\\\\d)"})
ds = prepare("h", spec, sys.argv[2])
out = {s: [ds.keys[i] for i in idx] for s, idx in ds.splits.items()}
for seed in (0, 1):
    for f in (0.1, 0.5):
        out[f"{seed}/{f}"] = [ds.keys[i] for i in ds.labeled(LabelBudget(fraction=f), seed)]
out["fingerprint"] = ds.fingerprint
print(json.dumps(out))
"""


def test_splits_and_fractions_are_identical_across_processes(tmp_path):
    root = real_data("head_ct")
    outs = []
    for i, hashseed in enumerate(("1", "12345")):
        env = {**os.environ, "PYTHONHASHSEED": hashseed}
        r = subprocess.run([sys.executable, "-c", _CHILD, str(root), str(tmp_path / f"cache{i}")],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        outs.append(json.loads(r.stdout))
    assert outs[0] == outs[1]
    assert len(outs[0]["test"]) > 0 and set(outs[0]["0/0.1"]) < set(outs[0]["0/0.5"])
