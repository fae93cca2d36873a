"""`edgewise plan examples/workloads/retail.yaml --simulate`: the document, the artefacts, and
estimate against measurement within 15% (uplink bytes, records, stage CPU)."""

from __future__ import annotations

import pytest
from test_plan_examples import check_example

from conftest import LONG_ONLY


@LONG_ONLY  # the default suite plans factory-line and vibration
@pytest.mark.slow
def test_retail_with_simulation_agrees_with_its_estimate(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    summary = check_example("retail", tmp_path_factory.mktemp("retail"),
                            tmp_path_factory.mktemp("cache"))
    assert list(summary["sites"]) == ["store"]
