"""The arms of a study and the pretrainings they evaluate, in one table each.

An *arm* is what a manifest's `methods:` lists: one trained classifier per dataset x budget x seed.
A *pretraining* is one label-free task per dataset x seed that several arms share (its fine-tuned
and its linear-probed arm). Everything that names an arm (the manifest's choices, the plan, the
worker's dispatch, the report's roles and legends, the figures' colours) reads these tables, so a new
method is one entry here plus its own file (see `runner/ml/simsiam.py`).

Nothing here imports torch: the manifest, the plan and the headless runner read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["model1", "model2", "control", "other"]
Init = Literal["random", "imagenet"]


@dataclass(frozen=True)
class Pretraining:
    """One pretraining task per dataset x seed: `method` (a module runner.ml.<method> with a `make`,
    see runner/ml/pretrain.py) from `init` weights; its result hashes `settings` (manifest sections)."""

    name: str
    method: str
    init: Init
    settings: tuple[str, ...]
    label: str  # e.g. "BYOL"


@dataclass(frozen=True)
class Arm:
    name: str  # as the manifest lists it
    kind: str  # the worker's task kind
    label: str  # legend text; "{arch}" becomes the backbone's name
    colour: str
    role: Role  # model1/model2: candidates for the README table's columns, first listed first
    pretraining: str | None = None  # the PRETRAININGS entry it evaluates
    solid: bool = False  # a solid line in the figures (the default Model 1 and Model 2), else dashed


PRETRAININGS = {p.name: p for p in (
    Pretraining("byol", "byol", "random", ("model", "pretrain"), "BYOL"),
    Pretraining("byol-imagenet", "byol", "imagenet", ("model", "pretrain"), "BYOL from ImageNet weights"),
    Pretraining("simsiam", "simsiam", "random", ("model", "pretrain", "simsiam"), "SimSiam"),
)}

ARMS = {a.name: a for a in (
    Arm("byol-finetune", "finetune", "BYOL + {arch}, fine-tuned", "#1f77b4", "model1", "byol", solid=True),
    Arm("byol-linear", "linear", "BYOL + {arch}, linear probe", "#17becf", "model1", "byol"),
    Arm("supervised", "supervised", "supervised {arch} from random init", "#d62728", "model2", solid=True),
    Arm("supervised-imagenet", "supervised-imagenet", "supervised {arch} from ImageNet weights", "#ff7f0e", "model2"),
    Arm("random-linear", "random-linear", "linear probe on a random-init {arch} (control)", "#7f7f7f", "control"),
    Arm("imagenet-linear", "imagenet-linear", "linear probe on {arch}'s ImageNet features (control of the ImageNet-initialised "
        "pretraining)", "#bcbd22", "control"),
    Arm("byol-imagenet-finetune", "finetune", "BYOL + {arch} continued from ImageNet weights, fine-tuned", "#2ca02c",
        "other", "byol-imagenet"),
    Arm("byol-imagenet-linear", "linear", "BYOL + {arch} continued from ImageNet weights, linear probe", "#98df8a",
        "other", "byol-imagenet"),
    Arm("simsiam-finetune", "finetune", "SimSiam + {arch}, fine-tuned", "#9467bd", "other", "simsiam"),
    Arm("simsiam-linear", "linear", "SimSiam + {arch}, linear probe", "#c5b0d5", "other", "simsiam"),
)}

METHODS = tuple(ARMS)
DEFAULT_METHODS = ("byol-finetune", "byol-linear", "supervised", "random-linear")
CONTROL = "random-linear"  # the untrained network every pretraining's linear probe is held against
# the control of a pretraining's linear probe, by where the pretraining starts: an untrained network,
# or the ImageNet features it started from (did the in-domain pretraining add anything to them?)
CONTROLS = {"random": "random-linear", "imagenet": "imagenet-linear"}

# the settings sections each task kind's result depends on (a pretraining's come from PRETRAININGS)
KIND_SETTINGS = {
    "pretrain": ("model", "pretrain"),
    "finetune": ("model", "finetune"),
    "linear": ("model", "probe"),
    "supervised": ("model", "finetune"),
    "supervised-imagenet": ("model", "finetune"),
    "random-linear": ("model", "probe"),
    "imagenet-linear": ("model", "probe"),
    "evaluate": (),  # an external test set scored by a saved classifier: its identity is that classifier's id
    "noop": (),
}
KINDS = tuple(KIND_SETTINGS)
CLASSIFIER_KINDS = ("finetune", "supervised", "supervised-imagenet")  # trained end to end, scored per step
PROBE_KINDS = ("linear", "random-linear", "imagenet-linear")  # a logistic regression on frozen features
EVALUATE = "evaluate"  # scores an external test set with a classifier task's saved model.pt


def role_candidates(role: Role) -> tuple[str, ...]:
    return tuple(a.name for a in ARMS.values() if a.role == role)


def pretraining_of(method: str) -> Pretraining | None:
    arm = ARMS.get(method)
    return PRETRAININGS[arm.pretraining] if arm and arm.pretraining else None


def needs_imagenet(methods: list[str]) -> list[str]:
    """The arms of `methods` that start from ImageNet weights."""
    return [m for m in methods if ARMS[m].kind in ("supervised-imagenet", "imagenet-linear")
            or (pretraining_of(m) and pretraining_of(m).init == "imagenet")]


def linear_arms(methods) -> list[tuple[str, Pretraining]]:
    """Each listed pretraining's linear-probe arm, the one held against the control."""
    return [(m, pretraining_of(m)) for m in methods if ARMS.get(m) and ARMS[m].kind == "linear" and ARMS[m].pretraining]


def label(method: str, arch: str) -> str:
    arm = ARMS.get(method)
    return arm.label.format(arch=arch) if arm else method


def colour(method: str) -> str | None:
    arm = ARMS.get(method)
    return arm.colour if arm else None
