"""Near-duplicate groups (runner/data/neardup.py) on real skin-lesion images: a re-encoded, a resized
and a brightened copy of an image are found, joined to it and kept in its split; images merely alike
that chain into one large group are refused with the reason, not split silently."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from runner.data import neardup
from runner.data.dataset import audit_report, prepare
from runner.data.sources import ImageFolderSource
from runner.errors import DataError
from tests.conftest import real_data


def _copies(src: Path, dst: Path, n: int) -> dict[str, list[str]]:
    """n images of each of two classes copied, and for every third one three altered copies: JPEG at
    quality 60, resized to 70%, 8% brighter. Returns {original key: [its copies' keys]}."""
    made = {}
    for cls in ("melanoma", "nevus"):
        (dst / cls).mkdir(parents=True)
        for k, f in enumerate(sorted((src / "Train" / cls).glob("*.jpg"))[:n]):
            im = Image.open(f).convert("RGB")
            im.save(dst / cls / f"{f.stem}.png")
            if k % 3:
                continue
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=60)
            (dst / cls / f"{f.stem}_q60.jpg").write_bytes(buf.getvalue())
            im.resize((round(im.width * 0.7), round(im.height * 0.7)), Image.Resampling.LANCZOS).save(dst / cls / f"{f.stem}_small.png")
            ImageEnhance.Brightness(im).enhance(1.08).save(dst / cls / f"{f.stem}_bright.png")
            made[f"{cls}/{f.stem}.png"] = [f"{cls}/{f.stem}_q60.jpg", f"{cls}/{f.stem}_small.png", f"{cls}/{f.stem}_bright.png"]
    return made


def test_altered_copies_are_grouped_with_their_original_and_kept_in_its_split(tmp_path, cache_dir):
    made = _copies(real_data("skin_isic"), tmp_path / "set", 30)
    base = dict(source="imagefolder", root=str(tmp_path / "set"), image_size=64, positive="melanoma",
                split={"strategy": "stratified", "val": 0.2, "test": 0.2})
    plain = prepare("skin", ImageFolderSource(**base), cache_dir)
    grouped = prepare("skin", ImageFolderSource(**(base | {"split": base["split"] | {"near_duplicates": True}})), cache_dir)
    split_of = {grouped.keys[i]: s for s, idx in grouped.splits.items() for i in idx}
    group_of = dict(zip(grouped.keys, grouped.groups))
    for original, copies in made.items():
        assert {group_of[c] for c in copies} == {group_of[original]}, (original, copies)
        assert {split_of[c] for c in copies} == {split_of[original]}, (original, copies)
    near = grouped.near
    assert near["pairs_across_splits"] == 0 and near["images_in_groups"] >= 4 * len(made)
    plain_split = {plain.keys[i]: s for s, idx in plain.splits.items() for i in idx}
    crossing = sum(plain_split[c] != plain_split[o] for o, cs in made.items() for c in cs)
    assert near["pairs_across_splits_ungrouped"] >= crossing > 0  # what grouping changed, as the audit says
    report = audit_report(grouped, [], [])["near_duplicates"]
    assert report["grouped"] and report["examples"] and json.dumps(report)
    # not asked for: the audit still counts them, and the split is left as it was
    counted = audit_report(plain, [], [])["near_duplicates"]
    assert not counted["grouped"] and counted["pairs_across_splits"] >= crossing and plain.groups == plain.keys


def test_images_alike_rather_than_copies_are_refused_not_split_as_one_group(tmp_path, cache_dir):
    rng = np.random.default_rng(0)
    scene = np.asarray(Image.fromarray(rng.integers(40, 215, (6, 6)).astype(np.uint8)).resize((48, 48), Image.Resampling.BICUBIC))
    for cls in ("a", "b"):
        (tmp_path / "set" / cls).mkdir(parents=True)
        for i in range(30):  # one smooth scene, each image its own noise: all alike (as chest X-rays are), none a copy
            img = np.clip(scene + rng.normal(0, 4, scene.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / "set" / cls / f"{i}.png")
    spec = ImageFolderSource(source="imagefolder", root=str(tmp_path / "set"), image_size=48,
                             split={"val": 0.2, "test": 0.2, "near_duplicates": True})
    with pytest.raises(DataError, match=r"joined \d+ of 60 images into one group: these images are alike"):
        prepare("alike", spec, cache_dir)


def test_the_hash_ignores_resizing_and_separates_unrelated_images():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (1, 3, 64, 64)).astype(np.uint8)
    a = np.repeat(np.repeat(a[:, :, ::8, ::8], 8, axis=2), 8, axis=3)  # blocky: survives downscaling
    small = a[:, :, ::2, ::2]
    other = rng.integers(0, 256, (1, 3, 64, 64)).astype(np.uint8)
    h = np.concatenate([neardup.phash(a), neardup.phash(small), neardup.phash(other)])
    bits = [int(neardup._popcount(h[0] ^ x)) for x in h[1:]]
    assert bits[0] <= 4 and bits[1] >= 16, bits
    assert neardup.join(["p", "q", "r", "p"], [(1, 2, 3, 0.99)]) == ["p", "q", "q", "p"]
