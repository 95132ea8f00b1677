"""Pydantic building blocks every settings model shares.

`StrictModel`: no unknown key, frozen, no inf or nan. `one_of`: a string field limited to a registry's names (arms, task kinds, backbones), with the list and
the closest name in its error and an enum in the JSON schema (pydantic's `Literal[TUPLE]` needs a
type-checker exemption and says less)."""

from __future__ import annotations

import difflib
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, WithJsonSchema


class StrictModel(BaseModel):
    # no inf or nan anywhere: `base_lr: .inf` must fail at plan time, not train a NaN model to "done"
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def one_of(names: tuple[str, ...], what: str):
    """`Annotated[str, ...]` accepting exactly `names`; anything else fails with the list and the closest name."""

    def check(v: str) -> str:
        if v not in names:
            close = difflib.get_close_matches(v, names, 1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown {what}{hint}: one of {', '.join(names)}")
        return v

    return Annotated[str, AfterValidator(check), WithJsonSchema({"type": "string", "enum": list(names)})]
