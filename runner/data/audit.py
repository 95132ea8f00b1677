"""Find what is wrong with a data set before training on it, and decide what to drop.

Exact duplicates are images with the same decoded pixels (the pixel hash), which also catches the
same picture saved under two names or formats; `byte_identical` says whether the files were equal
too. A duplicate group is a *label conflict* when its copies carry different source labels, and a
*leak* when its copies sit in different source splits. Conflicts are judged on the source's own
labels, before any class mapping: an image filed under two diagnoses has no trustworthy label, even
when both diagnoses would map to the same class.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Literal

from runner.data.sources import Item

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
    reason: Literal["unreadable", "label conflict", "duplicate", "class not selected"]
    detail: str


@dataclass
class SourceAudit:
    """What the source holds before filtering, and what filtering removed."""

    n_items: int
    unreadable: dict[str, str]  # key -> reason
    duplicates: list[DuplicateGroup]
    dropped: list[Dropped] = field(default_factory=list)

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
) -> tuple[list[int], SourceAudit]:
    """Indices of the items to keep, and the audit that says what was found and dropped.

    Unreadable images are always dropped (whether that is fatal is the caller's call). With
    `on_conflict: drop` every copy of a conflicting image goes. With `dedupe`, one copy of each
    remaining duplicate group stays: the one in test, else val, else train (so a Train/Test leak
    keeps the test set whole), then the first key.
    """
    unreadable = {items[i].key: r["error"] for i, r in enumerate(records) if r["error"]}
    audit = SourceAudit(n_items=len(items), unreadable=unreadable, duplicates=find_duplicates(items, records))
    drop: dict[str, Dropped] = {k: Dropped(k, "unreadable", v) for k, v in unreadable.items()}
    for g in audit.duplicates:
        if g.conflicting and on_conflict == "drop":
            detail = "same image as " + ", ".join(f"{k} ({lab})" for k, lab in zip(g.keys, g.labels))
            for k in g.keys:
                drop[k] = Dropped(k, "label conflict", detail)
        elif dedupe:
            order = sorted(range(len(g.keys)), key=lambda j: (_SPLIT_PRIORITY.get(g.splits[j], 3), g.keys[j]))
            kept = g.keys[order[0]]
            for j in order[1:]:
                drop[g.keys[j]] = Dropped(g.keys[j], "duplicate", f"same image as {kept} (kept)")
    audit.dropped = sorted(drop.values(), key=lambda d: d.key)
    keep = [i for i, it in enumerate(items) if it.key not in drop]
    return keep, audit
