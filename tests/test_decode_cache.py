"""Decoding any PIL mode, bad files, and the cache (hit, miss, keys, atomic entries)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runner.data.cache import load_images
from runner.data.dataset import prepare
from runner.data.decode import ImageSettings, decode_file
from runner.data.sources import ImageFolderSource, scan
from runner.errors import DataError
from tests.conftest import real_data


def _gradient(w=50, h=40) -> np.ndarray:
    return (np.add.outer(np.arange(h) * 3, np.arange(w) * 2) % 256).astype(np.uint8)


@pytest.mark.parametrize(
    "mode,ext,gray",
    [("L", "png", True), ("RGB", "jpg", True), ("RGBA", "png", True), ("LA", "png", True),
     ("P", "png", True), ("I;16", "png", True), ("1", "png", True), ("CMYK", "jpg", True),
     ("RGBcolour", "png", False)],
)
def test_every_pil_mode_decodes_to_the_fixed_size(tmp_path, mode, ext, gray):
    g = _gradient()
    if mode == "I;16":
        im = Image.fromarray(g.astype(np.uint16) * 200)  # a 16-bit image using part of the range
    elif mode == "RGBcolour":
        im = Image.fromarray(np.stack([g, 255 - g, g // 2], -1))
    else:
        im = Image.fromarray(g).convert(mode)
    path = tmp_path / f"x.{ext}"
    im.save(path)
    d = decode_file(str(path), ImageSettings(32, "pad"))
    assert d.error is None
    assert d.pixels.shape == ((32, 32) if gray else (32, 32, 3)) and d.pixels.dtype == np.uint8
    assert d.gray is gray
    assert d.pixels.max() > 100  # scaled, not a black or saturated image
    if mode == "I;16":  # min-max scaled to 8 bits: at native size the gradient comes back exactly
        native = decode_file(str(path), ImageSettings(50, "pad")).pixels
        expected = np.rint(g * (255 / g.max())).astype(np.uint8)
        assert np.array_equal(native[5:45], expected) and native[:5].max() == 0


def test_fit_modes_keep_or_change_the_aspect(tmp_path):
    a = np.full((20, 80), 200, np.uint8)
    Image.fromarray(a).save(tmp_path / "wide.png")
    pad = decode_file(str(tmp_path / "wide.png"), ImageSettings(40, "pad")).pixels
    crop = decode_file(str(tmp_path / "wide.png"), ImageSettings(40, "crop")).pixels
    squash = decode_file(str(tmp_path / "wide.png"), ImageSettings(40, "squash")).pixels
    assert pad[0].max() == 0 and pad[20].min() == 200  # black bands above and below
    assert crop.min() == 200 and squash.min() == 200


def test_truncated_and_non_image_files_are_named_not_raised(tmp_path):
    src = next((real_data("skin_isic") / "Train" / "melanoma").glob("*.jpg"))
    data = src.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    (tmp_path / "text.png").write_text("not an image")
    for name in ("cut.jpg", "text.png"):
        d = decode_file(str(tmp_path / name), ImageSettings(32, "pad"))
        assert d.pixels is None and d.error.startswith("not a readable image")


def _folder_with_a_bad_image(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / cls).mkdir(parents=True)
        for p in sorted((real_data("chest_xray") / "test" / cls).glob("*.jpeg"))[:12]:
            shutil.copy(p, root / cls / p.name)
    victim = sorted((root / "PNEUMONIA").glob("*.jpeg"))[0]
    victim.write_bytes(victim.read_bytes()[:2000])  # truncated mid-scan
    return root


def test_bad_image_is_skipped_with_a_warning_or_fatal_as_asked(tmp_path):
    root = _folder_with_a_bad_image(tmp_path)
    spec = dict(source="imagefolder", root=str(root), image_size=32, split={"val": 0.25, "test": 0.25})
    ds = prepare("x", ImageFolderSource(**spec), tmp_path / "cache")
    assert len(ds.keys) == 23
    assert len(ds.warnings) == 1 and "PNEUMONIA/" in ds.warnings[0] and "skipped unreadable image" in ds.warnings[0]
    assert [d.reason for d in ds.audit.dropped] == ["unreadable"]
    with pytest.raises(DataError, match=r"PNEUMONIA/.*\.jpeg: not a readable image.*on_bad_image"):
        prepare("x", ImageFolderSource(**spec, on_bad_image="fail"), tmp_path / "cache")


def test_second_load_reads_the_cache_and_gives_the_same_pixels(tmp_path):
    spec = ImageFolderSource(source="imagefolder", root=str(real_data("skin_isic") / "Test"), image_size=24)
    items = scan(spec)
    first = load_images(spec, items, tmp_path, workers=2)
    second = load_images(spec, items, tmp_path, workers=2)
    assert not first.from_cache and second.from_cache
    assert first.cache_key == second.cache_key
    assert np.array_equal(np.asarray(first.images), np.asarray(second.images))
    assert first.images.shape == (118, 3, 24, 24)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.cache_key, "file-hashes"])  # no temp folder left
    assert isinstance(second.images, np.memmap)  # training reads the file, it is not re-decoded


def test_cache_key_follows_content_and_settings_not_names(tmp_path):
    root = tmp_path / "ds"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for p in sorted((real_data("head_ct")).glob("*.png"))[:3]:
            shutil.copy(p, root / cls / f"{cls}{p.name}")
    spec = ImageFolderSource(source="imagefolder", root=str(root), image_size=16)
    key = load_images(spec, scan(spec), tmp_path / "c").cache_key
    bigger = ImageFolderSource(source="imagefolder", root=str(root), image_size=20)
    assert load_images(bigger, scan(bigger), tmp_path / "c").cache_key != key
    victim = root / "a" / "a000.png"
    Image.open(victim).convert("L").rotate(90).save(victim)  # same name, new content
    changed = load_images(spec, scan(spec), tmp_path / "c")
    assert changed.cache_key != key and not changed.from_cache
    assert load_images(spec, scan(spec), tmp_path / "c").from_cache


def test_channel_choice_follows_the_content(cache_dir):
    chest = ImageFolderSource(source="imagefolder", root=str(real_data("chest_xray") / "val"), image_size=16)
    skin = ImageFolderSource(source="imagefolder", root=str(real_data("skin_isic") / "Test"), image_size=16)
    assert load_images(chest, scan(chest), cache_dir).channels == 1  # RGB JPEGs of gray X-rays
    assert load_images(skin, scan(skin), cache_dir).channels == 3
    forced = ImageFolderSource(source="imagefolder", root=str(real_data("chest_xray") / "val"), image_size=16, channels=3)
    t = load_images(forced, scan(forced), cache_dir)
    assert t.channels == 3 and np.array_equal(t.images[:, 0], t.images[:, 2])


def test_an_image_path_that_is_a_fifo_or_a_device_is_an_error_not_a_hang(tmp_path):
    """A FIFO (reading it blocks forever) or a link to /dev/zero (it never ends) where an image should be,
    in a data set or given to `predict`: an error for that image at once, the others unaffected."""
    import os
    import threading

    from runner.data.decode import ImageSettings, decode_file

    fifo = tmp_path / "a.png"
    os.mkfifo(fifo)
    (tmp_path / "b.png").symlink_to("/dev/zero")
    got = {}
    t = threading.Thread(target=lambda: got.update({n: decode_file(str(tmp_path / n), ImageSettings(32, "pad"))
                                                     for n in ("a.png", "b.png")}), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "decoding hung"
    assert all(d.pixels is None and d.error == "not a regular file (a FIFO, a device or a folder)" for d in got.values())
