"""Load YAML and remember the line of every value, so errors can point at it."""

from __future__ import annotations

from typing import Any

import yaml

Path = tuple[str | int, ...]


def load_with_lines(text: str, source: str) -> tuple[Any, dict[Path, int]]:
    """Parse ``text``; return the data and a map from key path to 1-based line number.

    Raises `yaml.YAMLError` on bad YAML (callers turn it into a `SpecError`), including a key
    given twice in one mapping, which YAML loaders otherwise resolve silently to the last one.
    """
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if node is None:
        return None, {}
    lines: dict[Path, int] = {}
    _walk(node, (), lines)
    data = yaml.safe_load(text)
    return data, lines


def _walk(node: yaml.Node, path: Path, lines: dict[Path, int]) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key, value in node.value:
            k = key.value
            if isinstance(key, yaml.ScalarNode):
                if k in seen:
                    raise yaml.MarkedYAMLError(
                        problem=f"duplicate key {k!r} (first at line {seen[k]}); keep one",
                        problem_mark=key.start_mark,
                    )
                seen[k] = key.start_mark.line + 1
            lines[(*path, k)] = key.start_mark.line + 1
            _walk(value, (*path, k), lines)
            lines[(*path, k)] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, (*path, i), lines)


def line_of(lines: dict[Path, int], path: Path) -> int | None:
    """The line of ``path`` or of its nearest ancestor that has one."""
    p = tuple(path)
    while p:
        if p in lines:
            return lines[p]
        p = p[:-1]
    return lines.get(())
