"""Harsh-braking events from longitudinal deceleration readings.

A plain plugin class (docs/plugins.md): ``process`` keeps the readings whose deceleration is at
or above ``threshold`` (m/s²) and labels them with a severity; everything else is dropped.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgewise.pipeline.batch import Batch


class HarshBraking:
    stateless = True
    raises_alarms = True

    def __init__(self, options: dict[str, Any]) -> None:
        self.threshold = float(options.get("threshold", 3.5))
        self.severe = float(options.get("severe", 6.0))
        self.field = str(options.get("field", "value"))

    def process(self, batch: Batch) -> Batch | None:
        v = np.asarray(batch.columns[self.field], dtype=np.float64)
        rows = np.flatnonzero(v >= self.threshold)
        if not len(rows):
            return None
        severity = np.where(v[rows] >= self.severe, "severe", "harsh").astype(object)
        return Batch({"sensor": batch.columns["sensor"][rows], "ts": batch.columns["ts"][rows],
                      "decel": v[rows], "severity": severity}, len(rows))
