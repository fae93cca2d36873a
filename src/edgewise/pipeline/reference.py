"""The component reference, generated from the code: every source, operator and sink with the
parameters its ``Config`` accepts, their types and defaults.

`edgewise components` prints it; docs/pipeline-spec.md embeds it between markers and a test
checks the two agree, so the docs cannot drift from the code.
"""

from __future__ import annotations

import ast
import inspect
import itertools
import textwrap
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


def _summary(cls: type) -> str:
    doc = inspect.getmodule(cls).__doc__ or cls.__doc__ or ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def attribute_docstrings(config: type[BaseModel]) -> dict[str, str]:
    """The docstrings written under the fields of ``config`` and of its bases (``name: T = v``
    then a string on the next statement), read from the source."""
    docs: dict[str, str] = {}
    for klass in reversed(config.__mro__):
        if not (isinstance(klass, type) and issubclass(klass, BaseModel)) or klass is BaseModel:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):  # no source (a built class): no docstrings
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for stmt, after in itertools.pairwise(body):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def parameters(kind: str, name: str) -> list[dict[str, str]]:
    """The parameters of component ``name`` of ``kind``: name, type, default (Markdown, as in
    the reference) and meaning (the field's docstring)."""
    config: type[BaseModel] = registry.resolve(kind, name).Config
    docs = attribute_docstrings(config)
    return [
        {"name": field.alias or name_, "type": _type_name(field.annotation, field.metadata),
         "default": _default(field),
         "meaning": " ".join((field.description or docs.get(name_, "")).split())}
        for name_, field in config.model_fields.items()
    ]


def _plain(param: dict[str, str]) -> dict[str, Any]:
    """A parameter without the Markdown: ``required`` true, or its default as Python writes it."""
    default = param["default"]
    required = default == "**required**"
    return {"name": param["name"], "type": param["type"].replace(" \\| ", " | "),
            "required": required, "default": None if required else default.strip("`"),
            "meaning": param["meaning"]}


def kinds_of(name: str) -> list[str]:
    """The kinds (source, operator, sink) with a built-in component called ``name``."""
    return [kind for kind, table in registry.KINDS.items() if name in table]


def component(kind: str, name: str) -> dict[str, Any]:
    """One component as data (``edgewise components TYPE --json``)."""
    from edgewise.pipeline.component_examples import EXAMPLES

    cls = registry.resolve(kind, name)
    return {"kind": kind, "type": name, "summary": _summary(cls),
            "parameters": [_plain(p) for p in parameters(kind, name)],
            "example": EXAMPLES.get((kind, name))}


def describe(kind: str, name: str, *, example: bool = False) -> str:
    cls = registry.resolve(kind, name)
    lines = [f"### `{name}`", "", _summary(cls), ""]
    params = parameters(kind, name)
    if params:
        lines += ["| parameter | type | default | meaning |", "|---|---|---|---|"]
        for p in params:
            lines.append(f"| `{p['name']}` | {p['type']} | {p['default']} | {p['meaning']} |")
        lines.append("")
    ports = getattr(cls, "ports", None)
    if kind == "operator" and ports and tuple(ports) != ("out",):
        lines += [f"Output ports: {', '.join(f'`{p}`' for p in ports)}.", ""]
    if example:
        from edgewise.pipeline.component_examples import EXAMPLES

        plural = {"source": "sources", "operator": "stages", "sink": "sinks"}[kind]
        lines += ["Example:", "", "```yaml", f"{plural}:", EXAMPLES[(kind, name)].rstrip(), "```",
                  ""]
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
