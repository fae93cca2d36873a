"""Deadband: report by exception, per key.

A reading is emitted when it differs from the last *emitted* reading of its key by more than
``deadband`` (absolute, in the field's units) or by more than ``percent`` of that reading's
magnitude, or when ``max_interval`` of event time has passed since the last emitted reading (a
heartbeat, so a steady value is still seen to be alive). The first reading of every key is always
emitted. Conditions combine with "or"; give at least one.

    - id: changes
      type: deadband
      inputs: [sensors]
      deadband: 0.5       # emit on a change of more than 0.5
      max_interval: 1m    # and at least once a minute

Emitted records are the input records unchanged (``_accepted`` included). The decision for one
reading depends on the ones emitted before it, so this runs a tight loop per record; state (last
emitted value and time per key) is checkpointed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from edgewise.pipeline.batch import Batch
from edgewise.pipeline.component import ComponentConfig, Emit, Operator, RunContext
from edgewise.pipeline.operators.filter import require_fields
from edgewise.pipeline.operators.keys import KeyIndex
from edgewise.pipeline.units import Duration


class DeadbandConfig(ComponentConfig):
    field: str = Field(default="value", description="the numeric field compared")
    deadband: float | None = Field(
        default=None, ge=0, description="emit when it moved more than this from the last emitted"
    )
    percent: float | None = Field(
        default=None, gt=0, description="emit when it moved more than this % of the last emitted"
    )
    max_interval: Duration | None = Field(
        default=None, gt=0, description="emit at least this often (event time), changed or not"
    )
    key_by: list[str] = Field(default=["sensor"], description="fields that identify a series")
    time_field: str = Field(default="ts", description="event time field (epoch seconds)")

    @model_validator(mode="after")
    def _some_rule(self) -> DeadbandConfig:
        if self.deadband is None and self.percent is None and self.max_interval is None:
            raise ValueError("set deadband, percent or max_interval (or several)")
        return self


class Deadband(Operator):
    Config = DeadbandConfig

    def __init__(self, id: str, config: DeadbandConfig, ctx: RunContext) -> None:
        super().__init__(id, config, ctx)
        self.keys = KeyIndex(config.key_by)
        # per key id: last emitted value and event time (None until the first reading)
        self.last_v: list[float | None] = []
        self.last_t: list[float] = []

    def process(self, batch: Batch) -> Emit:
        cfg = self.config
        require_fields(batch, [*cfg.key_by, cfg.field, cfg.time_field], self.id)
        kid = self.keys.ids_for(batch).tolist()
        missing = len(self.keys.values) - len(self.last_v)
        if missing > 0:
            self.last_v.extend([None] * missing)
            self.last_t.extend([-math.inf] * missing)
        vals = batch.columns[cfg.field].astype(np.float64, copy=False).tolist()
        ts = batch.columns[cfg.time_field].astype(np.float64, copy=False).tolist()
        band = cfg.deadband if cfg.deadband is not None else math.inf
        frac = cfg.percent / 100.0 if cfg.percent is not None else math.inf
        interval = cfg.max_interval if cfg.max_interval is not None else math.inf
        last_v, last_t = self.last_v, self.last_t
        keep: list[int] = []
        append = keep.append
        for i, k in enumerate(kid):
            v = vals[i]
            t = ts[i]
            lv = last_v[k]
            if lv is not None:
                d = abs(v - lv)
                if not (d > band or d > frac * abs(lv) or t - last_t[k] >= interval):
                    continue
            last_v[k] = v
            last_t[k] = t
            append(i)
        if not keep:
            return None
        if len(keep) == batch.n:
            return batch
        return batch.take(np.array(keep, dtype=np.int64))

    def snapshot(self) -> Any:
        return {
            "keys": self.keys.snapshot(),
            "last_v": list(self.last_v),
            "last_t": [t if math.isfinite(t) else None for t in self.last_t],
        }

    def restore(self, state: Any) -> None:
        if not state:
            return
        self.keys.restore(state["keys"])
        self.last_v = list(state["last_v"])
        self.last_t = [-math.inf if t is None else float(t) for t in state["last_t"]]
