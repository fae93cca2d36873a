"""The component reference, generated from the code: every source, operator and sink with the
parameters its ``Config`` accepts, their types and defaults.

`edgewise components` prints it; docs/pipeline-spec.md embeds it between markers and a test
checks the two agree, so the docs cannot drift from the code.
"""

from __future__ import annotations

import inspect
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from edgewise.pipeline import registry
from edgewise.pipeline.units import parse_bytes, parse_duration

BEGIN = "<!-- BEGIN GENERATED: edgewise components --markdown -->"
END = "<!-- END GENERATED -->"
KIND_TITLES = {"source": "Sources", "operator": "Operators (stages)", "sink": "Sinks"}


def _type_name(annotation: Any, metadata: list[Any] | None = None) -> str:
    """A short, readable type: ``duration``, ``list[str]``, ``'every' | 'state'``."""
    for m in metadata or ():
        fn = getattr(m, "func", None)
        if fn is parse_duration:
            return "duration"
        if fn is parse_bytes:
            return "size"
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0], list(args[1:]))
    if origin is Literal:
        return " \\| ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args)
    if origin in (list, dict, tuple):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: Any) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "**required**"
    value = field.default_factory() if field.default_factory is not None else field.default
    return f"`{value!r}`"


def describe(kind: str, name: str) -> str:
    cls = registry.resolve(kind, name)
    doc = inspect.getmodule(cls).__doc__ or cls.__doc__ or ""
    summary = " ".join(doc.strip().split("\n\n")[0].split())
    lines = [f"### `{name}`", "", summary, ""]
    config: type[BaseModel] = cls.Config
    if config.model_fields:
        lines += ["| parameter | type | default | meaning |", "|---|---|---|---|"]
        for name_, field in config.model_fields.items():
            fname = field.alias or name_
            kind_ = _type_name(field.annotation, field.metadata)
            meaning = " ".join((field.description or "").split())
            lines.append(f"| `{fname}` | {kind_} | {_default(field)} | {meaning} |")
        lines.append("")
    ports = getattr(cls, "ports", None)
    if kind == "operator" and ports and tuple(ports) != ("out",):
        lines += [f"Output ports: {', '.join(f'`{p}`' for p in ports)}.", ""]
    return "\n".join(lines)


def markdown() -> str:
    parts = [BEGIN, ""]
    for kind, table in registry.KINDS.items():
        parts += [f"## {KIND_TITLES[kind]}", ""]
        for name in table:
            try:
                parts.append(describe(kind, name))
            except Exception as exc:  # a component that fails to import is shown, not hidden
                parts += [f"### `{name}`", "", f"(not available: {exc})", ""]
    parts.append(END)
    return "\n".join(parts) + "\n"
