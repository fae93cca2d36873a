"""Split windows: the sites' `partial` aggregates merged by `combine` give what one `window`
over every site's readings gives - exactly for count, sum, mean, min, max, stddev, rms; for
p50/p95/p99 within the sketch's documented rank error. State survives a snapshot/restore;
a partial for a window already emitted goes to the late port."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from edgewise.pipeline.batch import Batch
from edgewise.pipeline.component import RunContext
from edgewise.pipeline.operators import sketch as sk
from edgewise.pipeline.operators.combine import Combine, CombineConfig
from edgewise.pipeline.operators.partial import Partial, PartialConfig
from edgewise.pipeline.operators.window import Window, WindowConfig

CTX = RunContext("t", Path("."))
AGGS = ["count", "sum", "mean", "min", "max", "stddev", "rms"]


def site_readings(site: int, n: int = 3000) -> Batch:
    rng = np.random.default_rng(site)
    ts = np.sort(rng.uniform(0, 60, n))
    v = np.round(rng.normal(50 + 10 * site, 5 + site, n), 2)
    return Batch({"sensor": np.array([f"s{site}/{i % 4}" for i in range(n)], dtype=object),
                  "ts": ts, "value": v}, n)


def run(op: Window | Partial | Combine, batch: Batch) -> Batch:
    """Everything the operator emits on 'out' for the batch and then at the end."""
    parts = []
    for res in (op.process(batch), op.flush()):
        res = res.get("out") if isinstance(res, dict) else res
        if res is not None:
            parts.append(res)
    return Batch.concat(parts)


def test_combined_partials_equal_one_window_over_all_readings() -> None:
    sites = [site_readings(s) for s in range(3)]
    partials = []
    for b in sites:
        p = Partial("p", PartialConfig(size=10, key_by=[], sketch=True), CTX)
        partials.append(run(p, b))
    assert set(partials[0].columns) >= {"count", "sum", "sumsq", "min", "max", "sketch"}
    comb = Combine("c", CombineConfig(size=10, aggregates=[*AGGS, "p50", "p95", "p99"]), CTX)
    allp = Batch.concat(partials)  # in event-time order, as the cloud's merge hands them
    got = run(comb, allp.take(np.argsort(allp["ts"], kind="stable")))
    whole = Window("w", WindowConfig(size=10, key_by=[], aggregates=AGGS), CTX)
    want = run(whole, Batch.concat(sites))
    assert got["window_start"].tolist() == want["window_start"].tolist() == [
        0.0, 10.0, 20.0, 30.0, 40.0, 50.0]
    assert got["count"].tolist() == want["count"].tolist()
    assert got["min"].tolist() == want["min"].tolist()
    assert got["max"].tolist() == want["max"].tolist()
    for a in ("sum", "mean", "stddev", "rms"):  # the same sums, added in another order
        np.testing.assert_allclose(got[a], want[a], rtol=1e-12)
    values = np.concatenate([b["value"] for b in sites])
    ts = np.concatenate([b["ts"] for b in sites])
    eps = sk.rank_error()
    assert eps == pytest.approx(0.0133, abs=5e-4)
    for j, w in enumerate(got["window_start"].tolist()):
        v = np.sort(values[(ts >= w) & (ts < w + 10)])
        for q in (50, 95, 99):
            est = got[f"p{q}"][j]
            rank = np.searchsorted(v, est, side="right") / len(v)
            assert abs(rank - q / 100) <= eps + 1 / len(v), (w, q, rank)


def test_combine_late_partials_and_restore() -> None:
    cfg = CombineConfig(size=10, aggregates=["count", "max"])
    comb = Combine("c", cfg, CTX)

    def part(w: float, n: int, hi: float) -> Batch:
        return Batch({"window_start": np.array([w]), "count": np.array([n]),
                      "sum": np.array([hi * n]), "sumsq": np.array([hi * hi * n]),
                      "min": np.array([hi]), "max": np.array([hi])}, 1)

    assert comb.process(part(0, 2, 1.0)) is None
    assert comb.process(part(0, 3, 5.0)) is None  # another site, same window: merged
    again = Combine("c", cfg, CTX)
    again.restore(comb.snapshot())
    out = again.process(part(10, 1, 2.0))  # a later window: window 0 is complete
    assert isinstance(out, dict)
    assert (out["out"]["count"].tolist(), out["out"]["max"].tolist()) == ([5], [5.0])
    late = again.process(part(0, 7, 9.0))
    assert isinstance(late, dict) and late["late"]["count"].tolist() == [7]
    assert "out" not in late
    assert math.isinf(Combine("c", cfg, CTX).watermark)
