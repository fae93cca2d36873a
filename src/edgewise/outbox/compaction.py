"""Compaction: raw records of a chunk become one aggregate per key when the outbox is full and
the stream allows it (``compact: true``); the chunk keeps its sequence range. Pure, no I/O."""

from __future__ import annotations

import numpy as np


def compact_columns(cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Raw records → one aggregate per key: count, and mean/min/max of each numeric field.

    The key is the first text column (e.g. ``sensor``); ``ts`` becomes ``ts_first``/``ts_last``.
    """
    if not cols:
        return cols
    n = len(next(iter(cols.values())))
    key = next((k for k, v in cols.items() if v.dtype.kind == "O"), None)
    if key is None:
        keys = np.zeros(n, dtype=np.int64)
        uniq = np.array(["*"], dtype=object)
    else:
        uniq_list, keys = np.unique(cols[key].astype(str), return_inverse=True)
        uniq = uniq_list.astype(object)
    counts = np.bincount(keys, minlength=len(uniq))
    out: dict[str, np.ndarray] = {(key or "key"): uniq, "count": counts.astype(np.int64)}
    for name, col in cols.items():
        if name == key or col.dtype.kind not in ("f", "i", "u"):
            continue
        v = col.astype(np.float64)
        if name == "ts":
            mins = np.full(len(uniq), np.inf)
            maxs = np.full(len(uniq), -np.inf)
            np.minimum.at(mins, keys, v)
            np.maximum.at(maxs, keys, v)
            out["ts_first"], out["ts_last"] = mins, maxs
            continue
        sums = np.bincount(keys, weights=v, minlength=len(uniq))
        mins = np.full(len(uniq), np.inf)
        maxs = np.full(len(uniq), -np.inf)
        np.minimum.at(mins, keys, v)
        np.maximum.at(maxs, keys, v)
        out[f"{name}_mean"] = sums / np.maximum(counts, 1)
        out[f"{name}_min"] = mins
        out[f"{name}_max"] = maxs
    return out
