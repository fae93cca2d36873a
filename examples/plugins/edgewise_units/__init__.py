"""An example Edgewise user operator: unit conversion.

Two ways to plug it in (see docs/plugins.md):

* ``type: python`` with ``class: "edgewise_units:UnitConvert"``: a plain class with the small
  plugin interface (``__init__(options)``, ``process(batch)``).
* ``type: unit_convert``: the `UnitConvertOperator` class registered in the
  ``edgewise.operators`` entry-point group by this folder's pyproject.toml
  (``pip install -e examples/plugins``).

Options: ``field`` (default ``value``), ``from`` and ``to`` (units of one kind: temperature
degC / degF / K, pressure Pa / kPa / bar / psi, acceleration m/s2 / g), optional ``output`` (a
new field; default: convert in place) and ``decimals`` (round the result).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field, model_validator

from edgewise.pipeline.batch import Batch
from edgewise.pipeline.component import ComponentConfig, Operator, RunContext

# unit -> (kind, scale, offset): si = value * scale + offset
UNITS: dict[str, tuple[str, float, float]] = {
    "degC": ("temperature", 1.0, 273.15),
    "degF": ("temperature", 5.0 / 9.0, 273.15 - 32.0 * 5.0 / 9.0),
    "K": ("temperature", 1.0, 0.0),
    "Pa": ("pressure", 1.0, 0.0),
    "kPa": ("pressure", 1000.0, 0.0),
    "bar": ("pressure", 100_000.0, 0.0),
    "psi": ("pressure", 6894.757293168361, 0.0),
    "m/s2": ("acceleration", 1.0, 0.0),
    "g": ("acceleration", 9.80665, 0.0),
}


def conversion(src: str, dst: str) -> tuple[float, float]:
    """(a, b) such that value_in_dst = a * value_in_src + b; ValueError if not convertible."""
    for u in (src, dst):
        if u not in UNITS:
            raise ValueError(f"unknown unit {u!r}; known: {', '.join(UNITS)}")
    kind_s, scale_s, off_s = UNITS[src]
    kind_d, scale_d, off_d = UNITS[dst]
    if kind_s != kind_d:
        raise ValueError(f"cannot convert {kind_s} ({src}) to {kind_d} ({dst})")
    return scale_s / scale_d, (off_s - off_d) / scale_d


class UnitConvert:
    """The plain-class form: gets ``options`` and implements ``process(batch)``."""

    def __init__(self, options: dict[str, Any]) -> None:
        unknown = set(options) - {"field", "from", "to", "output", "decimals"}
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))}")
        if "from" not in options or "to" not in options:
            raise ValueError("options 'from' and 'to' are required, e.g. {from: degC, to: degF}")
        self.field = str(options.get("field", "value"))
        self.output = str(options.get("output", self.field))
        self.decimals = options.get("decimals")
        self.a, self.b = conversion(str(options["from"]), str(options["to"]))
        self.converted = 0  # kept across restarts through snapshot/restore

    def process(self, batch: Batch) -> Batch:
        x = batch[self.field].astype(np.float64) * self.a + self.b
        if self.decimals is not None:
            x = np.round(x, int(self.decimals))
        self.converted += batch.n
        return batch.with_columns(**{self.output: x})  # keeps _accepted and every other column

    def snapshot(self) -> dict[str, int]:
        return {"converted": self.converted}

    def restore(self, state: dict[str, int]) -> None:
        self.converted = int(state["converted"])


class UnitConvertConfig(ComponentConfig):
    field: str = "value"
    from_: str = Field(alias="from")
    to: str
    output: str | None = None
    decimals: int | None = Field(default=None, ge=0, le=12)

    @model_validator(mode="after")
    def _convertible(self) -> UnitConvertConfig:
        conversion(self.from_, self.to)  # ValueError becomes a spec error with the line
        return self


class UnitConvertOperator(Operator):
    """The entry-point form: an Operator subclass with a typed Config."""

    Config = UnitConvertConfig

    def __init__(self, id: str, config: UnitConvertConfig, ctx: RunContext) -> None:
        super().__init__(id, config, ctx)
        self.inner = UnitConvert(
            {"field": config.field, "from": config.from_, "to": config.to,
             "output": config.output or config.field,
             **({"decimals": config.decimals} if config.decimals is not None else {})}
        )

    def process(self, batch: Batch) -> Batch:
        return self.inner.process(batch)

    def snapshot(self) -> Any:
        return self.inner.snapshot()

    def restore(self, state: Any) -> None:
        if state:
            self.inner.restore(state)
