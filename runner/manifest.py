"""The manifest: what to run, as pydantic models, loaded from YAML with errors that name the place.

A manifest names a matrix: datasets x label budgets x seeds (methods and training settings join in
with the runner). Every model forbids unknown keys; every error message starts with the file, line
and YAML path it is about, e.g.
`experiments/matrix.yaml:7: datasets.pneumonia.root: no such directory: data/chest_xray`.
"""

from __future__ import annotations

import difflib
import functools
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, PrivateAttr, ValidationError, field_validator, model_validator

from runner.arms import DEFAULT_METHODS, METHODS, pretraining_of
from runner.choices import StrictModel, one_of
from runner.data.sources import DatasetSpec
from runner.data.splits import LabelBudget
from runner.errors import ManifestError, first_line
from runner.executors.specs import LocalSpec, executor_specs
from runner.ml.config import TrainSettings

RESERVED_NAMES = {"tasks", "cache", "control"}  # folders of the results dir that are not runs
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _safe_name(v: str) -> str:
    """Run and dataset names become folder names: no separators, no '..', nothing absolute."""
    if not _SAFE_NAME.match(v) or ".." in v:
        raise ValueError(f"{v!r} is not a usable name: letters, digits, '_', '.', '-', at most 64, starting with a letter or digit, no '..'")
    return v


SafeName = Annotated[str, AfterValidator(_safe_name)]


class LabelsSpec(StrictModel):
    """The label budgets of the matrix: fractions of each class's train images, or counts per class."""

    fractions: list[Annotated[float, Field(gt=0.0, le=1.0, strict=True)]] = Field(
        default_factory=list, description="e.g. [0.01, 0.1, 1.0] (the default when no budget is given); nested per seed"
    )
    per_class: list[Annotated[int, Field(ge=1, strict=True)]] = Field(
        default_factory=list, description="labeled examples per class, e.g. [2, 10, 50]; with or instead of fractions"
    )

    validation: Literal["budget", "full"] = Field(
        "budget", description="budget: the validation labels a task uses for any choice (selection step, probe strength, "
        "temperature) are drawn at the budget's rate and counted in it; full: the whole validation split at every budget "
        "(optimistic at low budgets; every table says so)")
    min_validation_per_class: int = Field(
        5, ge=1, description="fewer validation labels than this in some class: nothing is chosen; the task trains a fixed "
        "schedule (last step, the probe's fixed_c, no temperature) and the report says so")

    @model_validator(mode="before")
    @classmethod
    def _default_budgets(cls, data: Any) -> Any:
        if isinstance(data, dict) and "fractions" not in data and "per_class" not in data:
            return {**data, "fractions": [0.01, 0.1, 1.0]}
        return data

    @field_validator("fractions", "per_class")
    @classmethod
    def _unique(cls, v: list) -> list:
        if len(set(v)) != len(v):
            raise ValueError("a budget is listed twice")
        return sorted(v)

    @model_validator(mode="after")
    def _not_empty(self) -> "LabelsSpec":
        if not self.fractions and not self.per_class:
            raise ValueError("no label budget: give fractions or per_class")
        return self

    def budgets(self) -> list[LabelBudget]:
        return [LabelBudget(per_class=k) for k in self.per_class] + [LabelBudget(fraction=f) for f in self.fractions]


Method = one_of(METHODS, "method")


def _executor_section(v: Any) -> Any:
    """`executor:` without `kind` is the local executor's; the settings of a backend sit directly under
    `executor` (a `docker:` sub-section was the format before the union)."""
    if isinstance(v, dict):
        if "kind" not in v:
            v = {**v, "kind": "local"}
        if v.get("kind") == "docker" and isinstance(v.get("docker"), dict):
            raise ValueError("the docker settings now sit directly under executor, not under executor.docker: "
                             "write executor: {kind: docker, image: ..., memory: ...}")
    return v


ExecutorSpec = Annotated[
    Union[executor_specs()], Field(discriminator="kind"), BeforeValidator(_executor_section)  # type: ignore[valid-type]
]


class ReportSpec(StrictModel):
    """How the results are judged (no task depends on it: changing it reruns nothing)."""

    primary: Literal["auroc", "auprc", "accuracy", "balanced_accuracy", "loss"] = Field(
        "auroc", description="the metric a verdict (Model 1 better / Model 2 better / equivalent / not worse / inconclusive) "
        "is decided on")
    target_sensitivity: float | None = Field(
        None, gt=0, lt=1, description="the operating point's rule: the highest threshold whose sensitivity on the budget's "
        "validation labels reaches this (e.g. 0.9 for screening); default: the largest Youden's J (sensitivity + "
        "specificity − 1). Sensitivity and specificity at 0.5 are reported beside it")


class CompareSpec(StrictModel):
    """Which arms are Model 1 and Model 2 of the README table and the verdict (every arm is always in
    the extended table). Default: byol-finetune (else byol-linear) against supervised (else
    supervised-imagenet)."""

    model1: Method | None = Field(None, description="e.g. byol-finetune")
    model2: Method | None = Field(None, description="e.g. supervised-imagenet, the strongest baseline when ImageNet weights are at hand")
    margin: float | None = Field(
        None, gt=0, le=1, description="equivalence margin m on the primary metric, in its units (e.g. 0.02 AUROC): with it a "
        "comparison can also read 'equivalent within ±m' (two one-sided tests) or 'Model 1 not worse than −m'; `plan` "
        "warns when the seeds cannot detect a difference of m")
    expected_sd: float = Field(
        0.03, gt=0, le=1, description="the seed-to-seed SD of the per-seed Model 1 − Model 2 difference on the primary metric "
        "that `plan` assumes to say how many seeds reach the margin, until an earlier run in the results dir measured it")


MAX_TASKS = 10_000  # a three-study manifest with 5 seeds is ~200; each task is a process, a folder and store rows
MAX_SEEDS = 100  # beyond it the verdicts gain nothing a study can pay for, and planning alone takes minutes


class Manifest(TrainSettings):
    _text: str | None = PrivateAttr(default=None)  # the YAML it was parsed from (parse_manifest sets it)
    name: SafeName = Field(description="the run's name: its folder under the results dir")
    datasets: dict[SafeName, DatasetSpec] = Field(min_length=1, description="name -> a data set (its source and split); "
                                                     "the name is a folder name and appears in every table")
    methods: list[Method] = Field(
        default_factory=lambda: list(DEFAULT_METHODS), min_length=1,
        description="the arms (runner/arms.py): Model 1 = byol-finetune (or byol-linear), Model 2 = supervised; "
        "random-linear is the control (a linear probe on a random-init encoder), imagenet-linear the control of "
        "byol-imagenet-*; supervised-imagenet, imagenet-linear and byol-imagenet-* need ImageNet weights in the torch "
        "hub cache; simsiam-* pretrain with SimSiam",
    )
    labels: LabelsSpec = Field(default_factory=LabelsSpec, description="the label budgets and how validation labels are counted")
    seeds: list[Annotated[int, Field(strict=True)]] = Field(
        default_factory=lambda: [0, 1, 2, 3, 4], min_length=1, max_length=MAX_SEEDS,
        description=f"one run of every cell per seed (default 5: one seed decides nothing, and 3 rarely do; `plan` says what "
        f"the margin needs); at most {MAX_SEEDS}")
    # and the training settings sections (model, run, pretrain, simsiam, finetune, probe): TrainSettings's
    executor: ExecutorSpec = Field(
        default_factory=lambda: LocalSpec(),
        description="where tasks run and how many at once, by kind: "
        + "; ".join((spec.__doc__ or spec.__name__).split(".")[0] for spec in executor_specs())
        + "; each kind has its own settings",
    )
    report: ReportSpec = Field(default_factory=ReportSpec, description="how the results are judged (no task depends on it)")
    compare: CompareSpec = Field(default_factory=CompareSpec, description="which arms are Model 1 and Model 2, and the "
                                 "equivalence margin")
    results: str | None = Field(None, description="results dir (default: results/, or --results)")

    @field_validator("methods")
    @classmethod
    def _unique_methods(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("a method is listed twice")
        return v

    @model_validator(mode="after")
    def _compared_arms_run(self) -> "Manifest":
        for key in ("model1", "model2"):
            arm = getattr(self.compare, key)
            if arm is not None and arm not in self.methods:
                raise ValueError(f"compare.{key}: {arm!r} is not one of the methods run ({', '.join(self.methods)})")
        if self.compare.model1 is not None and self.compare.model1 == self.compare.model2:
            raise ValueError("compare: model1 and model2 are the same arm")
        return self

    def task_count(self) -> int:
        """The tasks `plan` makes: per trained data set and seed, one pretraining per pretraining the arms
        share and one task per budget and arm; per external test set, one evaluation per classifier of the
        data set it tests."""
        pre = len({p.name for m in self.methods if (p := pretraining_of(m))})
        per_seed = pre + len(self.labels.budgets()) * len(self.methods)
        classifiers = len(self.seeds) * len(self.labels.budgets()) * len(self.methods)
        trained = sum(1 for s in self.datasets.values() if s.external_test_of is None)
        return trained * len(self.seeds) * per_seed + (len(self.datasets) - trained) * classifiers

    @model_validator(mode="after")
    def _bounded_tasks(self) -> "Manifest":
        n = self.task_count()
        if n > MAX_TASKS:
            raise ValueError(f"{n:,} tasks ({len(self.datasets)} data sets x {len(self.seeds)} seeds x "
                             f"{len(self.labels.budgets())} label budgets x {len(self.methods)} methods, and their "
                             f"pretrainings); a manifest makes at most {MAX_TASKS:,}: split it into several")
        return self

    @model_validator(mode="after")
    def _external_tests(self) -> "Manifest":
        """An external test set names a trained data set, is all test, and is prepared as that one's images."""
        for name, spec in self.datasets.items():
            of = spec.external_test_of
            if of is None:
                continue
            if of not in self.datasets or of == name:
                trained = [n for n, s in self.datasets.items() if s.external_test_of is None and n != name]
                raise ValueError(f"datasets.{name}.external_test_of: {of!r} is not another data set of this manifest "
                                 f"({', '.join(trained) or 'none is trained'})")
            base = self.datasets[of]
            if base.external_test_of is not None:
                raise ValueError(f"datasets.{name}.external_test_of: {of!r} is itself an external test set; name the data set "
                                 "the classifiers are trained on")
            if "split" in spec.model_fields_set and spec.split.model_fields_set - {"group_pattern"}:
                raise ValueError(f"datasets.{name}.split: an external test set is all test: only split.group_pattern (its "
                                 "patients, the units its intervals resample) applies")
            for key in ("image_size", "fit", "channels"):
                if key in spec.model_fields_set and getattr(spec, key) != getattr(base, key):
                    raise ValueError(f"datasets.{name}.{key}: {getattr(spec, key)!r}, but its images are prepared as those of "
                                     f"{of} ({key} {getattr(base, key)!r}); leave {key} out")
            if spec.positive is not None and spec.positive != base.positive:
                raise ValueError(f"datasets.{name}.positive: {spec.positive!r}, but the positive class is {of}'s "
                                 f"({base.positive!r}); leave positive out")
            if spec.classes is not None and base.classes is not None and set(spec.classes) != set(base.classes):
                missing, extra = sorted(set(base.classes) - set(spec.classes)), sorted(set(spec.classes) - set(base.classes))
                raise ValueError(f"datasets.{name}.classes: an external test set maps its classes onto {of}'s "
                                 f"({', '.join(base.classes)})" + (f"; missing: {', '.join(missing)}" if missing else "")
                                 + (f"; not a class of {of}: {', '.join(extra)}" if extra else ""))
        return self

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, v: str) -> str:
        if v in RESERVED_NAMES or v.lower().startswith("runner."):
            raise ValueError(f"{v!r} cannot name a run (reserved: {', '.join(sorted(RESERVED_NAMES))}, and runner.* "
                             "for the runner's own files)")
        return v

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("a seed is listed twice")
        return v


def json_schema() -> dict[str, Any]:
    return Manifest.model_json_schema()


# ---- loading ---------------------------------------------------------------------------------


_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser where PyYAML has it: ten times faster


class _UniqueKeyLoader(_Loader):
    """safe_load that refuses a key written twice in one mapping (YAML would keep the last)."""


MERGE_TAG = "tag:yaml.org,2002:merge"


def _mapping_no_dupes(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A mapping whose keys are plain names, each written once; merge keys (`<<: *defaults`) are YAML's:
    the merged keys come first and the mapping's own override them."""
    seen: set = set()
    for key_node, _ in node.value:
        if key_node.tag == MERGE_TAG:
            continue
        if not isinstance(key_node, yaml.ScalarNode):
            raise yaml.constructor.ConstructorError(None, None, "a key here is a list or a mapping: keys are names",
                                                    key_node.start_mark)
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is written twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_no_dupes)


def _locate(root: yaml.Node | None, loc: tuple) -> tuple[str, int | None]:
    """The YAML path and 1-based line a pydantic error location points at.

    Parts of the location that are not in the YAML (the tag pydantic adds for a discriminated
    union, "[key]" for a bad mapping key) are left out, except a last part: a missing key.
    """
    node, line, path = root, None, []
    for n, part in enumerate(loc):
        if part == "[key]":
            continue
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if match is not None:
                node, line = match[1], match[0].start_mark.line + 1
                path.append(str(part))
            elif n == len(loc) - 1:
                path.append(str(part))
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
            path.append(str(part))
        else:
            path.append(str(part))
    return ".".join(path) or "(top level)", line


@functools.lru_cache(maxsize=1)
def _all_field_names() -> set[str]:
    """Every key any manifest model knows, for 'did you mean' hints."""
    import runner.data.sources as sources
    import runner.ml.config as config

    models = list(vars(sources).values()) + list(vars(config).values()) + list(globals().values()) + list(executor_specs())
    return {f for m in models if isinstance(m, type) and issubclass(m, BaseModel) for f in m.model_fields}


def _message(err: dict) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "union_tag_invalid":  # e.g. executor.kind: slurm
        ctx = err.get("ctx", {})
        expected = str(ctx.get("expected_tags", "")).replace("'", "")
        return f"unknown value {ctx.get('tag')!r}: one of {expected}"
    if kind == "extra_forbidden":
        key = str(err["loc"][-1])
        if err["loc"][0] == "executor" and len(err["loc"]) == 3:
            owners = [s.model_fields["kind"].annotation.__args__[0] for s in executor_specs() if key in s.model_fields]
            if owners:
                has = f"only the {owners[0]} executor has it" if len(owners) == 1 else f"the {' and '.join(owners)} executors have it"
                return f"not a setting of the {err['loc'][1]} executor ({has})"
        close = difflib.get_close_matches(key, _all_field_names() - {key}, n=1)  # never the key it just rejected
        return "unknown key" + (f" (did you mean {close[0]!r}?)" if close else "; `byol-runner schema` lists the keys")
    if kind == "missing":
        return "required, but missing"
    msg = re.sub(r"^(Value error|Assertion failed), ", "", msg)
    if "input" in err and kind not in ("union_tag_invalid", "union_tag_not_found") and not isinstance(err["input"], (dict, list)):
        msg += f" (got {err['input']!r})"
    return msg


MAX_ERRORS = 20  # a manifest with thousands of bad keys gets the first ones (and a count), not a minute of lines


def _format_errors(source: str, root: yaml.Node | None, exc: ValidationError) -> str:
    lines = []
    errors = exc.errors()
    if len(errors) > MAX_ERRORS:
        lines.append(f"{source}: {len(errors)} problems; the first {MAX_ERRORS}:")
    for err in errors[:MAX_ERRORS]:
        path, line = _locate(root, tuple(err["loc"]))
        where = f"{source}:{line}" if line else source
        if err["type"] == "union_tag_invalid":
            path += "." + str(err.get("ctx", {}).get("discriminator", "")).strip("'")
        lines.append(f"{where}: {path}: {_message(err)}")
    return "\n".join(lines)


MAX_DEPTH = 32  # a manifest is a few levels deep; YAML nested thousands deep would exhaust the parser's stack
MAX_NODES = 20_000  # a three-study manifest has a few hundred entries


def _shape(root: yaml.Node | None) -> tuple[int, int, int | None]:
    """Nesting depth and node count of a YAML node tree, and the line where it is deepest (iterative: no
    recursion; it stops counting past the limits)."""
    deepest, count, line, stack = 0, 0, None, [(root, 1)] if root is not None else []
    while stack:
        node, d = stack.pop()
        count += 1
        if d > deepest:
            deepest, line = d, node.start_mark.line + 1
        if d > MAX_DEPTH or count > MAX_NODES:
            break
        if isinstance(node, yaml.SequenceNode):
            stack.extend((n, d + 1) for n in node.value)
        elif isinstance(node, yaml.MappingNode):
            stack.extend((n, d + 1) for pair in node.value for n in pair)
    return deepest, count, line


def parse_manifest(text: str, source: str = "<manifest>") -> Manifest:
    try:
        root = yaml.compose(text, Loader=_Loader)
        depth, count, line = _shape(root)
        if depth > MAX_DEPTH:
            raise ManifestError(f"{source}:{line}: nested more than {MAX_DEPTH} levels deep: not a manifest")
        if count > MAX_NODES:
            raise ManifestError(f"{source}: more than {MAX_NODES} entries: not a manifest")
        loader = _UniqueKeyLoader("")
        try:
            data = loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
    except RecursionError:
        raise ManifestError(f"{source}: nested too deeply to read: not a manifest") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(e, "problem", None) or first_line(e, 300)
        raise ManifestError(f"{where}: not valid YAML: {problem}") from None
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise ManifestError(f"{source}: a manifest is a mapping (name:, datasets:, ...), this one is {kind}")
    # top-level keys starting with x- are the author's (e.g. anchors for merge keys: `x-short: &short {epochs: 5}`)
    data = {k: v for k, v in data.items() if not (isinstance(k, str) and k.startswith("x-"))}
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as e:
        raise ManifestError(_format_errors(source, root, e)) from None
    manifest._text = text  # the copy planned is the copy run and reported: the file is not read again
    return manifest


MAX_MANIFEST_BYTES = 1 << 20


def load_manifest(path: str | Path) -> Manifest:
    """A manifest file: a regular file (a FIFO would block, /dev/zero never ends) of at most 1 MiB."""
    from runner.atomic import FileTooLarge, NotRegularFile, read_regular_file

    p = Path(path)
    try:
        text = read_regular_file(p, MAX_MANIFEST_BYTES).decode("utf-8")
    except NotRegularFile:
        raise ManifestError(f"{p}: not a regular file: a manifest is a YAML file") from None
    except FileTooLarge as e:
        raise ManifestError(f"{p}: {e.size} bytes: a manifest is at most {MAX_MANIFEST_BYTES} bytes") from None
    except FileNotFoundError:
        raise ManifestError(f"{p}: no such manifest file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"{p}: cannot read the manifest ({e})") from None
    return parse_manifest(text, str(p))
