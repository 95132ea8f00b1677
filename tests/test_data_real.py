"""The data layer on the three real data sets in ../shared/data (the issue's 'must show' list)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from runner.data.dataset import prepare
from runner.data.sources import CsvSource, ImageFolderSource, group_of, scan
from runner.data.splits import LabelBudget
from tests.conftest import real_data

KERMANY_PATIENT = r"(person\d+)_|((?:NORMAL2-)?IM-\d+)-"


def head_ct_spec(**kw) -> CsvSource:
    return CsvSource(
        source="csv",
        root=str(real_data("head_ct")),
        image_column="id",
        label_column="hemorrhage",
        image_pattern="{}.png",
        classes={"normal": ["0"], "hemorrhage": ["1"]},
        positive="hemorrhage",
        image_size=64,
        **kw,
    )


def chest_spec(**kw) -> ImageFolderSource:
    args = dict(
        source="imagefolder",
        root=str(real_data("chest_xray")),
        split_dirs={"train": "train", "val": "val", "test": "test"},
        image_size=32,
        split={"strategy": "stratified", "val": 0.15, "test": 0.15, "group_pattern": KERMANY_PATIENT},
    )
    return ImageFolderSource(**(args | kw))


def skin_spec(**kw) -> ImageFolderSource:
    args = dict(
        source="imagefolder",
        root=str(real_data("skin_isic")),
        split_dirs={"train": "Train", "test": "Test"},
        classes=["melanoma", "nevus"],
        image_size=32,
        split={"strategy": "given", "val": 0.15},
    )
    return ImageFolderSource(**(args | kw))


def test_head_ct_labels_from_the_kaggle_csv_and_every_image_decodes(cache_dir):
    spec = head_ct_spec(dedupe=False)
    items = scan(spec)
    assert len(items) == 200
    assert sum(it.label == "1" for it in items) == 100 and sum(it.label == "0" for it in items) == 100
    # the header is "id, hemorrhage": the label column is found despite the space
    ds = prepare("hemorrhage", spec, cache_dir)
    modes = {r["mode"] for r in ds.table.records}
    assert modes == {"RGB", "RGBA"}, modes  # both modes of the published files were decoded
    assert not ds.table.errors
    assert ds.table.images.shape == (200, 1, 64, 64)  # CT content is gray: one channel
    assert ds.channels == 1
    # every image has content (not an all-black row of a failed decode)
    assert (ds.table.images.reshape(200, -1).max(axis=1) > 50).all()
    assert ds.counts()["train"]["hemorrhage"] + ds.counts()["val"]["hemorrhage"] + ds.counts()["test"]["hemorrhage"] == 100


def test_head_ct_audit_finds_its_one_exact_duplicate(cache_dir):
    ds = prepare("hemorrhage", head_ct_spec(), cache_dir)
    dups = ds.audit.duplicates
    assert len(dups) == 1 and len(dups[0].keys) == 2 and not dups[0].conflicting
    a, b = (ds.table.records[ds.table.keys.index(k)] for k in dups[0].keys)
    assert a["pixel_sha"] == b["pixel_sha"]
    assert len(ds.keys) == 199  # one copy kept


@pytest.mark.slow
def test_chest_xray_patient_groups_never_span_two_splits(cache_dir, capsys):
    ds = prepare("pneumonia", chest_spec(), cache_dir)
    rx = re.compile(KERMANY_PATIENT)
    patient_split: dict[str, str] = {}
    for split, idx in ds.splits.items():
        for i in idx:
            pid = group_of(rx, ds.keys[i].split("/")[-1])
            assert patient_split.setdefault(pid, split) == split, f"patient {pid} in {patient_split[pid]} and {split}"
    assert ds.group_leaks == []
    counts = ds.counts()
    with capsys.disabled():
        print(f"\nchest X-ray, patient-grouped split: {counts}; patients: {len(patient_split)}")
    n = sum(sum(c.values()) for c in counts.values())
    assert n == 5216 - 26  # 24 groups of byte-identical images, one copy of each kept
    # stratified and near the asked fractions despite grouping
    for split, frac in (("train", 0.70), ("val", 0.15), ("test", 0.15)):
        size = sum(counts[split].values())
        assert abs(size / n - frac) < 0.02, (split, size / n)
        share = counts[split]["PNEUMONIA"] / size
        assert abs(share - 3850 / 5190) < 0.03, (split, share)
    # the patient ids this pattern finds are the ones PROVENANCE.md counts
    normal = {group_of(rx, k.split("/")[-1]) for k in ds.keys if "/NORMAL/" in k}
    pneu = {group_of(rx, k.split("/")[-1]) for k in ds.keys if "/PNEUMONIA/" in k}
    assert len(pneu) == 1635 and len(normal) == 1211


@pytest.mark.slow
def test_chest_xray_given_folders_leak_patients_and_the_audit_says_so(cache_dir):
    spec = chest_spec(split={"strategy": "given", "group_pattern": KERMANY_PATIENT})
    ds = prepare("pneumonia", spec, cache_dir)
    assert len(ds.group_leaks) > 100  # the published folders were split by image, not by patient
    assert any("span two splits" in w for w in ds.warnings)


def test_skin_audit_finds_cross_class_copies_and_train_test_leaks(cache_dir):
    ds = prepare("melanoma", skin_spec(), cache_dir)
    a = ds.audit
    assert len(a.duplicates) == 159  # as PROVENANCE.md counts them
    assert len(a.conflicts) == 155
    assert all(g.byte_identical for g in a.duplicates)
    leaks = a.leaks
    assert leaks and all({"train", "test"} <= set(g.splits) for g in leaks)
    conflict_pairs = {tuple(sorted({k.split("/")[1] for k in g.keys})) for g in a.conflicts}
    assert ("melanoma", "seborrheic keratosis") in conflict_pairs
    assert ("actinic keratosis", "nevus") in conflict_pairs


def test_skin_melanoma_vs_nevus_holds_none_of_the_defective_images(cache_dir):
    ds = prepare("melanoma", skin_spec(), cache_dir)
    kept = set(ds.keys)
    for g in ds.audit.conflicts:
        assert not kept & set(g.keys), g.keys
    # no image content appears twice, so none is in two splits either
    shas = [ds.table.records[r]["pixel_sha"] for r in ds.rows]
    assert len(shas) == len(set(shas))
    split_of = {ds.table.records[ds.rows[i]]["pixel_sha"]: s for s, idx in ds.splits.items() for i in idx}
    assert len(split_of) == len(ds.keys)
    counts = ds.counts()
    total = {c: sum(counts[s][c] for s in counts) for c in ds.class_names}
    assert total == {"melanoma": 375, "nevus": 295}  # PROVENANCE.md's count after cleaning
    assert ds.channels == 3
    assert set(ds.not_selected) == {
        "actinic keratosis", "basal cell carcinoma", "dermatofibroma", "pigmented benign keratosis",
        "seborrheic keratosis", "squamous cell carcinoma", "vascular lesion",
    }


def test_skin_melanoma_vs_the_rest_merges_classes(cache_dir):
    ds = prepare("melanoma", skin_spec(classes={"melanoma": ["melanoma"], "other": "*"}), cache_dir)
    counts = ds.counts()
    total = {c: sum(counts[s][c] for s in counts) for c in ds.class_names}
    # PROVENANCE's 2,045 drop every conflicting copy; the published Test folder stays whole, so the 18
    # Test copies (15 actinic keratosis, 3 seborrheic keratosis) of Train images under another label
    # stay in test (reported), and only their Train copies go
    assert total == {"melanoma": 375, "other": 2045 - 375 + 18}
    assert sum(len(v) for v in ds.audit.kept_in_test.values()) == 18
    assert ds.audit.kept_in_test == {"label conflict": sorted(ds.audit.kept_in_test["label conflict"])}
    assert all(k.startswith("Test/") for k in ds.audit.kept_in_test["label conflict"])
    assert ds.class_names == ["melanoma", "other"]


def test_label_fractions_are_nested_and_cover_every_class(cache_dir):
    ds = prepare("hemorrhage", head_ct_spec(), cache_dir)
    for seed in (0, 1):
        subsets = [set(ds.labeled(LabelBudget(fraction=f), seed).tolist()) for f in (0.01, 0.1, 0.5, 1.0)]
        assert subsets[0] < subsets[1] < subsets[2] < subsets[3]
        assert subsets[3] == set(ds.splits["train"].tolist())
        for s in subsets:
            assert set(ds.labels[list(s)].tolist()) == {0, 1}
    assert set(ds.labeled(LabelBudget(fraction=0.1), 0)) != set(ds.labeled(LabelBudget(fraction=0.1), 1))
    k2 = ds.labeled(LabelBudget(per_class=2), 0)
    assert np.bincount(ds.labels[k2]).tolist() == [2, 2]
    assert set(k2) <= set(ds.labeled(LabelBudget(per_class=5), 0))
