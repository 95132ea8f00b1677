"""From a manifest's dataset entry to clean, labeled splits: scan, decode (cached), audit, filter,
map classes, split, and hand out label subsets."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runner.data import neardup
from runner.data.audit import SourceAudit, audit_and_filter
from runner.data.cache import ImageTable, Progress, no_progress, load_images
from runner.data.sources import REST, DatasetBase, Item, scan_with_skips
from runner.data.splits import SPLITS, LabelBudget, group_leaks, grouped_stratified_split, labeled_subset, validation_subset
from runner.errors import DataError


@dataclass
class PreparedDataset:
    """A data set ready for training. Index arrays (`splits`, `labeled`) point into `labels`/`keys`;
    `pixels(idx)` reads the cached images of those items."""

    name: str
    spec: DatasetBase
    class_names: list[str]
    keys: list[str]
    labels: np.ndarray
    groups: list[str]
    splits: dict[str, np.ndarray]
    table: ImageTable
    rows: np.ndarray  # row of each kept item in table.images
    audit: SourceAudit
    not_selected: dict[str, int] = field(default_factory=dict)
    excluded: dict[str, int] = field(default_factory=dict)  # by the manifest's `exclude`
    group_leaks: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    shared: list[str] = field(default_factory=list)  # an external test set: the images it shares with its trained set
    near: dict | None = None  # split.near_duplicates: the pairs found and what grouping them changed (neardup.summary)

    @property
    def channels(self) -> int:
        return self.table.channels

    @property
    def fingerprint(self) -> str:
        """Hash of everything about the data that changes a result: pixels and settings (the cache
        key), the classes, and which item is in which split with which label."""
        h = hashlib.sha256(json.dumps([self.table.cache_key, self.class_names]).encode())
        for s in SPLITS:
            for i in self.splits.get(s, []):
                h.update(f"{s}\0{self.keys[i]}\0{self.labels[i]}\n".encode())
        return h.hexdigest()[:16]

    def pixels(self, idx: np.ndarray) -> np.ndarray:
        """(len(idx), C, S, S) uint8 images of the given items, read from the cache."""
        rows = self.rows[np.asarray(idx, dtype=np.int64)]
        order = np.argsort(rows, kind="stable")  # read the memory map front to back
        out = np.empty((len(rows),) + self.table.images.shape[1:], np.uint8)
        out[order] = self.table.images[rows[order]]
        return out

    def labeled(self, budget: LabelBudget, seed: int) -> np.ndarray:
        """Indices of the labeled train items for a budget and seed (nested across budgets)."""
        try:
            return labeled_subset(self.splits["train"], self.keys, self.labels, self.class_names, budget, seed)
        except DataError as e:
            raise DataError(f"datasets.{self.name}: {e}") from None

    def validation(self, budget: LabelBudget, seed: int) -> np.ndarray:
        """Indices of the validation items whose labels a task under this budget may use for its choices."""
        train_counts = np.bincount(self.labels[self.splits["train"]], minlength=len(self.class_names))
        return validation_subset(self.splits["val"], self.keys, self.labels, self.class_names, budget, train_counts, seed)

    def counts(self) -> dict[str, dict[str, int]]:
        return {
            s: {c: int((self.labels[idx] == k).sum()) for k, c in enumerate(self.class_names)}
            for s, idx in self.splits.items()
        }


def map_classes(spec: DatasetBase, source_labels: list[str]) -> dict[str, str]:
    """Source label -> class name, for the source labels that are selected."""
    everything = set(source_labels)
    unknown = sorted(set(spec.exclude) - everything)
    if unknown:
        raise DataError(f"exclude: {', '.join(map(repr, unknown))} not found in the source (its classes: {', '.join(sorted(everything))})")
    present = sorted(everything - set(spec.exclude))
    if spec.classes is None:
        return {lab: lab for lab in present}
    mapping = {c: [c] for c in spec.classes} if isinstance(spec.classes, list) else dict(spec.classes)
    named = {src for srcs in mapping.values() if srcs != REST for src in srcs}
    both = sorted(named & set(spec.exclude))
    if both:
        raise DataError(f"classes and exclude both name {', '.join(map(repr, both))}: a source class is mapped or excluded")
    unknown = sorted(named - set(present))
    if unknown:
        raise DataError(f"classes: {', '.join(map(repr, unknown))} not found in the source (its classes: {', '.join(present)})")
    out = {src: cls for cls, srcs in mapping.items() if srcs != REST for src in srcs}
    rest = [cls for cls, srcs in mapping.items() if srcs == REST]
    if rest:
        out |= {lab: rest[0] for lab in present if lab not in named}
    return out


def prepare(name: str, spec: DatasetBase, cache_dir: Path, progress: Progress = no_progress,
            classes_of: list[str] | None = None, trained: PreparedDataset | None = None) -> PreparedDataset:
    """Scan, decode (cached), audit, filter, map classes and split one data set. An external test set
    (`spec.external_test_of`, prepared as `external_spec` says) takes the classes of its classifiers,
    `classes_of`, in their order; given its `trained` data set, the images both hold are counted.

    Raises DataError, its message starting with the manifest path of the data set."""
    try:
        return _prepare(name, spec, cache_dir, progress, classes_of, trained)
    except DataError as e:
        raise DataError(f"datasets.{name}: {e}") from None


def external_spec(spec: DatasetBase, trained: PreparedDataset) -> DatasetBase:
    """An external test set's entry as it is prepared: the images as the trained data set's (image
    size, fit, and the channel count its content gave), its positive class."""
    same = {"image_size": trained.spec.image_size, "fit": trained.spec.fit, "channels": trained.channels,
            "positive": trained.spec.positive}
    if "window" in type(spec).model_fields and "window" in type(trained.spec).model_fields:
        same |= {"window": trained.spec.window, "slice_axis": trained.spec.slice_axis}
    return spec.model_copy(update=same)


def _external_classes(spec: DatasetBase, to_class: dict[str, str], not_selected: Counter, names: list[str]) -> None:
    """An external test set is scored whole, on the trained data set's classes (`names`): each of its
    source classes maps onto one of those, and each of those has images."""
    of = spec.external_test_of
    if not_selected:
        listed = ", ".join(f"{c!r} ({n} images)" for c, n in sorted(not_selected.items()))
        raise DataError(f"source classes {listed} are not mapped onto a class of {of} ({', '.join(names)}): "
                        "an external test set is scored whole; map each in classes (e.g. "
                        f"classes: {{{names[0]}: [...], {names[-1]}: [...]}}) or leave it out on purpose with exclude: [...]")
    extra = sorted(set(to_class.values()) - set(names))
    if extra:
        raise DataError(f"classes {', '.join(map(repr, extra))} are not classes of {of} ({', '.join(names)}): "
                        "map the external classes onto those (classes: {<class of " + of + ">: [<its source classes>]})")
    missing = [c for c in names if c not in set(to_class.values())]
    if missing:
        raise DataError(f"class {', '.join(map(repr, missing))} of {of} has no images here (source classes: "
                        f"{', '.join(sorted(to_class))}): map the source classes that are {missing[0]!r} onto it")


def _prepare(name: str, spec: DatasetBase, cache_dir: Path, progress: Progress, classes_of: list[str] | None,
             trained: PreparedDataset | None) -> PreparedDataset:
    items, skipped = scan_with_skips(spec)
    table = load_images(spec, items, cache_dir, progress)
    errors = table.errors
    if errors and spec.on_bad_image == "fail":
        key, reason = next(iter(errors.items()))
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise DataError(f"{_where(spec, key)}: {reason}{more}; set on_bad_image: skip to leave such files out")
    warnings = [f"skipped unreadable image {_where(spec, k)}: {v}" for k, v in errors.items()]
    keep, audit = audit_and_filter(items, table.records, spec.on_conflict, spec.dedupe, skipped,
                                   published_test=spec.split.strategy == "given")
    sel = _select_classes(spec, items, keep, classes_of)
    kept = sel.kept
    keys = [it.key for it in kept]
    groups = [it.group if it.group is not None else it.key for it in kept]
    nd = spec.split.near_duplicates
    near = None
    if nd is not None and spec.external_test_of is None:
        before = groups
        pairs = neardup.find(table.images[np.array(sel.rows, dtype=np.int64)], nd.max_bits, nd.min_correlation)
        groups = neardup.join(groups, pairs)
        largest = neardup.summary(keys, before, groups, pairs, None)["largest"]
        if largest > neardup.group_limit(len(keys)):
            raise DataError(
                f"split.near_duplicates joined {largest} of {len(keys)} images into one group: these images are alike rather "
                f"than copies of one another, and a group that large cannot be split by class; make the test stricter "
                f"(min_correlation above {nd.min_correlation}, max_bits below {nd.max_bits}) or leave near_duplicates out "
                "(`data audit` shows the pairs it finds)")
    if spec.external_test_of is not None:  # all of it is test
        none = np.zeros(0, dtype=np.int64)
        splits = {"train": none, "val": none, "test": np.arange(len(kept), dtype=np.int64)}
        leaks = []
        shared = _shared_images(table, sel.rows, trained) if trained is not None else []
        warnings += shared
    else:
        splits = _checked_split(spec, kept, keys, sel.labels, groups, sel.class_names)
        leaks = group_leaks(groups, splits) if spec.split.group_pattern or any(it.group for it in kept) or nd else []
        shared = []
        if nd is not None:
            near = neardup.summary(keys, before, groups, pairs, splits)
            near["pairs_across_splits_ungrouped"] = neardup.summary(
                keys, before, before, pairs, _split(spec, kept, keys, sel.labels, before))["pairs_across_splits"]
    if leaks:
        warnings.append(f"{len(leaks)} groups span two splits (e.g. {leaks[0]!r}): the given split folders leak")
    return PreparedDataset(name=name, spec=spec, class_names=sel.class_names, keys=keys, labels=sel.labels, groups=groups,
                           splits=splits, table=table, rows=np.array(sel.rows, dtype=np.int64), audit=audit,
                           not_selected=dict(sorted(sel.not_selected.items())), excluded=dict(sorted(sel.excluded.items())),
                           group_leaks=leaks, warnings=warnings, shared=shared, near=near)


@dataclass
class _Selected:
    """The images kept for the task's classes, their labels (indices into class_names), and the counts left out."""

    kept: list[Item]
    rows: list[int]
    class_names: list[str]
    labels: np.ndarray
    not_selected: Counter
    excluded: Counter


def _select_classes(spec: DatasetBase, items: list[Item], keep: list[int], classes_of: list[str] | None) -> _Selected:
    """The audited images whose label maps to a class of the task (for an external test set: the
    classes of the data set it tests, in that classifier's order); two classes at least, none empty."""
    to_class = map_classes(spec, [it.label for it in items])
    external = spec.external_test_of is not None
    if external and classes_of is None:
        raise DataError(f"an external test set of {spec.external_test_of} is prepared with that data set's classes")
    class_names = list(classes_of) if external else _class_order(spec, to_class)  # the classifier's order
    kept: list[Item] = []
    rows: list[int] = []
    not_selected: Counter[str] = Counter()
    excluded: Counter[str] = Counter()
    for i in keep:
        it = items[i]
        if it.label in to_class:
            kept.append(it)
            rows.append(i)
        elif it.label in spec.exclude:
            excluded[it.label] += 1
        else:
            not_selected[it.label] += 1
    if external:
        _external_classes(spec, to_class, not_selected, class_names)
    labels = np.array([class_names.index(to_class[it.label]) for it in kept], dtype=np.int64)
    present = [class_names[c] for c in sorted(set(labels.tolist()))]
    if len(present) < 2:
        left = f"only {present[0]!r}" if present else "no images"
        raise DataError(f"{left} left after filtering; a classification task needs two classes")
    empty = [c for c in class_names if c not in present]
    if empty:
        raise DataError(f"class {empty[0]!r} has no images left after filtering")
    if spec.positive is not None and spec.positive not in class_names:
        raise DataError(f"positive: {spec.positive!r} is not one of the classes {class_names}")
    return _Selected(kept, rows, class_names, labels, not_selected, excluded)


def _checked_split(spec: DatasetBase, kept: list[Item], keys: list[str], labels: np.ndarray, groups: list[str],
                   class_names: list[str]) -> dict[str, np.ndarray]:
    """The train/val/test split, refused when a split is empty or a class has no training image."""
    splits = _split(spec, kept, keys, labels, groups)
    for s, idx in splits.items():
        if len(idx) == 0 and (s != "val" or spec.split.val > 0):
            raise DataError(f"the {s} split is empty; give it more images or a larger fraction")
    missing = [class_names[c] for c in range(len(class_names)) if not (labels[splits["train"]] == c).any()]
    if missing:
        raise DataError(f"class {missing[0]!r} has no image in the train split")
    return splits


def _shared_images(table: ImageTable, rows: list[int], trained: PreparedDataset) -> list[str]:
    """An external test set that holds images of the trained data set is not external: say how many
    (same pixels after decoding), and how many of those the classifiers may have trained on."""
    pix = {table.records[r]["pixel_sha"] for r in rows} - {None}
    shared = {i for i, r in enumerate(trained.rows) if trained.table.records[r]["pixel_sha"] in pix}
    if not shared:
        return []
    seen = shared & set(trained.splits["train"].tolist() + trained.splits["val"].tolist())
    return [f"{len(shared)} images are also in {trained.name} ({len(seen)} of them in its train or val split): "
            "this external test set is not independent of it"]


def _where(spec: DatasetBase, key: str) -> str:
    root = getattr(spec, "root_path", None)
    return str(root / key) if root is not None else key


def _class_order(spec: DatasetBase, to_class: dict[str, str]) -> list[str]:
    if spec.classes is not None:
        return list(spec.classes)  # the manifest's order (list items or mapping keys)
    return sorted(set(to_class.values()))


def _split(spec: DatasetBase, kept: list[Item], keys: list[str], labels: np.ndarray, groups: list[str]) -> dict[str, np.ndarray]:
    sp = spec.split
    if sp.strategy == "stratified":
        fr = {"train": 1.0 - sp.val - sp.test, "val": sp.val, "test": sp.test}
        return grouped_stratified_split(keys, labels, groups, fr, sp.seed)
    by_origin = {s: np.array([i for i, it in enumerate(kept) if it.origin_split == s], dtype=np.int64) for s in SPLITS}
    if len(by_origin["val"]) == 0 and sp.val > 0:  # carve val out of train, grouped and stratified
        train = by_origin["train"]
        part = grouped_stratified_split(
            [keys[i] for i in train], labels[train], [groups[i] for i in train], {"train": 1 - sp.val, "val": sp.val}, sp.seed
        )
        by_origin["train"], by_origin["val"] = train[part["train"]], train[part["val"]]
    return by_origin


NOT_USED_LISTED = 200  # files the run's data.json (and results.json, the HTML report) names of those not used
SCAN_SKIPS = ("missing file", "unknown extension", "listed twice")  # rows or files the scan passed over


def accounting(ds: PreparedDataset) -> dict:
    """Every image of the source accounted for: found, used, and dropped or skipped by reason; the
    published test images kept although duplicated or conflicting. What `run` and the report show."""
    dropped = Counter(d.reason for d in ds.audit.dropped)
    if ds.not_selected:
        dropped["class not selected"] += sum(ds.not_selected.values())
    if ds.excluded:
        dropped["class excluded"] += sum(ds.excluded.values())
    return {
        "found": ds.audit.n_items + sum(n for r, n in dropped.items() if r in SCAN_SKIPS),
        "used": len(ds.keys),
        "not_used": dict(sorted(dropped.items())),
        "test_kept": {reason: len(keys) for reason, keys in ds.audit.kept_in_test.items()},
        "kept_by_setting": ds.audit.kept_by_setting,
        # which files: the first NOT_USED_LISTED by name (a class not selected is counted, not listed)
        "not_used_files": [{"file": d.key, "reason": d.reason} for d in ds.audit.dropped[:NOT_USED_LISTED]],
        "not_used_files_total": len(ds.audit.dropped),
        "cache_mb": round(ds.table.images.nbytes / 2**20, 1),
        **({"external_test_of": ds.spec.external_test_of, "shared": ds.shared} if ds.spec.external_test_of else {}),
    }


def audit_report(ds: PreparedDataset, budgets: list[LabelBudget], seeds: list[int]) -> dict:
    """What `byol-runner data audit` shows for one data set (also its --json form)."""
    a = ds.audit
    defects = []
    if a.unreadable:
        defects.append(f"{len(a.unreadable)} unreadable images")
    if a.conflicts:
        defects.append(f"{len(a.conflicts)} images under two labels")
    if a.leaks:
        defects.append(f"{len(a.leaks)} images in two source splits")
    same_label = len(a.duplicates) - len(a.conflicts)
    if same_label:
        defects.append(f"{same_label} groups of exact duplicates with one label")
    skipped = Counter(d.reason for d in a.dropped if d.reason in SCAN_SKIPS)
    if skipped["missing file"]:
        defects.append(f"{skipped['missing file']} label rows skipped: image file missing")
    if skipped["unknown extension"]:
        defects.append(f"{skipped['unknown extension']} files skipped: not an image extension")
    if skipped["listed twice"]:
        defects.append(f"{skipped['listed twice']} label rows skipped: a file the table lists again")
    if ds.group_leaks:
        defects.append(f"{len(ds.group_leaks)} groups (patients) in two splits")
    if ds.shared:
        defects.append(ds.shared[0])
    labeled = {  # an external test set has no labeled training images: it is all test
        str(seed): {b.name: int(len(ds.labeled(b, seed))) for b in budgets} for seed in seeds
    } if not ds.spec.external_test_of else {}
    dropped_by_reason = Counter(d.reason for d in a.dropped)
    return {
        **accounting(ds),
        "source": ds.spec.source,
        "classes": ds.class_names,
        "positive": ds.spec.positive,
        "channels": ds.channels,
        "image_size": ds.spec.image_size,
        "fingerprint": ds.fingerprint,
        "counts": ds.counts(),
        "labeled": labeled,
        "not_selected": ds.not_selected,
        "excluded": ds.excluded,
        "dropped_by_reason": dict(sorted(dropped_by_reason.items())),
        "skipped": [{"key": d.key, "reason": d.reason, "detail": d.detail} for d in a.dropped
                    if d.reason in SCAN_SKIPS],
        "group_leaks": ds.group_leaks,
        "warnings": ds.warnings,
        "defects": defects,
        "cache": {"key": ds.table.cache_key, "from_cache": ds.table.from_cache, "seconds": round(ds.table.seconds, 3)},
        "table": _table_read_as(ds.spec),
        "medical": _medical_read_as(ds),
        "near_duplicates": near_duplicates_report(ds),
        **a.to_json(),
    }


NEAR_AUDIT_LIMIT = 100_000  # images: above, `data audit` leaves the pairwise comparison to split.near_duplicates


def near_duplicates_report(ds: PreparedDataset) -> dict | None:
    """The near-duplicate pairs of the data set (neardup.py) and where the split put them: as grouped
    (split.near_duplicates), or, not asked for, found with the default settings and only counted."""
    if ds.near is not None:
        return {**ds.near, "grouped": True}
    if ds.spec.external_test_of or len(ds.keys) > NEAR_AUDIT_LIMIT or len(ds.keys) < 2:
        return None
    from runner.data.sources import NearDuplicates

    nd = NearDuplicates()
    pairs = neardup.find(ds.table.images[ds.rows], nd.max_bits, nd.min_correlation)
    return {**neardup.summary(ds.keys, ds.groups, neardup.join(ds.groups, pairs), pairs, ds.splits), "grouped": False,
            "max_bits": nd.max_bits, "min_correlation": nd.min_correlation, "limit": neardup.group_limit(len(ds.keys))}


def _medical_read_as(ds: PreparedDataset) -> dict | None:
    """What of the data set was DICOM or NIfTI, and how it was read: the window, the slice axis, the groups."""
    from runner.data.medical import WINDOWS, split_key

    files: dict[str, set[str]] = {"DICOM": set(), "NIfTI": set()}
    images = Counter()
    for r in ds.table.records:
        fmt = "DICOM" if r["mode"].startswith("DICOM") else "NIfTI" if r["mode"] == "NIfTI" else None
        if fmt:
            files[fmt].add(split_key(r["key"])[0])
            images[fmt] += 1
    if not images:
        return None
    spec = ds.spec
    given = spec.window if isinstance(spec.window, list) else [spec.window] if spec.window is not None else []
    names = {v: k for k, v in WINDOWS.items()}
    window = [(w if isinstance(w, str) else names.get((w.level, w.width), "custom")) + " {:g}/{:g}".format(*pair)
              for w, pair in zip(given, spec.windows or ())]
    split = spec.split
    return {
        "files": {k: len(v) for k, v in files.items() if v},
        "images": dict(images),
        "window": window or None,
        "slice_axis": spec.slice_axis if files["NIfTI"] else None,
        "group_tag": split.group_tag,
        "groups": len(set(ds.groups)),
    }


def _table_read_as(spec) -> dict | None:  # noqa: ANN001 - a DatasetSpec
    """How a csv source's label file was read: its encoding and delimiter, and whether they were given."""
    from runner.data.sources import DELIMITERS, CsvSource, table_format

    if not isinstance(spec, CsvSource):
        return None
    _, encoding, delimiter = table_format(spec.root_path / spec.labels_csv, spec.encoding, spec.delimiter)
    return {"file": spec.labels_csv, "encoding": encoding, "delimiter": DELIMITERS[delimiter],
            "detected": [k for k in ("encoding", "delimiter") if getattr(spec, k) is None]}
