"""What makes a pipeline a cloud pipeline, checked with file:line errors like any pipeline.

A cloud pipeline is an ordinary pipeline document (`edgewise.pipeline.spec`) that the control
plane runs itself: its sources are ingested streams (``type: stream``), its stages are built-in
operators (the control plane loads no user code, so no ``type: python`` or plugin operators),
and its sinks are ``outbox`` sinks, whose records are stored as streams of the pseudo-node
``cloud:<pipeline name>`` (`results_node`): ``edgewise data query --node cloud:NAME --stream
S`` reads them and data out forwards them. No component may be placed on the edge.
"""

from __future__ import annotations

from edgewise.errors import SpecError
from edgewise.pipeline import registry
from edgewise.pipeline.spec import PipelineSpec, parse_pipeline
from edgewise.specfile import load_document
from edgewise.specfile.marks import line_of

RESULTS_PREFIX = "cloud:"
SINK_TYPES = ("outbox",)
SOURCE_TYPES = ("stream",)


def results_node(pipeline: str) -> str:
    """The node id a cloud pipeline's results are stored under."""
    return f"{RESULTS_PREFIX}{pipeline}"


def parse_cloud_pipeline(text: str, source: str = "<cloud pipeline>") -> PipelineSpec:
    """Validate a cloud pipeline; raises `SpecError` listing every problem with its line."""
    spec = parse_pipeline(text, source, load_code=False)
    _, lines = load_document(text, source)
    problems: list[tuple[int | None, str, str]] = []
    groups = (("sources", spec.sources, SOURCE_TYPES), ("stages", spec.stages, None),
              ("sinks", spec.sinks, SINK_TYPES))
    for group, comps, allowed in groups:
        for i, c in enumerate(comps):
            where = ("spec", group, i)
            if c.entry.placement == "edge" and "placement" in (c.entry.model_fields_set or ()):
                problems.append((line_of(lines, (*where, "placement")),
                                 f"spec.{group}.{i}.placement",
                                 "placed on the edge: a cloud pipeline holds only what runs in "
                                 "the control plane (edgewise plan apply splits a placed "
                                 "pipeline for you)"))
            if allowed is not None and c.entry.type not in allowed:
                problems.append((line_of(lines, (*where, "type")), f"spec.{group}.{i}.type",
                                 f"a cloud pipeline's {group} must be of type "
                                 f"{' or '.join(allowed)}, not {c.entry.type!r}"))
            if group == "stages" and (c.entry.type not in registry.OPERATORS
                                      or c.entry.type == "python"):
                problems.append((line_of(lines, (*where, "type")), f"spec.{group}.{i}.type",
                                 f"{c.entry.type!r}: the control plane runs built-in operators "
                                 "only (it loads no user code)"))
    if problems:
        raise SpecError(source, problems)
    return spec
