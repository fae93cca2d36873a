"""Reading our YAML documents (pipelines, workloads) with errors that point at file and line.

Shared by `pipeline.spec` and `plan.workload`: read the text, parse it while remembering the line
of every key (`marks`), turn pydantic errors into ``(line, field, message)`` problems with a
hint of the fix, and find cycles in the wiring of stages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from edgewise.errors import ConfigError, SpecError
from edgewise.specfile.marks import Path as KeyPath
from edgewise.specfile.marks import line_of, load_with_lines

Problem = tuple[int | None, str, str]

_FIXES = {
    "missing": "add it",
    "extra_forbidden": "remove it or check its spelling",
    "literal_error": "use one of the allowed values",
}


def read_text(path: str | Path) -> str:
    """The file's text, or a `ConfigError` saying why it cannot be read."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None


def load_document(text: str, source: str) -> tuple[dict[str, Any], dict[KeyPath, int]]:
    """Parse a YAML mapping; return it with the line of every key path, or raise `SpecError`."""
    try:
        data, lines = load_with_lines(text, source)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(source, [(line, "", f"not valid YAML: {problem}")]) from None
    if not isinstance(data, dict):
        raise SpecError(
            source, [(1, "", "expected a mapping with apiVersion, kind, metadata and spec")]
        )
    return data, lines


def problems_from(
    exc: ValidationError, prefix: KeyPath, lines: dict[KeyPath, int]
) -> list[Problem]:
    """Each pydantic error as ``(line, dotted.field, message (fix))``."""
    out = []
    for err in exc.errors():
        loc = tuple(x for x in err["loc"] if not (isinstance(x, str) and x.startswith("function-")))
        # tagged unions and wrappers add type names to the location; keep real keys only
        loc = tuple(x for x in loc if not (isinstance(x, str) and x[:1].isupper()))
        path = (*prefix, *loc)
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        fix = _FIXES.get(err["type"])
        if fix:
            msg = f"{msg} ({fix})"
        out.append((line_of(lines, path), ".".join(str(p) for p in path), msg))
    return out


def find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """A cycle in ``node -> [nodes it reads from]`` as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in graph.get(n, []):
            if m not in graph:
                continue
            if state.get(m) == 1:
                return [*stack[stack.index(m) :], m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in graph:
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None
