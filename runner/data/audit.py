"""Find what is wrong with a data set before training on it, and decide what to drop.

Exact duplicates are images with the same decoded pixels (the pixel hash), which also catches the
same picture saved under two names or formats; `byte_identical` says whether the files were equal
too. A duplicate group is a *label conflict* when its copies carry different source labels, and a
*leak* when its copies sit in different source splits. Conflicts are judged on the source's own
labels, before any class mapping: an image filed under two diagnoses has no trustworthy label, even
when both diagnoses would map to the same class.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Literal

from runner.data.sources import Item, Skipped

_SPLIT_PRIORITY = {"test": 0, "val": 1, "train": 2, None: 3}  # which copy of a duplicate to keep


@dataclass
class DuplicateGroup:
    pixel_sha: str
    keys: list[str]
    labels: list[str]
    splits: list[str | None]
    byte_identical: bool

    @property
    def conflicting(self) -> bool:
        return len(set(self.labels)) > 1

    @property
    def leaking(self) -> bool:
        return len({s for s in self.splits if s is not None}) > 1


@dataclass
class Dropped:
    key: str
    reason: Literal["unreadable", "label conflict", "duplicate", "class not selected", "missing file", "unknown extension",
                    "listed twice"]
    detail: str


@dataclass
class SourceAudit:
    """What the source holds before filtering, and what filtering removed."""

    n_items: int
    unreadable: dict[str, str]  # key -> reason
    duplicates: list[DuplicateGroup]
    dropped: list[Dropped] = field(default_factory=list)  # what the scan skipped, then what filtering removed
    kept_in_test: dict[str, list[str]] = field(default_factory=dict)  # published test images kept though duplicated or conflicting
    kept_by_setting: dict[str, int] = field(default_factory=dict)  # copies kept because dedupe: false or on_conflict: keep

    @property
    def conflicts(self) -> list[DuplicateGroup]:
        return [g for g in self.duplicates if g.conflicting]

    @property
    def leaks(self) -> list[DuplicateGroup]:
        return [g for g in self.duplicates if g.leaking]

    def to_json(self) -> dict:
        return {
            "n_items": self.n_items,
            "unreadable": [{"key": k, "reason": v} for k, v in sorted(self.unreadable.items())],
            "duplicate_groups": [asdict(g) | {"conflicting": g.conflicting, "leaking": g.leaking} for g in self.duplicates],
            "n_duplicate_groups": len(self.duplicates),
            "n_label_conflicts": len(self.conflicts),
            "n_split_leaks": len(self.leaks),
            "dropped": [asdict(d) for d in self.dropped],
            "kept_in_test": self.kept_in_test,
            "kept_by_setting": self.kept_by_setting,
        }


def find_duplicates(items: list[Item], records: list[dict]) -> list[DuplicateGroup]:
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        if r["pixel_sha"] is not None:
            by_hash[r["pixel_sha"]].append(i)
    groups = []
    for sha, idx in by_hash.items():
        if len(idx) > 1:
            groups.append(
                DuplicateGroup(
                    pixel_sha=sha,
                    keys=[items[i].key for i in idx],
                    labels=[items[i].label for i in idx],
                    splits=[items[i].origin_split for i in idx],
                    byte_identical=len({records[i]["file_sha"] for i in idx}) == 1,
                )
            )
    groups.sort(key=lambda g: g.keys[0])
    return groups


def audit_and_filter(
    items: list[Item],
    records: list[dict],
    on_conflict: Literal["drop", "keep"] = "drop",
    dedupe: bool = True,
    skipped: list[Skipped] = (),
    published_test: bool = False,
) -> tuple[list[int], SourceAudit]:
    """Indices of the items to keep, and the audit that says what was found, skipped and dropped.

    Unreadable images are always dropped (whether that is fatal is the caller's call). With
    `on_conflict: drop` every copy of a conflicting image goes. With `dedupe`, one copy of each
    remaining duplicate group stays: the one in test, else val, else train (so a Train/Test leak
    keeps the test set whole), then the first key.

    `published_test` (a given split): the test split stays exactly as published, so results compare
    with the literature. A duplicate or conflicting image is removed from train and val only; its test
    copies all stay, and are listed in `kept_in_test` (reported, never silently removed).
    """
    unreadable = {items[i].key: r["error"] for i, r in enumerate(records) if r["error"]}
    audit = SourceAudit(n_items=len(items), unreadable=unreadable, duplicates=find_duplicates(items, records))
    drop: dict[str, Dropped] = {k: Dropped(k, "unreadable", v) for k, v in unreadable.items()}
    kept_in_test: dict[str, list[str]] = {"duplicate": [], "label conflict": []}
    kept = Counter()
    for g in audit.duplicates:
        readable = [k for k in g.keys if k not in unreadable]
        if g.conflicting and on_conflict == "keep":
            kept["images under two labels (on_conflict: keep)"] += len(readable)
        elif not g.conflicting and not dedupe and len(readable) > 1:
            kept["extra copies of an image (dedupe: false)"] += len(readable) - 1
            if len({s for k, s in zip(g.keys, g.splits) if k not in unreadable}) > 1:
                kept["of them in two source splits"] += len(readable) - 1
    audit.kept_by_setting = dict(kept)
    for g in audit.duplicates:
        in_test = [j for j, s in enumerate(g.splits) if s == "test" and g.keys[j] not in unreadable] if published_test else []
        if g.conflicting and on_conflict == "drop":
            detail = "same image as " + ", ".join(f"{k} ({lab})" for k, lab in zip(g.keys, g.labels))
            for j, k in enumerate(g.keys):
                if j not in in_test:
                    drop[k] = Dropped(k, "label conflict", detail)
            kept_in_test["label conflict"] += [g.keys[j] for j in in_test]
        elif dedupe:
            order = sorted(range(len(g.keys)), key=lambda j: (_SPLIT_PRIORITY.get(g.splits[j], 3), g.keys[j]))
            kept = g.keys[order[0]]
            for j in order[1:]:
                if j not in in_test:
                    drop[g.keys[j]] = Dropped(g.keys[j], "duplicate", f"same image as {kept} (kept)")
            if len(in_test) > 1:
                kept_in_test["duplicate"] += [g.keys[j] for j in in_test]
    audit.kept_in_test = {reason: sorted(keys) for reason, keys in kept_in_test.items() if keys}
    audit.dropped = sorted([*(Dropped(s.key, s.reason, s.detail) for s in skipped), *drop.values()], key=lambda d: d.key)
    keep = [i for i, it in enumerate(items) if it.key not in drop]
    return keep, audit
