"""Micro-batches: the unit that moves through the engine.

A `Batch` is a set of equally long numpy columns. Numbers are float64 or int64 arrays, text is an
object array of `str`. The optional column ``_accepted`` holds, per record, the monotonic time
(`time.perf_counter()`) at which a source accepted it; operators that select or derive rows carry
it along so sinks can measure accept-to-action latency. Columns whose names start with ``_`` are
internal and never leave the node.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from edgewise.outbox.records import concat_columns

ACCEPTED = "_accepted"


class Batch:
    """Columnar records; every column has the same length."""

    __slots__ = ("columns", "n")

    def __init__(self, columns: Mapping[str, np.ndarray], n: int | None = None) -> None:
        self.columns: dict[str, np.ndarray] = dict(columns)
        if n is None:
            n = len(next(iter(self.columns.values()))) if self.columns else 0
        self.n = n

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def empty(cls) -> Batch:
        return cls({}, 0)

    @classmethod
    def from_records(cls, records: list[Mapping[str, Any]]) -> Batch:
        """Build from a list of dicts (slow path; used by tests and small sources)."""
        if not records:
            return cls.empty()
        names: dict[str, None] = {}
        for r in records:
            for k in r:
                names.setdefault(k, None)
        cols = {name: column([r.get(name) for r in records]) for name in names}
        return cls(cols, len(records))

    @classmethod
    def concat(cls, batches: Iterable[Batch]) -> Batch:
        parts = [b for b in batches if b.n]
        if not parts:
            return cls.empty()
        if len(parts) == 1:
            return parts[0]
        return cls(concat_columns((b.columns, b.n) for b in parts), sum(b.n for b in parts))

    # -- access -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.n

    def __contains__(self, name: str) -> bool:
        return name in self.columns

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    def take(self, index: np.ndarray) -> Batch:
        """Rows selected by a boolean mask or an integer index array."""
        if index.dtype == bool:
            n = int(np.count_nonzero(index))
            if n == self.n:
                return self
        else:
            n = len(index)
        return Batch({k: v[index] for k, v in self.columns.items()}, n)

    def with_columns(self, **cols: np.ndarray) -> Batch:
        merged = dict(self.columns)
        merged.update(cols)
        return Batch(merged, self.n)

    def public_columns(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in self.columns.items() if not k.startswith("_")}

    def to_records(self, internal: bool = False) -> list[dict[str, Any]]:
        cols = self.columns if internal else self.public_columns()
        lists = {k: v.tolist() for k, v in cols.items()}
        return [{k: lists[k][i] for k in lists} for i in range(self.n)]

    def __repr__(self) -> str:
        return f"Batch(n={self.n}, columns={list(self.columns)})"


def column(values: list[Any]) -> np.ndarray:
    """Turn a list of Python values into the column type the engine uses."""
    if all(isinstance(v, bool) for v in values):
        return np.array(values, dtype=bool)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return np.array(values, dtype=np.int64)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return np.array(values, dtype=np.float64)
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out
