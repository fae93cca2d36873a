"""Mergeable percentile sketches for split windows: Apache DataSketches' KLL sketch.

A KLL sketch of ``k`` (default 200) answers a quantile with a rank error of at most
`rank_error` (k=200: 1.33% of the records, at 99% confidence, whatever the data), and two
sketches merge into one with the same guarantee, so the percentiles of sketches combined
across nodes keep that bound. Sketches travel as base64 text in a record column (the outbox
codec stores text). ``datasketches`` is in the ``sketch`` extra (``pip install
'edgewise[sketch]'``, part of ``cloud``); `require` names it when it is missing.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from edgewise.errors import ConfigError

DEFAULT_K = 200


def require() -> Any:
    try:
        import datasketches
    except ImportError:
        raise ConfigError("percentile sketches need the datasketches package: pip install "
                          "'edgewise[sketch]'") from None
    return datasketches


def rank_error(k: int = DEFAULT_K) -> float:
    """The sketch's bound on a quantile's rank error (fraction of n, 99% confidence)."""
    return float(require().kll_doubles_sketch.get_normalized_rank_error(k, False))


def encode(values: np.ndarray, k: int = DEFAULT_K) -> str:
    s = require().kll_doubles_sketch(k)
    if len(values):
        s.update(np.ascontiguousarray(values, dtype=np.float64))
    return base64.b64encode(s.serialize()).decode("ascii")


def merge(texts: list[str], k: int = DEFAULT_K) -> Any:
    ds = require()
    out = ds.kll_doubles_sketch(k)
    for t in texts:
        if t:
            out.merge(ds.kll_doubles_sketch.deserialize(base64.b64decode(t)))
    return out


def quantile(sketch: Any, q: float) -> float:
    return float("nan") if sketch.is_empty() else float(sketch.get_quantile(q))
