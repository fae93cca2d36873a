"""Which stages of a site the planner's calibration can run (`edgewise.plan.costs`): the
built-in operators whose inputs it can produce, and the user functions it runs among them."""

from __future__ import annotations

from edgewise.plan.cost_model import CALIBRATED
from edgewise.plan.workload import SiteSpec, StageSpec


def runnable(site: SiteSpec, stages: list[StageSpec]) -> list[StageSpec]:
    """Stages the calibration can run: built-in operators whose inputs it can produce."""
    have = {s.id for s in site.sources}
    out = []
    for st in stages:
        if st.function is None and st.cpu_us_per_record is None and \
                st.operator in CALIBRATED and all(r in have for r in st.inputs):
            out.append(st)
            have.add(st.id)
    return out


def passengers(site: SiteSpec, stages: list[StageSpec],
                runnable: list[StageSpec]) -> list[StageSpec]:
    """User functions the calibration runs among the operators it fits (not fitted: they
    cost what they declare), those whose inputs it produces and whose class imports."""
    from edgewise.pipeline.operators.plugin import load_user_class

    have = {s.id for s in site.sources} | {st.id for st in runnable}
    out = []
    for st in stages:
        if st.function is None or not all(r in have for r in st.inputs):
            continue
        try:
            load_user_class(st.function)
        except Exception:  # not importable here (no spec.code.path on sys.path): left out
            continue
        out.append(st)
    return out
