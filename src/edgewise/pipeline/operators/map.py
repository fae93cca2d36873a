"""Map: derived fields, dropped fields and renamed fields.

    - id: convert
      type: map
      inputs: [sensors]
      set:                      # evaluated in order; later ones may use earlier ones
        value_f: "value * 9 / 5 + 32"
        line: "part(sensor, '/', 0)"
      drop: [raw]               # fields that are absent are ignored
      rename: {value_f: fahrenheit}

Order: ``set``, then ``drop``, then ``rename`` (a rename onto an existing field replaces it,
when the field being renamed is present). Expressions use `edgewise.pipeline.expr`; a bad
one is a spec error at its line. Internal columns (names starting with ``_``, such as
``_accepted``) cannot be set, dropped or renamed, so latency is still measured downstream.
"""

from __future__ import annotations

import re

import numpy as np
from pydantic import Field, field_validator, model_validator

from edgewise.pipeline.batch import Batch
from edgewise.pipeline.component import ComponentConfig, Emit, Operator, RunContext
from edgewise.pipeline.expr import (
    Compiled,
    ExpressionError,
    compile_expr,
    evaluate_column,
)

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def _check_name(name: str, what: str) -> None:
    if not _NAME.match(name):
        raise ValueError(
            f"{what} {name!r} is not a field name; use letters, digits and '_', starting with a "
            "letter (names starting with '_' are internal)"
        )


class MapConfig(ComponentConfig):
    set: dict[str, str] = Field(
        default={}, description="new or replaced fields: name -> expression, in order"
    )
    drop: list[str] = Field(default=[], description="fields to remove (absent ones are ignored)")
    rename: dict[str, str] = Field(default={}, description="old name -> new name, applied last")

    @field_validator("set")
    @classmethod
    def _compiles(cls, v: dict[str, str]) -> dict[str, str]:
        for name, text in v.items():
            _check_name(name, "field")
            try:
                compile_expr(str(text), where=f"set.{name}")
            except ExpressionError as exc:
                raise ValueError(str(exc)) from None
        return v

    @field_validator("drop")
    @classmethod
    def _drop_names(cls, v: list[str]) -> list[str]:
        for name in v:
            _check_name(name, "field")
        return v

    @field_validator("rename")
    @classmethod
    def _rename_names(cls, v: dict[str, str]) -> dict[str, str]:
        for old, new in v.items():
            _check_name(old, "field")
            _check_name(new, "new name")
        targets = list(v.values())
        dup = sorted({t for t in targets if targets.count(t) > 1})
        if dup:
            raise ValueError(f"two fields renamed to {dup[0]!r}; each new name once")
        return v

    @model_validator(mode="after")
    def _something(self) -> MapConfig:
        if not (self.set or self.drop or self.rename):
            raise ValueError("give at least one of set, drop or rename")
        return self


class Map(Operator):
    Config = MapConfig

    def __init__(self, id: str, config: MapConfig, ctx: RunContext) -> None:
        super().__init__(id, config, ctx)
        self.derived: list[tuple[str, str, Compiled]] = [
            (name, str(text), compile_expr(str(text), where=f"stage {id!r}: set.{name}"))
            for name, text in config.set.items()
        ]

    def process(self, batch: Batch) -> Emit:
        work = Batch(batch.columns, batch.n)  # a copy of the column dict, not of the columns
        cols = work.columns  # filled in place, so later expressions see earlier results
        if self.derived:
            for name, text, fn in self.derived:
                try:
                    value = evaluate_column(fn, work)
                except ExpressionError:
                    raise
                except (TypeError, ValueError, ArithmeticError) as exc:
                    raise ExpressionError(
                        f"stage {self.id!r}: set.{name} = {text!r}: cannot evaluate on these "
                        f"records: {exc}"
                    ) from None
                if value.shape != (batch.n,):
                    raise ExpressionError(
                        f"stage {self.id!r}: set.{name} = {text!r} does not give one value per "
                        "record"
                    )
                cols[name] = value
        for name in self.config.drop:
            cols.pop(name, None)
        if self.config.rename:
            rename = self.config.rename
            present = [old for old in rename if old in cols]
            replaced = {rename[old] for old in present}
            renamed: dict[str, np.ndarray] = {}
            for name, col in cols.items():
                if name in rename:
                    renamed[rename[name]] = col
                elif name not in replaced:  # an existing field a rename overwrites
                    renamed[name] = col
            cols = renamed
        return Batch(cols, batch.n)
