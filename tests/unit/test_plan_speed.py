"""Node cores against the realtime rounds at each round's machine speed (`plan.speed`)."""

from __future__ import annotations

import itertools

import pytest

from edgewise.plan.speed import ENGINE, round_estimates, speed_comparison

PARTS = {"ingest": 0.02, "stages": 0.03, ENGINE: 0.04, "commits: state and chunks": 0.01,
         "ticks": 0.001, "garbage collector": 0.009}


def _at(speed: float) -> float:
    """Node cores (decoding left out) of a machine ``speed`` times slower than at calibration."""
    return sum(v for k, v in PARTS.items() if k != "ingest") * speed


def test_drift_between_calibration_and_rounds_does_not_move_the_ratio() -> None:
    # the machine slows down by 1.3x after the processing-cost run: the engine's runs around
    # the rounds and the rounds themselves slow down alike, the estimate's other parts were
    # calibrated before; the plain ratio is 1.27, the ratio at the rounds' speed 1.0
    ref = PARTS[ENGINE]
    halves = [ref, 1.3 * ref, 1.3 * ref, 1.3 * ref]
    pairs = [(a + b) / 2 for a, b in itertools.pairwise(halves)]
    measured = [_at(s / ref) for s in pairs]
    plain = (measured[1] + PARTS["ingest"]) / sum(PARTS.values())
    assert plain > 1.2
    out = speed_comparison(PARTS, halves, pairs, measured)
    assert out is not None
    assert out["ratios"] == pytest.approx([1.0, 1.0, 1.0])
    assert out["ratio"] == pytest.approx(1.0)
    assert out["speed"] == pytest.approx([1.15, 1.3, 1.3])


def test_steady_machine_compares_with_the_estimate_itself() -> None:
    ref = PARTS[ENGINE]
    est = round_estimates(PARTS, [ref] * 4, [ref] * 3)
    assert [e for _s, e in est] == pytest.approx([sum(PARTS.values())] * 3)
    out = speed_comparison(PARTS, [ref] * 4, [ref] * 3, [_at(1.0), 1.1 * _at(1.0), _at(1.0)])
    assert out is not None and out["ratio"] == pytest.approx(1.0)


def test_decoding_is_not_scaled_and_no_rounds_compare_nothing() -> None:
    ref = PARTS[ENGINE]
    (speed, est), = round_estimates(PARTS, [ref, 2 * ref], [2 * ref])
    assert speed == pytest.approx(2.0)
    assert est == pytest.approx(PARTS["ingest"] + 2 * _at(1.0))
    assert speed_comparison(PARTS, None, [ref], [0.1]) is None
    assert speed_comparison(PARTS, [ref, ref], [ref], [0.1, 0.2]) is None
