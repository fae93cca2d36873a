"""Filter: keep the records for which an expression is true.

    - id: hot
      type: filter
      inputs: [sensors]
      where: "value > 80 and startswith(sensor, 'line1/temp')"

The expression language is the one in `edgewise.pipeline.expr` (no `eval`; a whitelist of
operators and functions, evaluated on whole columns). A bad expression is a spec error pointing
at the ``where:`` line. At run time, a field the expression reads that is missing from a batch
stops the pipeline with an `ExpressionError` naming the field and the fields that are there.
Records that pass keep every column, ``_accepted`` included.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field, field_validator

from edgewise.errors import ConfigError
from edgewise.pipeline.batch import Batch
from edgewise.pipeline.component import ComponentConfig, Emit, Operator, RunContext
from edgewise.pipeline.expr import Compiled, ExpressionError, compile_expr, evaluate_mask


class FilterConfig(ComponentConfig):
    where: str = Field(description="condition (expression language); records where it holds pass")

    @field_validator("where")
    @classmethod
    def _compiles(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("write a condition, e.g. where: \"value > 80\"")
        try:
            compile_expr(v, where="where")
        except ExpressionError as exc:
            raise ValueError(str(exc)) from None
        return v


class Filter(Operator):
    Config = FilterConfig

    def __init__(self, id: str, config: FilterConfig, ctx: RunContext) -> None:
        super().__init__(id, config, ctx)
        self.fn: Compiled = compile_expr(config.where, where=f"stage {id!r}: where")
        self.dropped = 0

    def process(self, batch: Batch) -> Emit:
        mask = run_mask(self.fn, batch, f"stage {self.id!r}: where {self.config.where!r}")
        kept = int(mask.sum())
        self.dropped += batch.n - kept
        if kept == 0:
            return None
        return batch.take(mask)


def run_mask(fn: Compiled, batch: Batch, what: str) -> np.ndarray:
    """Evaluate a condition; numpy's complaints (e.g. text compared with a number) become
    `ExpressionError` with the stage and expression named."""
    try:
        mask = evaluate_mask(fn, batch)
    except ExpressionError:
        raise
    except (TypeError, ValueError, ArithmeticError) as exc:
        raise ExpressionError(f"{what}: cannot evaluate on these records: {exc}") from None
    if mask.shape != (batch.n,):
        raise ExpressionError(f"{what}: does not give one true/false per record")
    return mask



class MissingFieldError(ConfigError):
    """A stage reads a field its input records do not have (usually a typo in the spec)."""


def require_fields(batch: Batch, fields: list[str], stage: str) -> None:
    """Raise `MissingFieldError` naming the stage, the field and the fields that are there.

    Shared by the keyed operators of this package (deadband, rate_of_change, anomaly,
    downsample, fft), which read fixed fields named in their config.
    """
    columns = batch.columns
    for name in fields:
        if name not in columns:
            have = ", ".join(sorted(batch.public_columns())) or "no fields"
            raise MissingFieldError(
                f"stage {stage!r}: field {name!r} is not in the records (they have: {have}); "
                "check the stage's field, key_by and time_field"
            )
