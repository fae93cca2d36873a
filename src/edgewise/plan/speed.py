"""Node cores, estimate against `--simulate`'s realtime rounds at each round's machine speed.

The estimate's engine part (the engine alone at the site's pace) is measured again around every
realtime round (E R E R E R E); its other parts (stages, commits, ticks, the collector) come from
the paired calibration beside the processing-cost run, which ran before the rounds. On a shared
machine whose speed drifts between that run and a round, the round's measurement moves with the
machine but those parts do not. For the comparison (never for the estimate the plan document
prints, which stays the model's figure at calibration speed) each round's estimate scales them
by the machine's speed at that round against its speed at calibration: the mean of the round's
two neighbouring engine runs over the first engine run, made just after the processing-cost
run. Decoding (``ingest``) is the model's figure on both sides and is not scaled.
"""

from __future__ import annotations

import statistics
from typing import Any

ENGINE = "engine at the site's pace"
UNSCALED = ("ingest", ENGINE)


def round_estimates(parts: dict[str, float], halves: list[float], pairs: list[float]
                    ) -> list[tuple[float, float]]:
    """Per realtime round, (speed, node cores estimated at that speed): ``parts`` the estimate
    by part (`site_figures.node_cpu_model`), ``halves`` the engine's runs at the site's pace
    (the first just after the processing-cost run), ``pairs`` per round the mean of its two
    neighbouring runs (`engine_calibration.merge_site_engine`)."""
    rest = sum(v for k, v in parts.items() if k not in UNSCALED)
    ingest = parts.get("ingest", 0.0)
    ref = halves[0] if halves and halves[0] > 0 else None
    out = []
    for pair in pairs:
        speed = pair / ref if ref is not None else 1.0
        out.append((speed, ingest + pair + rest * speed))
    return out


def speed_comparison(parts: dict[str, float], halves: list[float] | None,
                     pairs: list[float] | None, measured: list[float] | None
                     ) -> dict[str, Any] | None:
    """Every round's measured node cores (decoding added, as the model's figure) over its own
    estimate at the round's machine speed, and the median of those ratios (``ratio``); None
    without rounds and their engine runs."""
    if not halves or not pairs or not measured or len(pairs) != len(measured):
        return None
    ingest = parts.get("ingest", 0.0)
    est = round_estimates(parts, halves, pairs)
    ratios = [(m + ingest) / e if e > 0 else float("nan")
              for m, (_s, e) in zip(measured, est, strict=True)]
    return {"speed": [s for s, _e in est], "estimate": [e for _s, e in est],
            "measured": [m + ingest for m in measured], "ratios": ratios,
            "ratio": statistics.median(ratios)}
