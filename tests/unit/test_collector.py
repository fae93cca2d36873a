"""`common.collector`: the garbage collector's settings of a serving process (issue 11)."""

from __future__ import annotations

import gc

import pytest

from edgewise.common.collector import YOUNG_THRESHOLD, restore, tune_for_server


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
