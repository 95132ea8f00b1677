"""`byol-runner data fetch`: everything after the download, for real. The network is not reachable
here, so kagglehub's download is replaced by folders shaped like the published archives (the nested
chest_xray/chest_xray/ copy, __MACOSX, .DS_Store), made at test time from the real images in
../shared/data, at the published counts. The download itself is not exercised."""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import pytest

from runner.data import fetch as F
from runner.errors import UserError
from tests.conftest import REPO, real_data, run_cli


def _fill(folder: Path, pool: list[Path], n: int, copy: bool = False) -> None:
    """n images in `folder`, links to (or copies of) real ones from `pool` (cycled, renamed where one repeats)."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        src = pool[i % len(pool)]
        name = src.name if i < len(pool) else f"{src.stem}-r{i}{src.suffix}"
        shutil.copy(src, folder / name) if copy else os.symlink(src, folder / name)


def _junk(folder: Path) -> None:
    (folder / ".DS_Store").write_bytes(b"\0junk")
    (folder / "._IM-0001-0001.jpeg").write_bytes(b"\0resource fork")


def chest_archive(tmp: Path) -> Path:
    real = real_data("chest_xray")
    pools = {c: sorted(real.glob(f"*/{c}/*.jpeg")) for c in ("NORMAL", "PNEUMONIA")}
    archive = tmp / "chest-xray-pneumonia" / "versions" / "2"
    for top in (archive / "chest_xray", archive / "chest_xray" / "chest_xray"):  # the published copy and its nested twin
        for rel, (_, n) in F.DATASETS["chest_xray"].folders.items():
            _fill(top / rel, pools[rel.split("/")[1]], n)
            _junk(top / rel)
    (archive / "__MACOSX" / "chest_xray" / "train" / "NORMAL").mkdir(parents=True)
    (archive / "__MACOSX" / "chest_xray" / "train" / "NORMAL" / "._IM-0115-0001.jpeg").write_bytes(b"\0")
    return archive


def head_archive(tmp: Path, copy: bool = False) -> Path:
    real = real_data("head_ct")
    archive = tmp / "head-ct-hemorrhage" / "versions" / "1"
    _fill(archive / "head_ct" / "head_ct", sorted(real.glob("*.png")), 200, copy)
    (archive / "labels.csv").write_bytes((real / "labels.csv").read_bytes())
    _junk(archive / "head_ct" / "head_ct")
    return archive


def skin_archive(tmp: Path) -> Path:
    real = real_data("skin_isic")
    archive = tmp / "skin-cancer9-classesisic" / "versions" / "1"
    top = archive / "Skin cancer ISIC The International Skin Imaging Collaboration"
    for rel, (_, n) in F.DATASETS["skin_isic"].folders.items():
        _fill(top / rel, sorted((real / rel).glob("*.jpg")), n)
    _junk(top / "Train" / "melanoma")
    return archive


ARCHIVES = {"chest_xray": chest_archive, "head_ct": head_archive, "skin_isic": skin_archive}


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("kagglehub")
    return {name: make(tmp) for name, make in ARCHIVES.items()}


def fake_download(archives: dict[str, Path], calls: list[str]):
    by_handle = {F.DATASETS[n].handle: p for n, p in archives.items()}

    def get(handle: str) -> Path:
        calls.append(handle)
        return by_handle[handle]

    return get


def test_the_three_sets_are_laid_out_where_the_study_looks_and_a_second_fetch_does_nothing(archives, tmp_path, monkeypatch):
    dest = tmp_path / "data"
    calls: list[str] = []
    said: list[str] = []
    for name in F.DATASETS:
        F.fetch(name, dest, fake_download(archives, calls), said.append)
    # the published counts, every image a link into the download (nothing copied), no junk
    chest = dest / "chest_xray"
    assert len(list((chest / "train" / "PNEUMONIA").iterdir())) == 3875 and len(list((chest / "val" / "NORMAL").iterdir())) == 8
    assert all(p.is_symlink() and p.resolve().is_file() for p in (chest / "test" / "NORMAL").iterdir())
    assert not (chest / "chest_xray").exists()  # the nested twin is not laid out a second time
    for name in F.DATASETS:
        files = [p for p in (dest / name).rglob("*") if p.is_file()]
        assert not [p for p in files if p.name.startswith(".") or "__MACOSX" in p.parts], name
        mark = json.loads((dest / name / F.MARK).read_text())
        assert sum(mark["images"].values()) == F.DATASETS[name].images
    assert len(list((dest / "head_ct").glob("*.png"))) == 200 and (dest / "head_ct" / "labels.csv").is_file()
    assert len(list((dest / "skin_isic").glob("Train/*/*.jpg"))) == 2239 and len(list((dest / "skin_isic").glob("Test/*/*.jpg"))) == 118
    assert any("junk" in line and "nothing copied" in line for line in said)
    assert not list(dest.glob(".*partial*"))

    # experiments/matrix.yaml finds every image there
    from runner.data.sources import scan_with_skips
    from runner.manifest import load_manifest

    monkeypatch.setenv("BYOL_DATA", str(dest))
    manifest = load_manifest(REPO / "experiments" / "matrix.yaml")
    counts = {name: len(scan_with_skips(spec)[0]) for name, spec in manifest.datasets.items()}
    assert counts["pneumonia"] == 5856 and counts["hemorrhage"] == 200
    assert counts["melanoma"] == 2357  # every class folder is found; the manifest keeps melanoma and nevus later

    # a second fetch downloads nothing and changes nothing
    before = sorted(str(p) for p in dest.rglob("*"))
    calls.clear()
    for name in F.DATASETS:
        F.fetch(name, dest, fake_download(archives, calls), said.append)
    assert calls == [] and sorted(str(p) for p in dest.rglob("*")) == before
    assert said[-1].startswith("skin_isic: already at")


def test_an_archive_that_changed_is_refused_and_nothing_looks_complete(tmp_path):
    archive = head_archive(tmp_path / "dl")
    next((archive / "head_ct" / "head_ct").glob("*.png")).unlink()
    with pytest.raises(UserError, match=r"head_ct: the download does not hold what .* publishes \(\.: 199 images, 200 published\)"):
        F.fetch("head_ct", tmp_path / "data", lambda h: archive, lambda s: None)
    assert not (tmp_path / "data" / "head_ct").exists() and not list((tmp_path / "data").glob(".*"))
    # a layout that is not the published one at all
    with pytest.raises(UserError, match="has no folder holding head_ct with .png images"):
        F.fetch("head_ct", tmp_path / "data", lambda h: tmp_path / "dl" / "nothing-here", lambda s: None)


def test_a_full_disk_midway_leaves_no_folder_that_looks_complete(tmp_path, monkeypatch):
    archive = head_archive(tmp_path / "dl")
    real, n = os.symlink, {"calls": 0}

    def symlink(src, dst, *a, **k):  # noqa: ANN001, ANN002, ANN003
        n["calls"] += 1
        if n["calls"] > 50:
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(F.os, "symlink", symlink)
    with pytest.raises(UserError, match="head_ct: the disk is full at .*: free some space and run the same command again"):
        F.fetch("head_ct", tmp_path / "data", lambda h: archive, lambda s: None)
    assert list((tmp_path / "data").iterdir()) == []


def test_what_a_killed_fetch_left_is_cleared_by_the_next(tmp_path):
    archive = head_archive(tmp_path / "dl")
    dead = tmp_path / "data" / ".head_ct.partial-999999999"  # no such process
    (dead / "half").mkdir(parents=True)
    F.fetch("head_ct", tmp_path / "data", lambda h: archive, lambda s: None)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["head_ct"]


def test_a_fetch_whose_download_is_gone_is_laid_out_again(tmp_path):
    first = head_archive(tmp_path / "dl1", copy=True)  # files of its own, as kagglehub's cache holds
    F.fetch("head_ct", tmp_path / "data", lambda h: first, lambda s: None)
    import shutil

    shutil.rmtree(tmp_path / "dl1")  # kagglehub's cache cleared: every link points nowhere
    second = head_archive(tmp_path / "dl2")
    said: list[str] = []
    F.fetch("head_ct", tmp_path / "data", lambda h: second, said.append)
    assert "point nowhere" in said[0] and all(p.exists() for p in (tmp_path / "data" / "head_ct").iterdir())


def test_a_short_top_copy_gives_way_to_a_complete_nested_one(tmp_path):
    archive = head_archive(tmp_path / "dl")  # head_ct/head_ct/*.png: the complete copy
    short = archive / "head_ct"
    for p in sorted((short / "head_ct").glob("*.png"))[:10]:
        os.symlink(p.resolve(), short / p.name)  # a shallower folder holding 10 of them
    F.fetch("head_ct", tmp_path / "data", lambda h: archive, lambda s: None)
    assert len(list((tmp_path / "data" / "head_ct").glob("*.png"))) == 200


def test_labels_without_their_column_are_refused(tmp_path):
    archive = head_archive(tmp_path / "dl")
    (archive / "labels.csv").write_text("id,label\n000,1\n")
    with pytest.raises(UserError, match="labels.csv has no 'hemorrhage' column"):
        F.fetch("head_ct", tmp_path / "data", lambda h: archive, lambda s: None)
    (archive / "labels.csv").write_text("")
    with pytest.raises(UserError, match="no 'hemorrhage' column"):
        F.fetch("head_ct", tmp_path / "data", lambda h: archive, lambda s: None)
    assert not (tmp_path / "data" / "head_ct").exists()


def test_a_folder_not_made_by_fetch_is_left_alone(tmp_path):
    (tmp_path / "data" / "skin_isic").mkdir(parents=True)
    with pytest.raises(UserError, match="skin_isic: .* exists and was not made by `data fetch`"):
        F.fetch("skin_isic", tmp_path / "data", lambda h: pytest.fail("nothing is downloaded"), lambda s: None)


@pytest.mark.parametrize(("error", "says"), [
    (ConnectionError("HTTPSConnectionPool(host='www.kaggle.com'): Max retries exceeded"), "no connection to kaggle.com"),
    (RuntimeError("401 Client Error: Unauthorized for url"), "put your API token in ~/.kaggle/kaggle.json"),
    (RuntimeError("429 Client Error: Too Many Requests"), "rate limit"),
    (OSError(errno.ENOSPC, "No space left on device"), "the disk is full"),
])
def test_every_download_failure_is_one_line_saying_what_to_do(monkeypatch, error, says):
    class Kagglehub:
        @staticmethod
        def dataset_download(handle: str) -> str:
            raise error

    monkeypatch.setitem(sys.modules, "kagglehub", Kagglehub)
    with pytest.raises(UserError) as e:
        F.download("felipekitamura/head-ct-hemorrhage")
    assert says in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith("downloading felipekitamura/")


def test_without_kagglehub_the_command_says_how_to_install_it(tmp_path):
    code = ("import sys; sys.modules['kagglehub'] = None; from runner.cli import main; "
            f"sys.exit(main(['data', 'fetch', 'head_ct', '--to', {str(tmp_path)!r}]))")
    import subprocess

    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and 'pip install -e ".[fetch]"' in r.stderr and "Traceback" not in r.stderr
    assert "downloading" not in r.stdout  # the missing package is said first, not after a promise to download
    unknown = run_cli("data", "fetch", "lungs")
    assert unknown.returncode == 2 and "unknown data set 'lungs': one of chest_xray, head_ct, skin_isic" in unknown.stderr
