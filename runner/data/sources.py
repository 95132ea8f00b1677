"""Where images and labels come from: one pydantic model per source kind, and its file scan.

A source turns a manifest's `datasets.<name>` entry into a sorted list of `Item`s (a stable key,
the label as the source writes it, the split folder it came from, a group id). Nothing here
decodes an image: that is `decode.py`'s job, through the cache.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import Field, field_validator, model_validator

from runner.choices import StrictModel
from runner.errors import DataError, first_line

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
KNOWN_EXTENSIONS = (*IMAGE_EXTENSIONS, ".dcm", ".dicom", ".ima", ".nii", ".nii.gz")


def is_image_name(name: str, path: str) -> bool:
    """An image file by its name (an image format, DICOM, NIfTI), or a DICOM file without an extension."""
    from runner.data.medical import medical_kind, sniff_dicom

    ext = os.path.splitext(name)[1].lower()
    if ext in IMAGE_EXTENSIONS or medical_kind(name) is not None:
        return True
    return ext == "" and not name.startswith(".") and name.upper() != "DICOMDIR" and sniff_dicom(path)
SPLITS = ("train", "val", "test")
REST = "*"  # in a class mapping: every source class not named elsewhere


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_path(value: str) -> str:
    """`~` and `${VAR}` / `${VAR:-default}` expansion, so one manifest serves several machines."""

    def sub(m: re.Match[str]) -> str:
        val = os.environ.get(m.group(1))
        if val:
            return val
        if m.group(2) is not None:
            return m.group(2)
        raise ValueError(f"environment variable {m.group(1)} is not set (write ${{{m.group(1)}:-default}} for a default)")

    return os.path.expanduser(_ENV_REF.sub(sub, value))


class NearDuplicates(StrictModel):
    """Images that are copies of one another without an id saying so (resized, re-encoded, another
    photograph of one lesion): joined into one group (runner/data/neardup.py)."""

    max_bits: int = Field(8, ge=0, le=32, description="the most bits of their 64-bit perceptual hashes two copies may differ in")
    min_correlation: float = Field(0.92, ge=0.0, le=1.0, description="the least Pearson correlation of their 16 x 16 "
                                   "colour thumbnails (a close hash alone also pairs different lesions of one layout)")


class SplitSpec(StrictModel):
    """How items are split into train/val/test.

    `given`: the source's own split folders (or arrays); a missing val split is carved out of train.
    `stratified`: the source's split folders are pooled and split anew, stratified by class and,
    with `group_pattern`, grouped so that no group (a patient) spans two splits.
    """

    strategy: Literal["given", "stratified"] = Field(
        "stratified", description="given: the source's own split folders (or columns, arrays); stratified: pooled and split anew")
    val: float = Field(0.15, ge=0.0, lt=1.0, description="fraction for val (stratified, or carved from train)")
    test: float = Field(0.15, ge=0.0, lt=1.0, description="fraction for test (stratified only)")
    group_pattern: str | None = Field(
        None,
        description="regex searched in each file's relative path; the first capture group that matched "
        "(or the whole match) is the group id, e.g. a patient id: '(person\\d+)_|((?:NORMAL2-)?IM-\\d+)-'",
    )
    group_tag: str | None = Field(
        None, description="a DICOM attribute whose value is the group id, e.g. PatientID (or StudyInstanceUID): the "
        "images and slices of one patient never span two splits; files without it are grouped as without this")
    near_duplicates: NearDuplicates | None = Field(
        None, description="true (or its settings): near-duplicate images (a resized or re-encoded copy, another photograph "
        "of one lesion) are one group, kept in one split and resampled together; `data audit` lists the pairs either way")
    seed: int = Field(0, description="split seed; the run's seeds vary the label subsets, not the test set")

    @field_validator("near_duplicates", mode="before")
    @classmethod
    def _near_duplicates(cls, v):  # noqa: ANN001, ANN206
        return {} if v is True else None if v is False else v

    @field_validator("group_tag")
    @classmethod
    def _known_tag(cls, v: str | None) -> str | None:
        if v is not None:
            from pydicom.datadict import tag_for_keyword

            if tag_for_keyword(v) is None:
                raise ValueError(f"{v!r} is not a DICOM attribute keyword (e.g. PatientID, StudyInstanceUID, SeriesInstanceUID)")
        return v

    @field_validator("group_pattern")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"not a valid regular expression: {e}") from None
        return v

    @model_validator(mode="after")
    def _fractions(self) -> "SplitSpec":
        if self.strategy == "stratified" and self.val + self.test >= 1.0:
            raise ValueError(f"val + test must leave something for train (got {self.val} + {self.test})")
        if self.group_tag and self.group_pattern:
            raise ValueError("group_tag and group_pattern both name the group: set one")
        return self


ClassMap = dict[str, Union[list[str], Literal["*"]]]


class DatasetBase(StrictModel):
    classes: list[str] | ClassMap | None = Field(
        None,
        description="class selection: a list keeps those source classes; a mapping new -> [source classes] "
        "merges them, '*' takes every source class not named elsewhere (e.g. {melanoma: [melanoma], other: '*'})",
    )
    positive: str | None = Field(None, description="the positive class of a binary task (for sensitivity/AUROC)")
    split: SplitSpec = Field(default_factory=SplitSpec, description="how the images are split into train, val and test")
    image_size: int = Field(224, ge=8, le=2048, description="cached image side in pixels")
    fit: Literal["pad", "crop", "squash"] = Field(
        "pad", description="pad: keep aspect, pad with black; crop: keep aspect, centre crop; squash: resize"
    )
    channels: Literal["auto", 1, 3] = Field("auto", description="auto: 1 when the content is grayscale, else 3")
    on_bad_image: Literal["skip", "fail"] = Field("skip", description="an unreadable or truncated image")
    on_conflict: Literal["drop", "keep"] = Field(
        "drop", description="the same image under two labels: drop every copy, or keep them (not advised)"
    )
    dedupe: bool = Field(True, description="keep one copy of an image that appears more than once with one label")
    exclude: list[str] = Field(
        default_factory=list, description="source classes left out on purpose, e.g. [seborrheic keratosis]: never mapped "
        "(not even by '*'), counted as 'class excluded' in the report's image accounting")
    external_test_of: str | None = Field(
        None, description="this data set is an external test set of that one (another entry of datasets): all of it is "
        "test (no split, no budget, no pretraining); every classifier trained on that one scores it; its images are "
        "prepared as that one's (image_size, fit, channels) and its `classes` map its own onto that one's")

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: list[str] | ClassMap | None) -> list[str] | ClassMap | None:
        if isinstance(v, list):
            if len(set(v)) != len(v):
                raise ValueError("a class is listed twice")
            if len(v) < 2:
                raise ValueError("a classification task needs at least two classes")
        elif isinstance(v, dict):
            if len(v) < 2:
                raise ValueError("a classification task needs at least two classes")
            if sum(1 for s in v.values() if s == REST) > 1:
                raise ValueError("only one class can take the rest ('*')")
            named = [c for s in v.values() if s != REST for c in s]
            if len(set(named)) != len(named):
                raise ValueError("a source class is mapped to two classes")
        return v

    @model_validator(mode="after")
    def _positive(self) -> "DatasetBase":
        if self.positive is not None and self.classes is not None and self.positive not in self.classes:
            raise ValueError(f"positive class {self.positive!r} is not one of the classes {list(self.classes)}")
        return self


class Window(StrictModel):
    level: float = Field(description="the window's centre, in the file's modality units (HU for CT)")
    width: float = Field(ge=1, description="the window's width (at least 1)")


WindowName = Literal["brain", "subdural", "stroke", "bone", "lung", "soft_tissue"]
WindowSpec = Union[WindowName, Window]


class RootedSource(DatasetBase):
    root: str = Field(description="dataset folder; relative paths are from the working directory; ${VAR:-x} and ~ expand")
    window: WindowSpec | list[WindowSpec] | None = Field(
        None, description="DICOM and NIfTI: the window applied to the rescaled values (HU for CT): a preset (brain 40/80, "
        "subdural 80/200, stroke 40/40, bone 600/2800, lung -600/1500, soft_tissue 50/400, as level/width), "
        "{level, width}, or a list of three, one a channel (e.g. [brain, subdural, bone]); absent: a DICOM file's own "
        "window or VOI LUT, else each image's range (a NIfTI volume's range). Other image files are read as they are",
        json_schema_extra={"type_text": "a preset name, a section (below), a list of three of them, or null"})
    slice_axis: Literal["axial", "coronal", "sagittal"] = Field(
        "axial", description="NIfTI volumes: one image a slice along this axis (of the volume turned to RAS+); "
        "the slices of one volume are one group, never split apart")

    @field_validator("window")
    @classmethod
    def _windows(cls, v):  # noqa: ANN001, ANN206
        if isinstance(v, list) and len(v) not in (1, 3):
            raise ValueError(f"{len(v)} windows: give one, or three (one a channel)")
        return v

    @model_validator(mode="after")
    def _window_channels(self) -> "RootedSource":
        if len(self.windows or ()) == 3 and self.channels == 1:
            raise ValueError("three windows make three channels: leave channels at auto (or 3)")
        return self

    @property
    def windows(self) -> tuple[tuple[float, float], ...] | None:
        """The window setting as (level, width) pairs, one a channel; None when absent."""
        from runner.data.medical import WINDOWS

        if self.window is None:
            return None
        given = self.window if isinstance(self.window, list) else [self.window]
        return tuple((float(a), float(b)) for a, b in (WINDOWS[w] if isinstance(w, str) else (w.level, w.width) for w in given))

    @field_validator("root")
    @classmethod
    def _root_exists(cls, v: str) -> str:
        path = expand_path(v)
        if not os.path.isdir(path):
            raise ValueError(f"no such directory: {v}" + (f" ({path})" if path != v else ""))
        return v

    @property
    def root_path(self) -> Path:
        return Path(expand_path(self.root)).resolve()


class ImageFolderSource(RootedSource):
    """Class per folder: `root/<class>/*.png`, or with split folders `root/<split>/<class>/*`."""

    source: Literal["imagefolder"] = Field(description="one folder per class (optionally inside split folders)")
    split_dirs: dict[Literal["train", "val", "test"], str] | None = Field(
        None, description="split -> folder under root, e.g. {train: Train, test: Test}; absent: root holds class folders"
    )

    @model_validator(mode="after")
    def _given_needs_dirs(self) -> "ImageFolderSource":
        if self.split.strategy == "given" and not self.split_dirs:
            raise ValueError("split.strategy 'given' needs split_dirs (which folder is train, val, test)")
        if self.split_dirs and self.split.strategy == "given" and not {"train", "test"} <= set(self.split_dirs):
            raise ValueError("split_dirs needs at least train and test for split.strategy 'given'")
        return self


class CsvSource(RootedSource):
    """A label file: one row per image, an image column (a path, or an id put into `image_pattern`)."""

    source: Literal["csv"] = Field(description="a table of image files and labels")
    labels_csv: str = Field("labels.csv", description="the label file, relative to root")
    image_column: str = Field(description="the column naming each image (a path, or an id for image_pattern)")
    label_column: str = Field(description="the column holding each image's label")
    image_pattern: str | None = Field(
        None, description="file name made from the image column, e.g. '{}.png' or '{:03d}.png'; absent: the column is the path"
    )

    @field_validator("image_pattern")
    @classmethod
    def _one_field(cls, v: str | None) -> str | None:
        """One replacement field, `{}` or `{:SPEC}` with a short plain format spec: anything else cannot
        format one value (and '{:>999999999999}' would allocate without end)."""
        if v is None:
            return v
        import string

        try:
            fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(v) if name is not None]
        except ValueError as e:
            raise ValueError(f"{v!r} is not a format pattern ({e})") from None
        if len(fields) != 1 or fields[0][0] not in ("", "0") or fields[0][2] is not None or \
                not re.fullmatch(r"[<>^=]?[+\- ]?0?\d{0,3}(\.\d{1,3})?[dsxXob]?", fields[0][1] or ""):
            raise ValueError(f"{v!r}: one field, '{{}}' or a short format such as '{{:03d}}' (e.g. 'img_{{:05d}}.png')")
        return v
    image_dir: str = Field(".", description="folder of the images, relative to root")
    split_column: str | None = Field(None, description="a column with train/val/test, for split.strategy 'given'")
    group_column: str | None = Field(None, description="a column with a group id (patient); overrides group_pattern")
    on_missing: Literal["fail", "skip"] = Field("fail", description="a row whose image file does not exist")
    encoding: str | None = Field(None, description="the label file's text encoding, e.g. utf-8, cp1252, latin-1, utf-16; "
                                 "absent: detected (a byte order mark, else utf-8, else cp1252); `data audit` says which")
    delimiter: Literal[",", ";", "\t"] | None = Field(None, description="the label file's column separator; absent: detected "
                                                      "from its header line (comma, semicolon or tab)")

    @model_validator(mode="after")
    def _given_needs_column(self) -> "CsvSource":
        if self.split.strategy == "given" and not self.split_column:
            raise ValueError("split.strategy 'given' needs split_column for a csv source")
        return self


class NpzSource(DatasetBase):
    """MedMNIST-style arrays: `{train,val,test}_images` (N,H,W[,C] uint8) and `{split}_labels`."""

    source: Literal["npz"] = Field(description="MedMNIST-style arrays in one .npz file")
    path: str = Field(description="the .npz file")
    class_names: list[str] | None = Field(None, description="names of the integer labels 0..K-1")

    @field_validator("path")
    @classmethod
    def _file_exists(cls, v: str) -> str:
        if not os.path.isfile(expand_path(v)):
            raise ValueError(f"no such file: {v}")
        return v


class SyntheticSource(DatasetBase):
    """Made at run time from a seed: grayscale scan-like images, one structure per class. Not real data."""

    source: Literal["synthetic"] = Field(description="made from a seed at run time: the demo and the tests, not real data")
    num_classes: int = Field(2, ge=2, le=4, description="classes to make (class0, class1, ...)")
    per_class: int = Field(200, ge=4, le=100_000, description="images a class")
    size: int = Field(64, ge=16, le=512, description="generated side in pixels")
    seed: int = Field(0, description="the generator's seed: another seed, other images")


DatasetSpec = Annotated[
    Union[ImageFolderSource, CsvSource, NpzSource, SyntheticSource], Field(discriminator="source")
]


@dataclass(frozen=True)
class Item:
    """One image as the source lists it. `key` is stable across machines (a relative path)."""

    key: str
    label: str
    origin_split: str | None = None
    group: str | None = None


@dataclass(frozen=True)
class Skipped:
    """A file or row the scan passed over, and why: it is counted in the audit and the report."""

    key: str
    reason: Literal["missing file", "unknown extension", "listed twice"]
    detail: str


def scan(spec: DatasetBase) -> list[Item]:
    """The source's items, sorted by key, labels as written by the source (before class mapping)."""
    return scan_with_skips(spec)[0]


def scan_with_skips(spec: DatasetBase) -> tuple[list[Item], list[Skipped]]:
    """The source's items (as `scan`) and what the scan passed over: CSV rows whose image is missing
    (with `on_missing: skip`) and files in class folders whose extension is not an image's."""
    skipped: list[Skipped] = []
    if isinstance(spec, ImageFolderSource):
        items = _scan_imagefolder(spec, skipped)
    elif isinstance(spec, CsvSource):
        items = _scan_csv(spec, skipped)
    elif isinstance(spec, NpzSource):
        items = _scan_npz(spec)
    elif isinstance(spec, SyntheticSource):
        items = [
            Item(key=f"synthetic/{c}/{i:06d}", label=f"class{c}")
            for c in range(spec.num_classes)
            for i in range(spec.per_class)
        ]
    else:  # pragma: no cover - the discriminated union admits nothing else
        raise TypeError(type(spec))
    items.sort(key=lambda it: it.key)
    pattern = spec.split.group_pattern
    column = isinstance(spec, CsvSource) and spec.group_column
    if pattern and not column:
        rx = re.compile(pattern)
        items = [Item(it.key, it.label, it.origin_split, group_of(rx, it.key, None)) for it in items]
    if isinstance(spec, RootedSource):
        items = _medical_items(spec, items, skipped, tag=None if column else spec.split.group_tag)
        items.sort(key=lambda it: it.key)
    return items, sorted(skipped, key=lambda s: s.key)


def group_of(rx: re.Pattern[str], key: str, default: str | None = "") -> str | None:
    """The group id a pattern finds in a key; a key it does not match is a group of its own (or `default`)."""
    m = rx.search(key)
    if m is None:
        return key if default == "" else default
    return next((g for g in m.groups() if g is not None), m.group(0))


def _medical_items(spec: "RootedSource", items: list[Item], skipped: list[Skipped], tag: str | None) -> list[Item]:
    """Volumes as one item a slice (`file#0042`, grouped by their file unless a group was given),
    `group_tag`'s value read from each DICOM file's header, and a single-frame DICOM file with no
    group grouped by its SeriesInstanceUID (the files of one series, often one a slice, stay together). A header that cannot be read leaves the
    file one item: decoding it gives the reason, counted with the unreadable images."""
    from runner.data import medical

    root = spec.root_path
    out: list[Item] = []
    for it in items:
        path = str(root / it.key)
        kind = medical.file_kind(path)
        if kind is None:
            out.append(it)
            continue
        group = it.group
        try:
            if kind == "nifti":
                count = medical.nifti_slices(path, spec.slice_axis)
                volume = True
            else:
                header = medical.read_dicom_header(path, (tag, "SeriesInstanceUID") if tag else ("SeriesInstanceUID",))
                count, volume = header["frames"], header["frames"] > 1
                # a series exported one file a slice is one volume: its files one group, as a NIfTI volume's slices
                group = group or (header.get(tag) if tag else None) or (None if volume else header.get("SeriesInstanceUID"))
        except medical.MedicalError:
            out.append(it)
            continue
        if not volume:
            out.append(Item(it.key, it.label, it.origin_split, group))
            continue
        group = group or it.key
        out += [Item(k, it.label, it.origin_split, group) for k in medical.slice_keys(it.key, count)]
    return out


def _points_up(link: str, root: Path) -> bool:
    """Whether a link to a folder points at the data set's root, above it, or at a folder above the link."""
    target = os.path.realpath(link)
    here, top = os.path.realpath(os.path.dirname(link)), os.path.realpath(root)
    return any(p == target or p.startswith(target + os.sep) for p in (here, top))


def _list_images(root: Path, folder: Path, skipped: list[Skipped]) -> list[str]:
    """Image files under folder, recursively, as sorted keys relative to root (os.scandir and plain
    strings: a scan of 100k files is a stat-free directory walk). Other files, not hidden ones, go to
    `skipped`."""
    prefix = len(str(root)) + 1
    found: list[str] = []
    stack = [str(folder)]
    seen: set[tuple[int, int]] = set()  # folders by (device, inode): a link back up is listed once, not forever
    while stack:
        path = stack.pop()
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) in seen:
                skipped.append(Skipped(path[prefix:].replace(os.sep, "/"), "folder listed twice",
                                       "a link to a folder already listed (a loop, or two links to one folder)"))
                continue
            seen.add((st.st_dev, st.st_ino))
            it = os.scandir(path)
        except OSError as e:
            skipped.append(Skipped(path[prefix:].replace(os.sep, "/") or ".", "unreadable folder", e.strerror or str(e)))
            continue
        with it:
            for entry in it:
                if entry.is_dir() and not entry.name.startswith("."):
                    if entry.is_symlink() and _points_up(entry.path, root):
                        skipped.append(Skipped(entry.path[prefix:].replace(os.sep, "/"), "folder listed twice",
                                               "a link to a folder above it in the data set (a loop)"))
                        continue
                    stack.append(entry.path)
                elif entry.is_file() and is_image_name(entry.name, entry.path):
                    found.append(entry.path[prefix:].replace(os.sep, "/"))
                elif entry.is_file() and not entry.name.startswith("."):
                    ext = os.path.splitext(entry.name)[1] or "(none)"
                    skipped.append(Skipped(entry.path[prefix:].replace(os.sep, "/"), "unknown extension",
                                           "a DICOMDIR (the index of a DICOM disc), not an image" if entry.name.upper() == "DICOMDIR"
                                           else f"extension {ext} is not one of {', '.join(KNOWN_EXTENSIONS)}"
                                           + (" (nor a DICOM file)" if ext == "(none)" else "")))
    return sorted(found)


def _scan_class_folders(root: Path, base: Path, origin: str | None, skipped: list[Skipped]) -> list[Item]:
    class_dirs = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{base}: no class folders (expected {base}/<class>/<image files>)")
    items: list[Item] = []
    for cdir in class_dirs:
        keys = _list_images(root, cdir, skipped)
        if not keys:
            raise DataError(f"{cdir}: empty class folder (no {', '.join(KNOWN_EXTENSIONS)} files)")
        items += [Item(k, cdir.name, origin) for k in keys]
    return items


def _scan_imagefolder(spec: ImageFolderSource, skipped: list[Skipped]) -> list[Item]:
    root = spec.root_path
    if not spec.split_dirs:
        return _scan_class_folders(root, root, None, skipped)
    items: list[Item] = []
    for split, name in spec.split_dirs.items():
        base = root / name
        if not base.is_dir():
            raise DataError(f"{root}: split folder {name!r} (for {split}) does not exist")
        items += _scan_class_folders(root, base, split, skipped)
    return items


MAX_TABLE_BYTES = 256 << 20
DELIMITERS = {",": "comma", ";": "semicolon", "\t": "tab"}


def table_format(path: Path, encoding: str | None = None, delimiter: str | None = None) -> tuple[str, str, str]:
    """A label table's text, its encoding and its delimiter: as given, else detected. Encoding: a byte
    order mark (UTF-8, UTF-16), else UTF-8 if it decodes, else cp1252 (what Excel saves in Western
    Europe), else Latin-1. Delimiter: the one of comma, semicolon and tab that the header line holds
    most of (comma when it holds none)."""
    import codecs

    from runner.atomic import FileTooLarge, NotRegularFile, read_regular_file

    try:
        raw = read_regular_file(path, MAX_TABLE_BYTES)
    except NotRegularFile:
        raise DataError(f"{path}: not a regular file: a label table is a CSV file") from None
    except FileTooLarge as e:
        raise DataError(f"{path}: {e.size} bytes: a label table is at most {MAX_TABLE_BYTES >> 20} MiB") from None
    except FileNotFoundError:
        raise DataError(f"label file not found: {path}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the label file ({e.strerror or e})") from None
    if encoding:
        try:
            text = raw.decode(encoding)
        except LookupError:
            raise DataError(f"{path}: encoding {encoding!r} is not one Python knows (e.g. utf-8, cp1252, latin-1, utf-16)") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not {encoding} (byte {e.start}: {raw[e.start:e.start + 1]!r}); leave `encoding` out to "
                            "have it detected") from None
    elif raw.startswith(codecs.BOM_UTF8):
        encoding, text = "utf-8 (with a byte order mark)", raw.decode("utf-8-sig", errors="strict")
    elif raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding, text = "utf-16", raw.decode("utf-16")
    else:
        for encoding in ("utf-8", "cp1252", "latin-1"):
            try:
                text = raw.decode(encoding)
                break
            except UnicodeDecodeError:
                continue
    if delimiter is None:
        header = next((line for line in text.splitlines() if line.strip()), "")
        counts = {d: header.count(d) for d in DELIMITERS}
        delimiter = max(counts, key=lambda d: counts[d]) if any(counts.values()) else ","
    return text, encoding, delimiter


def _read_csv(path: Path, encoding: str | None = None, delimiter: str | None = None):  # noqa: ANN202 - a pandas DataFrame
    import io

    import pandas as pd

    text, _, sep = table_format(path, encoding, delimiter)
    try:
        # skipinitialspace + strip: Kaggle's head CT header is "id, hemorrhage" (note the space).
        df = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, skipinitialspace=True, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise DataError(f"{path}: not a readable CSV file ({first_line(e)})") from None
    df.columns = [str(c).strip() for c in df.columns]
    return df


def _image_name(pattern: str | None, value: str) -> str:
    if pattern is None:
        return value
    try:
        return pattern.format(value)
    except ValueError:  # a numeric format spec such as {:03d} needs an int
        try:
            return pattern.format(int(value))
        except ValueError:
            raise DataError(f"image_pattern {pattern!r} cannot format the value {value!r}") from None


def _scan_csv(spec: CsvSource, skipped: list[Skipped]) -> list[Item]:
    root = spec.root_path
    csv_path = root / spec.labels_csv
    df = _read_csv(csv_path, spec.encoding, spec.delimiter)
    wanted = [spec.image_column, spec.label_column, spec.split_column, spec.group_column]
    missing = [c for c in wanted if c is not None and c not in df.columns]
    if missing:
        raise DataError(f"{csv_path}: no column {', '.join(map(repr, missing))} (columns: {', '.join(df.columns)})")
    top = Path(os.path.normpath(root))
    image_dir = Path(os.path.normpath(root / spec.image_dir))
    items: list[Item] = []
    missing_rows: list[str] = []
    for row_no, row in enumerate(df.to_dict("records"), start=2):  # line 1 is the header
        name = _image_name(spec.image_pattern, row[spec.image_column].strip())
        path = Path(os.path.normpath(image_dir / name))
        if not path.is_relative_to(top):
            raise DataError(f"{csv_path} line {row_no}: {name} is outside the data set's root {root}: image paths are read "
                            "relative to root (or image_dir) and must stay under it")
        if not path.is_file():
            missing_rows.append(f"line {row_no}: {path}")
            skipped.append(Skipped(f"{spec.labels_csv}:{row_no}", "missing file", f"line {row_no} names {path}, which does not exist"))
            continue
        label = row[spec.label_column].strip()
        if label == "":
            raise DataError(f"{csv_path} line {row_no}: empty label in column {spec.label_column!r}")
        origin = row[spec.split_column].strip().lower() if spec.split_column else None
        if origin is not None and origin not in SPLITS:
            raise DataError(f"{csv_path} line {row_no}: split {origin!r} is not one of {', '.join(SPLITS)}")
        group = row[spec.group_column].strip() if spec.group_column else None
        items.append(Item(path.relative_to(top).as_posix(), label, origin, group))
    if missing_rows and spec.on_missing == "fail":
        more = f" (and {len(missing_rows) - 1} more)" if len(missing_rows) > 1 else ""
        raise DataError(f"{csv_path}: image file missing for {missing_rows[0]}{more}; set on_missing: skip to ignore")
    items = _once_per_file(items, skipped)
    if not items:
        raise DataError(f"{csv_path}: no rows with an existing image")
    return items


def _once_per_file(items: list[Item], skipped: list[Skipped]) -> list[Item]:
    """A file the table lists more than once: under one label, its first row is kept and the others are
    counted as 'listed twice'; under two labels, none is kept (a label conflict) and every row is
    counted. (Left in, the copies were taken for duplicate images and the file dropped under one count.)"""
    rows: dict[str, list[Item]] = {}
    for it in items:
        rows.setdefault(it.key, []).append(it)
    out = []
    for key, same in rows.items():
        labels = sorted({it.label for it in same})
        if len(labels) == 1:
            out.append(same[0])
            skipped += [Skipped(key, "listed twice", f"listed {len(same)} times (under {labels[0]}): its first row is kept")
                        for _ in same[1:]]
        else:
            skipped += [Skipped(key, "listed twice", f"listed under {len(labels)} labels ({', '.join(labels)}): left out")
                        for _ in same]
    return out


def _scan_npz(spec: NpzSource) -> list[Item]:
    from runner.data.arrays import load_npz_labels

    items: list[Item] = []
    for split, labels in load_npz_labels(expand_path(spec.path)).items():
        names = spec.class_names
        for i, y in enumerate(labels):
            if names is not None and not 0 <= y < len(names):
                raise DataError(f"{spec.path}: {split}_labels[{i}] = {y} but class_names has {len(names)} names")
            items.append(Item(f"{split}/{i:07d}", names[y] if names else str(int(y)), split))
    return items
