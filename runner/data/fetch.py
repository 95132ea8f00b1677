"""`byol-runner data fetch`: the study's three published data sets, laid out where
`experiments/matrix.yaml` looks for them (`$BYOL_DATA/<name>`, default `data/`).

The download is kagglehub's (`kagglehub.dataset_download`: its own cache and credentials, as its
documentation says), behind one small function, `download`. Everything after it is here: find the
data set's folders inside the archive (the chest set nests a second copy under
`chest_xray/chest_xray/` and carries `__MACOSX/` junk), link every image into the layout the
manifest reads (symbolic links into kagglehub's cache: nothing is copied), skip junk (`__MACOSX`,
`.DS_Store`, `._*`, `Thumbs.db`), check the counts per folder against what the data set's page
publishes, and only then rename the finished folder into place. A fetch that stops halfway leaves a
`.<name>.partial-*` folder, never one that looks complete; a finished one holds `FETCHED.json`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from runner.errors import UserError
from runner.system import pid_alive

JUNK_DIRS = {"__MACOSX"}
JUNK_FILES = {".DS_Store", "Thumbs.db", "desktop.ini"}
MARK = "FETCHED.json"


@dataclass(frozen=True)
class Published:
    """A published data set: where it comes from, and what its archive holds."""

    name: str  # its folder under $BYOL_DATA (the manifest's root)
    handle: str  # Kaggle's owner/dataset
    title: str
    license: str
    # folder of the layout (relative, "" = the root) -> (folder inside the archive's root, image count)
    folders: dict[str, tuple[str, int]]
    extension: str
    files: tuple[str, ...] = ()  # other files the layout needs, found by name anywhere in the archive
    labels: dict[str, int] = field(default_factory=dict)  # labels.csv's published counts per label

    @property
    def page(self) -> str:
        return f"https://www.kaggle.com/datasets/{self.handle}"

    @property
    def images(self) -> int:
        return sum(n for _, n in self.folders.values())


_SKIN_TRAIN = {"actinic keratosis": 114, "basal cell carcinoma": 376, "dermatofibroma": 95, "melanoma": 438, "nevus": 357,
               "pigmented benign keratosis": 462, "seborrheic keratosis": 77, "squamous cell carcinoma": 181, "vascular lesion": 139}
_SKIN_TEST = {c: (3 if c in ("seborrheic keratosis", "vascular lesion") else 16) for c in _SKIN_TRAIN}

DATASETS = {d.name: d for d in (
    Published(
        "chest_xray", "paultimothymooney/chest-xray-pneumonia", "Chest X-Ray Images (Pneumonia), Kermany et al. 2018",
        "CC BY 4.0 (Mendeley Data doi:10.17632/rscbjbr9sj.2)",
        {f"{s}/{c}": (f"{s}/{c}", n) for (s, c), n in {("train", "NORMAL"): 1341, ("train", "PNEUMONIA"): 3875, ("val", "NORMAL"): 8,
                                                      ("val", "PNEUMONIA"): 8, ("test", "NORMAL"): 234, ("test", "PNEUMONIA"): 390}.items()},
        ".jpeg"),
    Published(
        "head_ct", "felipekitamura/head-ct-hemorrhage", "Head CT - hemorrhage (Kitamura)", "as on the Kaggle page (research use)",
        {"": ("head_ct", 200)}, ".png", files=("labels.csv",), labels={"0": 100, "1": 100}),
    Published(
        "skin_isic", "nodoubttome/skin-cancer9-classesisic", "Skin Cancer ISIC, 9 classes (ISIC Archive)",
        "per image, ISIC Archive (mostly CC-0, CC-BY, CC-BY-NC): non-commercial research use with attribution",
        {**{f"Train/{c}": (f"Train/{c}", n) for c, n in _SKIN_TRAIN.items()},
         **{f"Test/{c}": (f"Test/{c}", n) for c, n in _SKIN_TEST.items()}}, ".jpg"),
)}


def _kagglehub():  # noqa: ANN202 - the module
    try:
        import kagglehub
    except ImportError:
        raise UserError('data fetch downloads through kagglehub, which is not installed: pip install -e ".[fetch]" in the '
                        "byol-runner checkout (or pip install kagglehub)") from None
    return kagglehub


def download(handle: str) -> Path:
    """The data set's files, as kagglehub downloads (or finds in its cache) them."""
    kagglehub = _kagglehub()
    try:
        return Path(kagglehub.dataset_download(handle))
    except Exception as e:  # noqa: BLE001 - every failure of the download becomes one line that says what to do
        raise UserError(f"downloading {handle} failed: {_why(e)}") from None


def _why(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    low = text.lower()
    if any(k in low for k in ("401", "403", "unauthorized", "forbidden", "credentials")):
        return (f"Kaggle refused the credentials ({text}): put your API token in ~/.kaggle/kaggle.json or set KAGGLE_USERNAME "
                "and KAGGLE_KEY (kaggle.com, Settings, API), and accept the data set's terms on its page")
    if "429" in low or "too many requests" in low or "rate limit" in low:
        return f"Kaggle's rate limit ({text}): wait a few minutes and run the same command again"
    if isinstance(e, (ConnectionError, TimeoutError)) or any(k in low for k in ("connection", "resolve", "timed out", "network")):
        return f"no connection to kaggle.com ({text}): check the network or proxy (HTTPS_PROXY), then run the same command again"
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"the disk is full ({text}): free space where kagglehub caches (KAGGLEHUB_CACHE, default ~/.cache/kagglehub)"
    return text


def _is_junk(path: Path) -> bool:
    return path.name in JUNK_FILES or path.name.startswith("._") or any(p in JUNK_DIRS for p in path.parts)


def _images(folder: Path, extension: str) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == extension and not _is_junk(p))


def find_root(archive: Path, d: Published) -> Path:
    """The folder of the archive the published folders hang from, outside any junk folder: the
    shallowest whose counts are the published ones (the chest archive has a nested copy), else the
    shallowest where every folder holds images (whose counts the caller then reports)."""
    candidates = [archive, *sorted((p for p in archive.rglob("*") if p.is_dir() and not _is_junk(p)), key=lambda p: len(p.parts))]
    holding = [root for root in candidates if all(_images(root / inner, d.extension) for inner, _ in d.folders.values())]
    for root in holding:
        if all(len(_images(root / inner, d.extension)) == n for inner, n in d.folders.values()):
            return root
    if holding:
        return holding[0]
    wanted = ", ".join(inner or "." for inner, _ in d.folders.values())
    raise UserError(f"{d.name}: the download at {archive} has no folder holding {wanted} with {d.extension} images: the archive "
                    f"has changed since byol-runner knew it ({d.page}); lay it out by hand (README, 'Data')")


def fetch(name: str, dest: Path, get: Callable[[str], Path] = download, say: Callable[[str], None] = print) -> Path:
    """One data set, laid out at dest/<name>; returns that folder. Already fetched: nothing to do."""
    d = DATASETS[name]
    final = dest / d.name
    if (final / MARK).is_file():
        broken = [p for p in final.rglob("*") if p.is_symlink() and not p.exists()]
        if not broken:
            say(f"{d.name}: already at {final} ({d.images} images, fetched before): nothing to do")
            return final
        # its links point into a download that is gone (kagglehub's cache cleared or moved): lay it out again
        say(f"{d.name}: {len(broken)} links at {final} point nowhere (the download they point into is gone): fetching again")
        shutil.rmtree(final)
    if final.exists():
        raise UserError(f"{d.name}: {final} exists and was not made by `data fetch`: move it away, or fetch elsewhere with --to DIR")
    if get is download:
        _kagglehub()  # missing: said before "downloading"
    say(f"{d.name}: downloading {d.handle} through kagglehub ({d.page})")
    archive = get(d.handle)
    root = find_root(archive, d)
    dest.mkdir(parents=True, exist_ok=True)
    for stale in dest.glob(f".{d.name}.partial-*"):  # a fetch killed halfway (its process is gone)
        pid = stale.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    partial = dest / f".{d.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        found = _lay_out(d, archive, root, partial)
        wrong = {k: (n, found[k]) for k, (_, n) in d.folders.items() if found[k] != n}
        if wrong:
            detail = "; ".join(f"{k or '.'}: {got} images, {want} published" for k, (want, got) in wrong.items())
            raise UserError(f"{d.name}: the download does not hold what {d.page} publishes ({detail}): the archive has changed; "
                            "nothing was laid out")
        (partial / MARK).write_text(json.dumps({"dataset": d.handle, "source": str(root), "images": found,
                                                "license": d.license}, indent=1))
        os.replace(partial, final)
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise UserError(f"{d.name}: the disk is full at {dest}: free some space and run the same command again") from None
        raise UserError(f"{d.name}: cannot lay out {final}: {e.strerror or e} ({e.filename or dest})") from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    junk = sum(1 for p in archive.rglob("*") if _is_junk(p))
    say(f"{d.name}: {d.images} images linked at {final} from {root} (nothing copied; {junk} junk files and folders left out); "
        f"license: {d.license}")
    return final


def _lay_out(d: Published, archive: Path, root: Path, out: Path) -> dict[str, int]:
    """Links to every image of each published folder (and the extra files), under `out`; the counts."""
    found = {}
    for rel, (inner, _) in d.folders.items():
        target = out / rel
        target.mkdir(parents=True, exist_ok=True)
        images = _images(root / inner, d.extension)
        for img in images:
            os.symlink(img.resolve(), target / img.name)
        found[rel] = len(images)
    for name in d.files:
        hits = sorted((p for p in archive.rglob(name) if p.is_file() and not _is_junk(p)), key=lambda p: len(p.parts))
        if not hits:
            raise UserError(f"{d.name}: the download has no {name}: the archive has changed ({d.page})")
        os.symlink(hits[0].resolve(), out / name)
        if name == "labels.csv" and d.labels:
            _check_labels(d, hits[0])
    return found


def _check_labels(d: Published, path: Path) -> None:
    import csv

    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{d.name}: cannot read {path}: {e}") from None
    header = [h.strip() for h in rows[0]] if rows else []
    if "hemorrhage" not in header:
        raise UserError(f"{d.name}: {path} has no 'hemorrhage' column (header {header}): the archive has changed ({d.page})")
    column = header.index("hemorrhage")
    counts: dict[str, int] = {}
    for row in rows[1:]:
        if row:
            counts[row[column].strip()] = counts.get(row[column].strip(), 0) + 1
    if counts != d.labels:
        raise UserError(f"{d.name}: {path.name} counts {counts}, {d.page} publishes {d.labels}: the archive has changed")


def default_dest() -> Path:
    """Where experiments/matrix.yaml looks: $BYOL_DATA, else data/."""
    return Path(os.environ.get("BYOL_DATA") or "data")
