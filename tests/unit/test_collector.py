"""`common.collector`: the garbage collector's settings of a serving process (issue 11)."""

from __future__ import annotations

import gc

import pytest

from edgewise.common.collector import (
    MAX_YOUNG,
    YOUNG_PER_SESSION,
    YOUNG_THRESHOLD,
    restore,
    scale_young,
    tune_for_server,
)


def test_tuning_freezes_what_exists_raises_the_young_threshold_and_is_undone() -> None:
    before = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    state = tune_for_server()
    try:
        assert gc.get_threshold() == (YOUNG_THRESHOLD, before[1], before[2])
        assert YOUNG_THRESHOLD == 20_000
        assert state.thresholds == before
        assert state.frozen == gc.get_freeze_count() > 0
    finally:
        restore(state)
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_a_threshold_below_one_is_refused_before_anything_changes() -> None:
    before = gc.get_threshold()
    with pytest.raises(ValueError, match="must be >= 1"):
        tune_for_server(0)
    assert (gc.get_threshold(), gc.get_freeze_count()) == (before, 0)


def test_the_young_threshold_follows_the_sessions_in_a_serving_process_only() -> None:
    before = gc.get_threshold()
    assert scale_young(10_000) is None  # not tuned: a library or test process keeps its own
    assert gc.get_threshold() == before
    state = tune_for_server()
    try:
        assert scale_young(300) == YOUNG_THRESHOLD  # few sessions: the tuned threshold
        assert scale_young(10_000) == 10_000 * YOUNG_PER_SESSION == 100_000
        assert gc.get_threshold() == (100_000, before[1], before[2])
        assert scale_young(10**6) == MAX_YOUNG == 200_000
        assert scale_young(0) == YOUNG_THRESHOLD
        assert gc.get_threshold() == (YOUNG_THRESHOLD, before[1], before[2])
    finally:
        restore(state)
    assert scale_young(10_000) is None
    assert gc.get_threshold() == before
