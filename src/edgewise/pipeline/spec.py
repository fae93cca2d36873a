"""The pipeline spec: YAML in the shape of a Kubernetes object, validated with pydantic.

    apiVersion: edgewise.io/v1
    kind: Pipeline
    metadata: {name: factory-line}
    spec:
      sources: [{id, type, ...}]          where records come from
      stages:  [{id, type, inputs, ...}]  operators; an input is a component id or 'id.port'
      sinks:   [{id, type, inputs, ...}]  where results go (outbox, mqtt, webhook, file, log)
      outbox:  {max_bytes, sync}          the durable buffer towards the cloud
      batching: {max_records, linger_ms}

`load_pipeline` returns a `PipelineSpec` or raises `SpecError` listing every problem as
``file:line: field: message``; it never lets a pydantic or YAML traceback reach the user.

Two modes of `parse_pipeline` are for pipelines that come from the control plane:

* ``load_code=False`` (the control plane validating a pushed pipeline): no user code is
  imported. A ``type: python`` stage's ``class`` is checked by its form (``package.module:
  ClassName``) and its ``options`` are not checked; an operator type that is not built in is
  taken as an entry-point name if it has the form of one (`registry.PLUGIN_NAME`), its
  parameters and ports unchecked. The errors never depend on what is installed on the server.
  The node, which loads the code, checks everything again when it applies the pipeline.
* ``confinement`` (the node parsing a pipeline from the cloud): every file parameter must lie
  inside the node's allowed folders (`edgewise.pipeline.paths`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgewise.errors import ConfigError, SpecError
from edgewise.pipeline import registry
from edgewise.pipeline.component import LOAD_CODE
from edgewise.pipeline.paths import Confinement, confine
from edgewise.pipeline.units import ByteSize, Duration
from edgewise.specfile import find_cycle, load_document, problems_from, read_text
from edgewise.specfile.marks import Path as KeyPath
from edgewise.specfile.marks import line_of

API_VERSION = "edgewise.io/v1"
ID_PATTERN = r"^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Metadata(_Strict):
    name: str = Field(pattern=ID_PATTERN)
    labels: dict[str, str] = {}
    description: str = ""


class ComponentEntry(BaseModel):
    """The common part of a source, stage or sink; the rest is checked by its own Config."""

    model_config = ConfigDict(extra="allow", frozen=True)
    id: str = Field(pattern=ID_PATTERN)
    type: str
    inputs: list[str] = []
    placement: Literal["edge", "cloud", "auto"] = "edge"


class OutboxSettings(_Strict):
    max_bytes: ByteSize = 256 * 1024**2
    sync: Literal["full", "normal"] = "full"
    """full: fsync the WAL on every group commit (survives power loss); normal: survives a crash
    of the process but may lose the last commits on power loss."""
    commit_interval: Duration = 0.02
    """Least time between two group commits (records wait at most this long to be durable;
    local actions do not wait). Bounds how often operator state is checkpointed."""


class BatchingSettings(_Strict):
    max_records: int = Field(default=8192, ge=1, le=1_000_000)
    linger_ms: float = Field(default=1.0, ge=0, le=1000)
    queue_batches: int = Field(default=8, ge=1, le=1024)


class Body(_Strict):
    sources: list[ComponentEntry] = Field(min_length=1)
    stages: list[ComponentEntry] = []
    sinks: list[ComponentEntry] = []
    outbox: OutboxSettings = OutboxSettings()
    batching: BatchingSettings = BatchingSettings()
    tick: Duration = 0.1


class Document(_Strict):
    apiVersion: Literal["edgewise.io/v1"]  # the YAML key
    kind: Literal["Pipeline"]
    metadata: Metadata
    spec: Body


@dataclass(frozen=True)
class Component:
    """A validated component: its entry, class and typed config."""

    kind: str  # source | operator | sink
    entry: ComponentEntry
    cls: type
    config: Any

    @property
    def id(self) -> str:
        return self.entry.id


@dataclass(frozen=True)
class PipelineSpec:
    path: Path
    document: Document
    sources: list[Component]
    stages: list[Component]
    sinks: list[Component]
    digest: str

    @property
    def name(self) -> str:
        return self.document.metadata.name

    @property
    def body(self) -> Body:
        return self.document.spec


def load_pipeline(path: str | Path) -> PipelineSpec:
    """Read and validate a pipeline file. Raises `SpecError` (or `ConfigError` if unreadable)."""
    path = Path(path)
    return parse_pipeline(read_text(path), str(path), base_dir=path.parent)


def parse_pipeline(
    text: str, source: str = "<pipeline>", base_dir: Path | None = None, *,
    load_code: bool = True, confinement: Confinement | None = None,
) -> PipelineSpec:
    """Validate pipeline YAML; relative paths in it (file sources) are taken from ``base_dir``
    (with a ``confinement``: from its base). ``load_code=False`` imports no user code, and
    ``confinement`` keeps every file parameter inside allowed folders (module docstring)."""
    if confinement is not None:
        base_dir = confinement.base
    data, lines = load_document(text, source)
    try:
        doc = Document.model_validate(data)
    except ValidationError as exc:
        raise SpecError(source, problems_from(exc, (), lines)) from None

    problems: list[tuple[int | None, str, str]] = []
    built: dict[str, list[Component]] = {"sources": [], "stages": [], "sinks": []}
    seen: dict[str, KeyPath] = {}
    ports: dict[str, tuple[str, ...]] = {}
    untyped: set[str] = set()  # ids of unknown types: inputs naming them are not checked again
    context = {LOAD_CODE: load_code}
    groups = (("sources", "source"), ("stages", "operator"), ("sinks", "sink"))
    for group, kind in groups:
        for i, entry in enumerate(getattr(doc.spec, group)):
            where: KeyPath = ("spec", group, i)
            if entry.id in seen:
                problems.append(
                    (line_of(lines, (*where, "id")), f"{'.'.join(map(str, where))}.id",
                     f"duplicate id {entry.id!r} (first used at line "
                     f"{line_of(lines, seen[entry.id])}); ids must be unique")
                )
                continue
            seen[entry.id] = (*where, "id")
            try:
                cls = registry.resolve(kind, entry.type, load_code=load_code)
            except KeyError:
                problems.append(
                    (line_of(lines, (*where, "type")), f"spec.{group}.{i}.type",
                     f"unknown {kind} type {entry.type!r}; "
                     f"known: {', '.join(registry.known(kind, load_code=load_code))}")
                )
                untyped.add(entry.id)
                continue
            except ConfigError as exc:
                problems.append(
                    (line_of(lines, (*where, "type")), f"spec.{group}.{i}.type", str(exc))
                )
                untyped.add(entry.id)
                continue
            # known even if its parameters are wrong, so inputs naming it are not errors too
            ports[entry.id] = tuple(getattr(cls, "ports", ("out",))) if kind != "sink" else ()
            if cls is registry.Unloaded:  # its ports are checked on the node
                untyped.add(entry.id)
            params = {k: v for k, v in (entry.model_extra or {}).items()}
            try:
                config = cls.Config.model_validate(params, context=context)
            except ValidationError as exc:
                problems.extend(problems_from(exc, where, lines))
                continue
            if confinement is not None:
                for loc, message in confine(config, confinement):
                    at = (*where, *loc)
                    problems.append((line_of(lines, at), ".".join(map(str, at)), message))
            if kind == "source" and entry.inputs:
                problems.append((line_of(lines, (*where, "inputs")), f"spec.{group}.{i}.inputs",
                                 "a source takes no inputs (remove 'inputs')"))
            if kind != "source" and not entry.inputs:
                problems.append((line_of(lines, where), f"spec.{group}.{i}.inputs",
                                 "missing: list the ids this reads from, e.g. inputs: [sensors]"))
            built[group].append(Component(kind, entry, cls, config))

    # wiring: every input names a known component and port, sinks are not inputs
    for group, _kind in groups[1:]:
        for i, entry in enumerate(getattr(doc.spec, group)):
            for j, ref in enumerate(entry.inputs):
                node, _, port = ref.partition(".")
                port = port or "out"
                where = ("spec", group, i, "inputs", j)
                field = f"spec.{group}.{i}.inputs.{j}"
                if node in untyped:
                    continue
                if node not in ports:
                    problems.append((line_of(lines, where), field,
                                     f"{ref!r} is not the id of a source or stage; known: "
                                     f"{', '.join(k for k, v in ports.items() if v) or 'none'}"))
                elif not ports[node]:
                    problems.append((line_of(lines, where), field,
                                     f"{ref!r} is a sink; sinks cannot feed other components"))
                elif port not in ports[node]:
                    problems.append((line_of(lines, where), field,
                                     f"{node!r} has no output {port!r}; it has: "
                                     f"{', '.join(ports[node])}"))
    if not problems:
        cycle = find_cycle(
            {s.id: [r.partition('.')[0] for r in s.inputs] for s in doc.spec.stages}
        )
        if cycle:
            problems.append((line_of(lines, ("spec", "stages")), "spec.stages",
                             f"stages form a cycle: {' -> '.join(cycle)}; break it"))
    if problems:
        raise SpecError(source, problems)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    # the engine resolves relative paths against the spec's folder: make that base_dir
    spec_path = Path(source) if base_dir is None else Path(base_dir) / Path(source).name
    return PipelineSpec(
        spec_path, doc, built["sources"], built["stages"], built["sinks"], digest
    )


def topological_stages(spec: PipelineSpec) -> list[Component]:
    """Stages ordered so every stage comes after the stages it reads from."""
    by_id = {c.id: c for c in spec.stages}
    order: list[Component] = []
    done: set[str] = set()

    def visit(c: Component) -> None:
        if c.id in done:
            return
        done.add(c.id)
        for ref in c.entry.inputs:
            dep = by_id.get(ref.partition(".")[0])
            if dep is not None:
                visit(dep)
        order.append(c)

    for c in spec.stages:
        visit(c)
    return order
