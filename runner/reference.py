"""The manifest reference, written from the pydantic models themselves: every key with its type, default
and description, section by section, and one example each. `byol-runner schema --format md` prints it;
docs/manifest.md is that output, and a test fails when the two differ or a key has no description.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

# one example of each data source, as a manifest writes it (the others are the sections' defaults)
SOURCE_EXAMPLES = {
    "ImageFolderSource": {"pneumonia": {"source": "imagefolder", "root": "data/chest_xray", "classes": ["NORMAL", "PNEUMONIA"],
                                        "positive": "PNEUMONIA", "image_size": 64,
                                        "split": {"strategy": "stratified", "group_pattern": "(person\\d+)_"}}},
    "CsvSource": {"hemorrhage": {"source": "csv", "root": "data/head_ct", "image_column": "id", "label_column": "hemorrhage",
                                 "image_pattern": "{}.png", "classes": {"normal": ["0"], "hemorrhage": ["1"]},
                                 "positive": "hemorrhage"}},
    "NpzSource": {"pneumonia_mnist": {"source": "npz", "path": "data/pneumoniamnist.npz", "class_names": ["normal", "pneumonia"],
                                      "split": {"strategy": "given"}}},
    "SyntheticSource": {"synthetic": {"source": "synthetic", "num_classes": 2, "per_class": 120, "size": 48, "image_size": 32}},
}


def type_text(ann: Any) -> str:
    """A type as a manifest writer reads it: `int`, `float or null`, `one of: a, b`, `list of float`."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Annotated:
        enum = next((m.json_schema.get("enum") for m in args[1:] if isinstance(getattr(m, "json_schema", None), dict)), None)
        return "one of: " + ", ".join(enum) if enum else type_text(args[0])
    if origin is Literal:
        return "one of: " + ", ".join(str(a) for a in args) if len(args) > 1 else f"`{args[0]}`"
    if origin in (Union, types.UnionType):
        if sum(1 for a in args if isinstance(a, type) and issubclass(a, BaseModel)) > 1:  # a discriminated union of sections
            return "a section by its `source` or `kind` (below)"
        parts = [type_text(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin in (list, tuple):
        return f"list of {type_text(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {type_text(args[0])} to {type_text(args[1])}" if args else "mapping"
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "a section (below)"
    return {str: "text", int: "integer", float: "number", bool: "true or false"}.get(ann, getattr(ann, "__name__", str(ann)))


def default_text(field) -> str:  # noqa: ANN001 - a pydantic FieldInfo
    if field.default_factory is not None:
        value = field.default_factory()
        value = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        return "(a section)" if isinstance(value, dict) and value else f"`{yaml.safe_dump(value, default_flow_style=True).strip()}`"
    if field.default is PydanticUndefined:
        return "required"
    return f"`{yaml.safe_dump(field.default, default_flow_style=True).strip().removesuffix(chr(10) + '...')}`"


def _models_in(ann: Any) -> list[type[BaseModel]]:
    out = [ann] if isinstance(ann, type) and issubclass(ann, BaseModel) else []
    for a in typing.get_args(ann):
        out += _models_in(a)
    return out


def sections() -> list[tuple[str, type[BaseModel]]]:
    """(the YAML path of a section, its model), from the top level down, each model once."""
    from runner.manifest import Manifest

    out: list[tuple[str, type[BaseModel]]] = []
    seen: set[type] = set()

    def walk(path: str, tag: str, model: type[BaseModel]) -> None:
        if model in seen:
            return
        seen.add(model)
        out.append((path + tag, model))
        for name, field in model.model_fields.items():
            for sub in _models_in(field.annotation):
                kind = sub.model_fields.get("source") or sub.model_fields.get("kind")
                sub_tag = f" ({'source' if 'source' in sub.model_fields else 'kind'}: {kind.annotation.__args__[0]})" if kind else ""
                where = f"{path}.{name}" if path else name
                walk(f"{where}.<name>" if name == "datasets" else where, sub_tag, sub)

    walk("", "", Manifest)
    return out


def _example(path: str, model: type[BaseModel]) -> str:
    if model.__name__ in SOURCE_EXAMPLES:
        return yaml.safe_dump({"datasets": SOURCE_EXAMPLES[model.__name__]}, sort_keys=False, width=110).strip()
    try:
        value = model().model_dump(mode="json", exclude_defaults=False)
    except Exception:  # noqa: BLE001 - a section with required keys: no example from its defaults
        return ""
    keys = [k for k in path.split(" ")[0].split(".") if k]
    for k in reversed(keys):
        if k == "<name>":  # a data set's sub-section: inside one data set of the examples
            value = {"pneumonia": {"source": "imagefolder", "root": "data/chest_xray", **value}}
        else:
            value = {k: value}
    return yaml.safe_dump(value, sort_keys=False, default_flow_style=None, width=110).strip()


def reference_markdown() -> str:
    lines = ["# Manifest reference", "",
             "Every key a manifest may hold, from byol-runner's own models (`byol-runner schema --format md` writes this "
             "page; `byol-runner schema` prints the JSON Schema). A key not listed is refused with its YAML path and the "
             "closest known key. Paths accept `~` and `${VAR}` / `${VAR:-default}`.", ""]
    for path, model in sections():
        title = path or "The top level"
        doc = " ".join((model.__doc__ or "").split())
        lines += [f"## `{title}`" if path else f"## {title}", ""]
        if doc and not doc.startswith(model.__name__ + "("):
            lines += [doc, ""]
        lines += ["| key | type | default | what it is |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            desc = " ".join((field.description or "").split()).replace("|", "\\|")
            shown = (field.json_schema_extra or {}).get("type_text") if isinstance(field.json_schema_extra, dict) else None
            lines.append(f"| `{name}` | {shown or type_text(field.annotation)} | {default_text(field)} | {desc} |")
        example = _example(path, model)
        if example:
            lines += ["", "```yaml", example, "```"]
        lines.append("")
    return "\n".join(lines + limits_markdown())


def limits_markdown() -> list[str]:
    """The bounds a manifest and a run are held to, from the constants that enforce them."""
    from runner.choices import MAX_INT
    from runner.contracts import CONTROL_MAX_BYTES
    from runner.data.cache import MAX_IMAGES, ROOM_MARGIN
    from runner.executors.specs import MAX_PARALLEL
    from runner.manifest import MAX_DEPTH, MAX_MANIFEST_BYTES, MAX_NODES, MAX_SEEDS, MAX_TASKS

    rows = [("a manifest file", f"at most {MAX_MANIFEST_BYTES:,} bytes, {MAX_NODES:,} YAML entries, nested {MAX_DEPTH} deep"),
            ("any integer setting", f"at most {MAX_INT:,}"),
            ("`seeds`", f"at most {MAX_SEEDS}"),
            ("tasks a manifest makes", f"at most {MAX_TASKS:,} (data sets x seeds x (budgets x methods + pretrainings), "
                                       "and one evaluation per classifier for each external test set)"),
            ("`max_parallel`, `--max-parallel`", f"at most {MAX_PARALLEL:,}"),
            ("images one data set decodes", f"at most {MAX_IMAGES:,}"),
            ("the image cache", f"a data set's decoded images must fit on the cache's disk with {ROOM_MARGIN >> 20} MB to "
                                "spare, checked before decoding; `plan` prints what it takes and what is free"),
            ("a control request (`control/*.json`)", f"at most {CONTROL_MAX_BYTES:,} bytes, a regular file")]
    return ["## Limits", "",
            "What `plan` and `run` refuse, with one line naming the key and the bound (exit 2), before anything trains:",
            "", "| what | bound |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows), ""]


def undescribed() -> list[str]:
    """Keys with no description (a test keeps this empty: the reference must say what each key is)."""
    return [f"{path or 'top level'}.{name}" for path, model in sections() for name, f in model.model_fields.items()
            if not f.description]
