"""`edgewise plan examples/workloads/vibration.yaml --simulate`: the document, the artefacts, and
estimate against measurement within 15% (uplink bytes, records, stage CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_plan_examples import check_example


@pytest.mark.slow
def test_vibration_with_simulation_agrees_with_its_estimate(
        tmp_path_factory: pytest.TempPathFactory, plan_cache: Path) -> None:
    # 240,000 MQTT readings a second: decoding alone needs more than the one event loop
    # the engine runs on can give at the planned utilisation (plan/checks.py)
    summary = check_example("vibration", tmp_path_factory.mktemp("vibration"),
                            plan_cache,
                            unmet=("pump-station: one event loop: the engine runs on one event "
                                   "loop: ",))
    assert list(summary["sites"]) == ["pump-station"]
