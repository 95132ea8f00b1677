"""Pydantic building blocks every settings model shares.

`StrictModel`: no unknown key, frozen, no inf or nan. `one_of`: a string field limited to a registry's names (arms, task kinds, backbones), with the list and
the closest name in its error and an enum in the JSON schema (pydantic's `Literal[TUPLE]` needs a
type-checker exemption and says less)."""

from __future__ import annotations

import difflib
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, WithJsonSchema, model_validator


MAX_INT = 10**12  # no setting takes more; 2**64 passed (`epochs`, a seed) and overflowed SQLite during the run


def _huge_ints(value, path: tuple = ()):  # noqa: ANN001, ANN202 - (path, int) of every integer past MAX_INT
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _huge_ints(v, (*path, k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _huge_ints(v, (*path, i))
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
        yield path, value


class StrictModel(BaseModel):
    # no inf or nan anywhere: `base_lr: .inf` must fail at plan time, not train a NaN model to "done"
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_huge_integers(cls, data):  # noqa: ANN001, ANN206
        for path, value in _huge_ints(data) if isinstance(data, dict) else ():
            where = ".".join(str(p) for p in path)
            raise ValueError(f"{where}: {value} is larger than any setting takes (at most {MAX_INT:,})")
        return data


def one_of(names: tuple[str, ...], what: str):
    """`Annotated[str, ...]` accepting exactly `names`; anything else fails with the list and the closest name."""

    def check(v: str) -> str:
        if v not in names:
            close = difflib.get_close_matches(v, names, 1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown {what}{hint}: one of {', '.join(names)}")
        return v

    return Annotated[str, AfterValidator(check), WithJsonSchema({"type": "string", "enum": list(names)})]
