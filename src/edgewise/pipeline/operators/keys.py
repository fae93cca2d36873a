"""Mapping key columns (e.g. ``sensor``) to small integer ids, shared by keyed operators."""

from __future__ import annotations

from typing import Any

import numpy as np

from edgewise.pipeline.batch import Batch


class KeyIndex:
    """Interns key values; ids are stable for the life of the operator (and its checkpoint)."""

    def __init__(self, fields: list[str]) -> None:
        self.fields = fields
        self.ids: dict[Any, int] = {}
        self.values: list[Any] = []

    def ids_for(self, batch: Batch) -> np.ndarray:
        if not self.fields:
            if not self.values:
                self.ids[()] = 0
                self.values.append(())
            return np.zeros(batch.n, dtype=np.int64)
        if len(self.fields) == 1:
            items = batch.columns[self.fields[0]].tolist()
        else:
            items = list(zip(*(batch.columns[f].tolist() for f in self.fields), strict=True))
        get = self.ids.get
        out = [get(x) for x in items]
        if None in out:
            for i, x in enumerate(items):
                if out[i] is None:
                    k = self.ids.get(x)
                    if k is None:
                        k = len(self.values)
                        self.ids[x] = k
                        self.values.append(x)
                    out[i] = k
        return np.array(out, dtype=np.int64)

    def columns(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Key columns for the given ids."""
        cols: dict[str, np.ndarray] = {}
        if not self.fields:
            return cols
        vals = [self.values[i] for i in ids.tolist()]
        if len(self.fields) == 1:
            arr = np.empty(len(vals), dtype=object)
            arr[:] = vals
            cols[self.fields[0]] = arr
        else:
            for j, f in enumerate(self.fields):
                arr = np.empty(len(vals), dtype=object)
                arr[:] = [v[j] for v in vals]
                cols[f] = arr
        return cols

    def snapshot(self) -> list[Any]:
        return [list(v) if isinstance(v, tuple) else v for v in self.values]

    def restore(self, values: list[Any]) -> None:
        self.values = [tuple(v) if isinstance(v, list) else v for v in values]
        self.ids = {v: i for i, v in enumerate(self.values)}
