"""Anomaly detection per key with an exponentially weighted mean and variance.

For each reading ``x`` of a key, with the key's current estimates ``mean`` and ``var``:

    std = sqrt(var)                                    (floored at ``min_std``)
    z   = (x - mean) / std                             computed BEFORE x updates the estimates
    emit the reading if the key has seen at least ``warmup`` readings and |z| > ``z``
    then: d = x - mean;  mean += alpha * d;  var = (1 - alpha) * (var + alpha * d * d)

The first reading of a key sets ``mean = x, var = 0``. When ``std`` is 0 (a perfectly steady
signal and ``min_std: 0``), any change gives an infinite z and is emitted. Emitted records are the
input records plus ``zscore``, ``mean`` and ``std`` (the estimates the reading was judged
against), ``_accepted`` included; they count as alarms.

    - id: odd
      type: anomaly
      inputs: [sensors]
      alpha: 0.05
      z: 4
      warmup: 50
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydantic import Field

from edgewise.pipeline.batch import Batch
from edgewise.pipeline.component import ComponentConfig, Emit, Operator, RunContext
from edgewise.pipeline.operators.filter import require_fields
from edgewise.pipeline.operators.keys import KeyIndex


class AnomalyConfig(ComponentConfig):
    field: str = Field(default="value", description="the numeric field watched")
    alpha: float = Field(default=0.1, gt=0, lt=1, description="EWMA weight of each new reading")
    z: float = Field(default=3.0, gt=0, description="emit readings with |z-score| above this")
    warmup: int = Field(default=30, ge=1, description="readings per key before any is judged")
    min_std: float = Field(default=0.0, ge=0, description="floor of the std used for z")
    key_by: list[str] = Field(default=["sensor"], description="fields that identify a series")


class Anomaly(Operator):
    Config = AnomalyConfig
    raises_alarms = True

    def __init__(self, id: str, config: AnomalyConfig, ctx: RunContext) -> None:
        super().__init__(id, config, ctx)
        self.keys = KeyIndex(config.key_by)
        # per key id: readings seen, mean, variance
        self.count: list[int] = []
        self.mean: list[float] = []
        self.var: list[float] = []

    def process(self, batch: Batch) -> Emit:
        cfg = self.config
        require_fields(batch, [*cfg.key_by, cfg.field], self.id)
        kid = self.keys.ids_for(batch).tolist()
        missing = len(self.keys.values) - len(self.count)
        if missing > 0:
            self.count.extend([0] * missing)
            self.mean.extend([0.0] * missing)
            self.var.extend([0.0] * missing)
        vals = batch.columns[cfg.field].astype(np.float64, copy=False).tolist()
        count, mean, var = self.count, self.mean, self.var
        alpha, keep_w = cfg.alpha, 1.0 - cfg.alpha
        limit, warmup, floor = cfg.z, cfg.warmup, cfg.min_std
        sqrt, inf = math.sqrt, math.inf
        rows: list[int] = []
        zs: list[float] = []
        means: list[float] = []
        stds: list[float] = []
        for i, k in enumerate(kid):
            x = vals[i]
            c = count[k]
            if c == 0:
                count[k], mean[k], var[k] = 1, x, 0.0
                continue
            m = mean[k]
            d = x - m
            s = sqrt(var[k])
            if s < floor:
                s = floor
            if c >= warmup:
                if s > 0.0:
                    z = d / s
                elif d:
                    z = inf if d > 0 else -inf
                else:
                    z = 0.0
                if abs(z) > limit:
                    rows.append(i)
                    zs.append(z)
                    means.append(m)
                    stds.append(s)
            incr = alpha * d
            mean[k] = m + incr
            var[k] = keep_w * (var[k] + d * incr)
            count[k] = c + 1
        if not rows:
            return None
        idx = np.array(rows, dtype=np.int64)
        return batch.take(idx).with_columns(
            zscore=np.array(zs), mean=np.array(means), std=np.array(stds)
        )

    def snapshot(self) -> Any:
        return {
            "keys": self.keys.snapshot(),
            "count": list(self.count),
            "mean": list(self.mean),
            "var": list(self.var),
        }

    def restore(self, state: Any) -> None:
        if not state:
            return
        self.keys.restore(state["keys"])
        self.count = [int(c) for c in state["count"]]
        self.mean = [float(m) for m in state["mean"]]
        self.var = [float(v) for v in state["var"]]
